"""The binary data plane: one codec for token ids, log-probs, values and masks.

msgpack carries the message structure (maps, lists, strings, numbers: the same shapes the
JSON control messages have, so one set of pydantic models validates both) and every numpy
array travels as a msgpack extension holding its raw little-endian bytes:

    ext type 1:  dtype code (1 byte) · ndim (1 byte) · shape (ndim × uint32 LE) · raw data

Why msgpack with raw arrays rather than Arrow IPC: our payloads are a few ragged arrays per
GRPO group inside small nested messages; msgpack is a small C extension, needs no schema per
message type, and decodes an array as a zero-copy `numpy.frombuffer` view. Arrow would add a
large dependency and a schema for each message for no gain at this shape. Compared with
JSON (a float as ~20 characters of decimal text, parsed back one by one) the encoded size is
the raw array bytes plus a few bytes per array, and encode + decode run at memory speed
(`benchmarks/data_plane.py`).

Streams (an actor reporting groups as they finish) are a sequence of frames over one chunked
HTTP response: each frame is a 4-byte little-endian length, then one encoded message. Length
prefixes beat newline-delimited JSON here because the payload is binary (no delimiter can be
reserved) and a reader knows each frame's size before it arrives.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np

CONTENT_TYPE = "application/x-rlhfless-msgpack"
FRAMES_TYPE = "application/x-rlhfless-frames"
JSON_TYPE = "application/json"

_ARRAY_EXT = 1
# Fixed little-endian dtypes: the wire never depends on the sender's byte order.
_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(d) for d in (
    "<i4", "<i8", "<f4", "<f8", "|u1", "|b1", "<f2", "<i2", "<u4", "<u8",
))
_CODE_OF = {dtype: code for code, dtype in enumerate(_DTYPES)}
_FRAME_HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 31


class CodecError(ValueError):
    """Bytes that are not a valid message of this codec."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        dtype = obj.dtype.newbyteorder("<") if obj.dtype.byteorder == ">" else obj.dtype
        code = _CODE_OF.get(np.dtype(dtype))
        if code is None:
            raise TypeError(f"arrays of dtype {obj.dtype} are not part of the wire format")
        if obj.ndim > 255:
            raise TypeError("arrays of more than 255 dimensions are not supported")
        data = np.ascontiguousarray(obj, dtype=_DTYPES[code])
        header = bytes((code, obj.ndim)) + struct.pack(f"<{obj.ndim}I", *obj.shape)
        return msgpack.ExtType(_ARRAY_EXT, header + data.tobytes())
    if isinstance(obj, np.generic):  # numpy scalars become plain numbers
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        return msgpack.ExtType(code, data)
    if len(data) < 2 or data[0] >= len(_DTYPES):
        raise CodecError("malformed array extension")
    dtype, ndim = _DTYPES[data[0]], data[1]
    start = 2 + 4 * ndim
    shape = struct.unpack_from(f"<{ndim}I", data, 2)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - start != count * dtype.itemsize:
        raise CodecError("array extension length does not match its shape")
    # A view on the message's bytes: no copy. It is read-only; `np.array(x)` to modify.
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)


def encode(obj: Any) -> bytes:
    """One message: dicts, lists, str, int, float, bool, None, bytes and numpy arrays."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise CodecError(f"not a valid message: {exc}") from None


def frame(obj: Any) -> bytes:
    """A length-prefixed frame of one message (for streamed responses)."""
    body = encode(obj)
    return _FRAME_HEADER.pack(len(body)) + body


class FrameReader:
    """Reassembles frames from arbitrary chunks of a byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> Iterator[Any]:
        """Decoded messages completed by `chunk`, in order."""
        self._buffer += chunk
        while len(self._buffer) >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME_BYTES:
                raise CodecError(f"frame of {size} bytes exceeds the limit")
            end = _FRAME_HEADER.size + size
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_FRAME_HEADER.size:end])
            del self._buffer[:end]
            yield decode(body)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (non-zero when a stream ended mid-frame)."""
        return len(self._buffer)


def has_arrays(obj: Any) -> bool:
    """Whether a message needs the binary codec (it holds arrays or bytes)."""
    if isinstance(obj, np.ndarray | bytes | bytearray):
        return True
    if isinstance(obj, dict):
        return any(has_arrays(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(has_arrays(v) for v in obj)
    return False


def to_json_compatible(obj: Any) -> Any:
    """Arrays as lists (for JSON bodies, metrics and logs)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_compatible(v) for v in obj]
    return obj


def non_finite(obj: Any, where: str = "") -> str | None:
    """Where the first NaN or ±Inf of a message sits (a field path), or None when every
    number is finite. Float arrays are checked whole (one vectorised pass)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "(root)")
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and obj.size and not np.isfinite(obj).all():
            return f"{where}[{int(np.flatnonzero(~np.isfinite(obj.ravel()))[0])}]"
        return None
    if isinstance(obj, np.floating):
        return non_finite(float(obj), where)
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        path = (f"{where}{key}" if str(key).startswith("[") else
                f"{where}.{key}" if where else str(key))
        found = non_finite(value, path)
        if found is not None:
            return found
    return None
