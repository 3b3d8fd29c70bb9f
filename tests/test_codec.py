"""The binary codec and the rollout shards: arrays travel raw, frames survive any chunking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfless.api import codec
from rlhfless.api.wire import GroupData, RolloutSample
from rlhfless.store import ShardError, ShardStore


def test_arrays_round_trip_raw_and_little_endian():
    rng = np.random.default_rng(0)
    message = {
        "ids": rng.integers(0, 50_000, 1000).astype(np.int32),
        "logp": rng.standard_normal(1000).astype(np.float32),
        "values": rng.standard_normal((3, 4)),
        "mask": np.array([True, False, True]),
        "big_endian": np.arange(5, dtype=">i4"),
        "empty": np.zeros(0, np.float32),
        "nested": [{"k": np.int64(7), "x": np.float32(0.5)}, None, "text", 3, 2.5, b"raw"],
    }
    out = codec.decode(codec.encode(message))
    for key in ("ids", "logp", "values", "mask", "empty"):
        assert out[key].dtype == message[key].dtype and np.array_equal(out[key], message[key])
    assert out["big_endian"].dtype == np.dtype("<i4")
    assert out["big_endian"].tolist() == [0, 1, 2, 3, 4]
    assert out["nested"] == [{"k": 7, "x": 0.5}, None, "text", 3, 2.5, b"raw"]
    # The payload is the raw bytes plus a few bytes of framing per array.
    raw = message["ids"].nbytes + message["logp"].nbytes
    assert len(codec.encode({"ids": message["ids"], "logp": message["logp"]})) < raw + 64


def test_unsupported_or_malformed_input_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype"):
        codec.encode({"x": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(codec.CodecError):
        codec.decode(b"\xc1")  # never used in msgpack
    broken = bytearray(codec.encode({"x": np.arange(4, dtype=np.int32)}))
    with pytest.raises(codec.CodecError):
        codec.decode(bytes(broken[:-3]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_frames_reassemble_from_any_chunking(chunk):
    messages = [{"type": "samples", "n": i, "a": np.arange(i, dtype=np.int32)} for i in range(20)]
    stream = b"".join(codec.frame(m) for m in messages)
    reader, got = codec.FrameReader(), []
    for start in range(0, len(stream), chunk):
        got.extend(reader.feed(stream[start:start + chunk]))
    assert [m["n"] for m in got] == list(range(20))
    assert all(m["a"].tolist() == list(range(m["n"])) for m in got)
    assert reader.pending == 0
    assert list(reader.feed(codec.frame({"x": 1})[:5])) == [] and reader.pending == 5


def test_wire_models_take_lists_or_arrays_and_dump_either_form():
    sample = RolloutSample(key="k", index=1, response=[3, 4], logprobs=[-0.5, -1.5],
                           finished=True)
    assert sample.response.dtype == np.int32 and sample.logprobs.dtype == np.float32
    assert json.loads(sample.model_dump_json())["response"] == [3, 4]
    again = RolloutSample.model_validate(codec.decode(codec.encode(sample.model_dump())))
    assert again.response.tolist() == [3, 4] and again.logprobs.tolist() == [-0.5, -1.5]
    assert codec.has_arrays(sample.model_dump()) and not codec.has_arrays({"a": [1, 2]})
    with pytest.raises(ValueError, match="integers"):
        RolloutSample(key="k", index=0, response=[1.5], logprobs=[0.0], finished=True)


def test_shards_are_atomic_addressable_and_pruned_with_their_step(tmp_path):
    shards = ShardStore(tmp_path / "store")
    group = GroupData(group_id="p0", prompt_ids=[1, 2], responses=[[3], [4, 5]], rewards=[1, 0])
    sid = shards.put(4, "g00000", group.model_dump())
    assert sid == "s4/g00000"
    back = GroupData.model_validate(shards.get(sid))
    assert [r.tolist() for r in back.responses] == [[3], [4, 5]]
    assert not list((tmp_path / "store" / "shards" / "s4").glob(".*"))  # no temp files left
    shards.put(5, "g00000", group.model_dump())
    for bad in ("../x", "s4/../../etc", "s4/a/b", "4/g", "s4/"):
        with pytest.raises(ShardError):
            shards.get(bad)
    with pytest.raises(ShardError, match="no shard"):
        shards.get("s9/g00000")
    with pytest.raises(ShardError):
        shards.put(1, "a/b", {})
    assert shards.prune(5) == [4] and shards.steps() == [5]
