"""Reading a job file: bounded, strict YAML that means what the API server would receive.

kubectl turns a YAML file into JSON before the API server sees it. A job file is read here
under the same terms, with a clear error (naming the field where there is one) for what the
API server would never see or never store:

- at most `MAX_DOCUMENT_BYTES` (etcd's default request limit, 1.5 MiB), UTF-8, one document;
- no duplicate keys (YAML requires unique keys; PyYAML silently keeps the last one);
- aliases are allowed, but their expansion is bounded in nodes, bytes and depth, measured on
  the node graph before anything is expanded, so an alias bomb costs what its file costs;
- only JSON values: string keys, finite numbers, no binary, sets or pairs;
- scalars resolve as in kubectl: `1e-5` is a number (PyYAML alone makes it a string),
  `2024-01-01` stays a string (PyYAML alone makes it a date).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rlhfless.api.errors import SpecError

MAX_DOCUMENT_BYTES = 1_572_864  # etcd --max-request-bytes default (1.5 MiB)
MAX_NODES = 100_000  # after alias expansion; a job has about a hundred
MAX_DEPTH = 64  # nesting levels, after alias expansion
_STR_TAG = "tag:yaml.org,2002:str"
_DROPPED_TAGS = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp",
                 "tag:yaml.org,2002:value")
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.2 floats (what kubectl's decoder reads as numbers): exponent without a dot allowed.
_FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


_KEY = "<key>"  # a path step into a mapping key, left out of reported paths


class _Refused(Exception):
    def __init__(self, path: tuple[str | int, ...], message: str):
        self.path, self.message = path, message
        super().__init__(message)


def field_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for item in path:
        if item == _KEY:
            continue
        out += f"[{item}]" if isinstance(item, int) else ("." if out else "") + item
    return out or "(root)"


class _Loader(yaml.SafeLoader):
    """SafeLoader that tracks where it is, bounds depth and refuses duplicate keys."""

    # Dates stay strings, floats are re-added below in YAML 1.2 form, and a plain `=` is a
    # string (PyYAML would resolve it to a tag it cannot construct).
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str):
        super().__init__(stream)
        self.path: list[str | int] = []
        self.checked: set[int] = set()

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if parent is None:  # the document root
            return super().compose_node(parent, index)
        # `index` is the position in a sequence, the key node of a mapping value, or None
        # for a mapping key.
        self.path.append(_KEY if index is None else index if isinstance(index, int)
                         else _key_name(index))
        if len(self.path) > MAX_DEPTH:
            raise _Refused((*self.path[:6], "…"), f"nested more than {MAX_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
            if isinstance(node, MappingNode) and id(node) not in self.checked:
                self.checked.add(id(node))
                self._check_keys(node)
        finally:
            self.path.pop()
        return node

    def compose_document(self) -> Node:
        node = super().compose_document()
        if isinstance(node, MappingNode):
            self._check_keys(node)
        return node

    def _check_keys(self, node: MappingNode) -> None:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            if not isinstance(key, ScalarNode) or key.tag != _STR_TAG:
                raise _Refused((*self.path, _key_name(key)),
                               f"mapping keys must be strings (line {line}); quote the key")
            if key.value in seen:
                raise _Refused((*self.path, key.value),
                               f"duplicate key (line {line}; first on line {seen[key.value]})")
            seen[key.value] = line


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _key_name(node: Node) -> str:
    return node.value if isinstance(node, ScalarNode) else f"<{node.id} key>"


def _children(node: Node) -> list[tuple[str | int, Node]]:
    if isinstance(node, SequenceNode):
        return list(enumerate(node.value))
    if isinstance(node, MappingNode):
        out: list[tuple[str | int, Node]] = []
        for key, value in node.value:
            out += [(_KEY, key), (_key_name(key), value)]
        return out
    return []


def _check_expansion(root: Node) -> None:
    """Nodes, JSON bytes and depth of the document with every alias expanded, computed once
    per distinct node (iteratively: an alias chain may be deeper than Python's stack)."""
    size: dict[int, tuple[int, int, int]] = {}  # id -> (nodes, bytes, depth)
    open_nodes: set[int] = set()
    stack: list[tuple[Node, tuple[str | int, ...], bool]] = [(root, (), False)]
    while stack:
        node, path, finished = stack.pop()
        if finished:
            kids = [size[id(child)] for _, child in _children(node)]
            nodes = 1 + sum(k[0] for k in kids)
            nbytes = (len(node.value) if isinstance(node, ScalarNode) else 0) + 2 + sum(
                k[1] + 1 for k in kids)
            depth = (1 + max((k[2] for k in kids), default=0)) if kids else 0
            open_nodes.discard(id(node))
            size[id(node)] = (nodes, nbytes, depth)
            if nodes > MAX_NODES:
                raise _Refused(path, f"expands to more than {MAX_NODES:,} values "
                                      "(YAML aliases?)")
            if nbytes > MAX_DOCUMENT_BYTES:
                raise _Refused(path, f"expands to more than {MAX_DOCUMENT_BYTES:,} bytes, "
                                      "the API server's object limit (YAML aliases?)")
            if depth > MAX_DEPTH:
                raise _Refused(path, f"nested more than {MAX_DEPTH} levels deep once its "
                                      "aliases are expanded")
            continue
        if id(node) in size:
            continue
        open_nodes.add(id(node))
        stack.append((node, path, True))
        for name, child in _children(node):
            if id(child) in open_nodes:
                raise _Refused((*path, name),
                               "a YAML alias refers to a node that contains it (recursive)")
            if id(child) not in size:
                stack.append((child, (*path, name), False))


def json_problem(document: Any) -> str | None:
    """The first thing in a decoded document that JSON cannot carry or that nests deeper
    than MAX_DEPTH ("path: message"), or None. The operator applies it to what the API
    server stored, so a document refused here is refused there too."""
    try:
        _check_json(document)
    except _Refused as exc:
        return f"{field_path(exc.path)}: {exc.message}"
    return None


def _check_json(value: Any, path: tuple[str | int, ...] = ()) -> None:
    if len(path) > MAX_DEPTH:
        raise _Refused((*path[:6], "…"), f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Refused((*path, str(key)), "mapping keys must be strings")
            _check_json(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, (*path, i))
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Refused(path, f"{value} is not a finite number (JSON cannot carry it)")
    elif not isinstance(value, str | int | float | bool | None):
        raise _Refused(path, f"a {type(value).__name__} value has no JSON form; "
                             "use a string, number, boolean, list or mapping")


def load_document(data: bytes, source: str = "job") -> Any:
    """The JSON-like document in `data`; SpecError (field path first) for anything else."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise SpecError([f"(file): larger than {MAX_DOCUMENT_BYTES:,} bytes, the API "
                         "server's object limit"], source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([_not_utf8(data, exc, source)], source) from None
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader refuses control characters right here
        loader.name = source  # for the line marks in syntax errors
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        document = loader.construct_document(node)
        _check_json(document)
        return document
    except _Refused as exc:
        raise SpecError([f"{field_path(exc.path)}: {exc.message}"], source) from None
    except yaml.YAMLError as exc:
        if getattr(exc, "context", None) == "expected a single document in the stream":
            raise SpecError(["(file): more than one YAML document; give one job per file"],
                            source) from None
        raise SpecError([f"invalid YAML: {exc}"], source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _not_utf8(data: bytes, exc: UnicodeDecodeError, source: str) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    where = "(file)"
    try:  # name the field whose text holds the bad byte, when the rest is readable
        document = load_document(data.decode("utf-8", errors="replace").encode(), source)
        where = _field_with(document, "\ufffd") or where
    except SpecError:
        pass
    return (f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column "
            f"{column}); save the file as UTF-8")


def _field_with(value: Any, needle: str, path: tuple[str | int, ...] = ()) -> str | None:
    items: list[tuple[str | int, Any]] = (
        list(value.items()) if isinstance(value, dict)
        else list(enumerate(value)) if isinstance(value, list) else [])
    for key, item in items:
        if isinstance(key, str) and needle in key:
            return field_path((*path, key))
        if isinstance(item, str) and needle in item:
            return field_path((*path, key))
        found = _field_with(item, needle, (*path, key))
        if found:
            return found
    return None


def read_document(path: str | Path) -> Any:
    """Read and load a job file, never more than the size limit."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"cannot read {path}: {exc.strerror or exc}"], str(path)) from None
    return load_document(data, str(path))
