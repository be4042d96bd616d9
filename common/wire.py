"""Wire codec: reasoning trees and control messages as bytes, and back, validated (design §5.1-§5.3).

Guarantees
* `decode_tree` / `decode_message` either return a value that satisfies every invariant of
  its type (for trees: `ReasoningTree.validate(vocab_size)`), or raise `WireError` -- nothing
  else, whatever the input bytes. `WireError.reason` is one of `WIRE_ERROR_REASONS`, a small
  fixed set meant as a metric label; the message says what was wrong.
* Hostile input cannot allocate much: the buffer is refused above `WireLimits.max_bytes`, the
  msgpack header is parsed from at most `max_header_bytes` bytes (so at most that many objects),
  array sizes are checked against the bytes actually present before any array is made, and
  `meta` is a separately bounded msgpack blob. Nothing is ever unpickled.
* Decoding is zero-copy for the token data: node `token_ids` / `logprobs` are read-only
  slices of two `np.frombuffer` views over the received buffer (which they keep alive).

Frame layout (protocol version 3)

    frame   = header payload
    header  = msgpack [MAGIC: bin "TRPO", VERSION: int, kind: str, body: map]
    payload = the body's arrays, raw little-endian, in the schema's fixed order, each starting
              at a multiple of 8 bytes from the frame start (zero padding between them)

A tree's body is {tree_id, prompt_id, actor_id, meta: bin (msgpack of a JSON-like dict),
arrays: {name: [dtype str, shape list]}} with the arrays of `TREE_ARRAYS`: all node tokens
concatenated in one int32 array, all log-probs in one float32 array, and one entry per node in
`lengths`, `parents`, `versions`, `finish` (codes into FINISH_REASONS) and `rewards` (NaN = none).
A control message's body is its dataclass fields; it has no payload. Adding a control message
is one `@message`-decorated frozen dataclass whose fields carry their bounds. A field added to a
message within a protocol version has a default: a frame without it (an older peer's) decodes to
the default, and the field is left out of a frame while it holds its default (so an older peer
reads it); any other missing key, and every unknown one, is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from common.tree import (
    FINISH_CODE,
    FINISH_REASONS,
    UNKNOWN_FINISH_CODE,
    Node,
    ReasoningTree,
    TreeError,
    validate_flat,
)

MAGIC = b"TRPO"
PROTOCOL_VERSION = 3  # 2: credits as cumulative limits per registration; 3: Welcome without max_staleness
TREE_KIND = "tree"
_PREFIX = b"\x94\xc4\x04" + MAGIC  # fixarray(4), bin8(len 4), magic: every frame starts so
_ALIGN = 8

WIRE_ERROR_REASONS: tuple[str, ...] = (
    "malformed",  # not msgpack / not our layout / sizes do not add up
    "bad_magic",
    "bad_version",
    "bad_kind",
    "schema",  # wrong keys, types or dtypes
    "too_large",  # over a WireLimits bound
    "out_of_range",  # token id, parent, version, finish code or message field out of bounds
    "non_finite",  # NaN/inf where a finite number is required
    "invalid_tree",  # ReasoningTree.validate refused the decoded tree
)


class WireError(ValueError):
    """A buffer that cannot be decoded; `reason` in WIRE_ERROR_REASONS, text says what and where."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in WIRE_ERROR_REASONS:
            raise ValueError(f"unknown WireError reason {reason!r}; use one of {WIRE_ERROR_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds a decoder enforces; defaults suit trees of up to millions of tokens."""

    max_bytes: int = 256 * 2**20  # whole frame (match transport.max_message_bytes)
    max_header_bytes: int = 4 * 2**20  # msgpack part: strings, meta, shapes / control fields
    max_nodes: int = 16_384
    max_tokens: int = 1 << 24  # prompt tokens, and generated tokens, per tree
    max_meta_bytes: int = 64 * 2**10
    max_meta_depth: int = 8  # nesting of lists/dicts inside meta (meta itself is depth 1)
    max_str_len: int = 4096  # any string in a header (ids, meta values, message fields)
    max_list_len: int = 1 << 16  # any list in a control message or meta


DEFAULT_LIMITS = WireLimits()


# ---------------------------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------------------------
def _pack_header(kind: str, body: dict[str, Any]) -> bytes:
    return msgpack.packb([MAGIC, PROTOCOL_VERSION, kind, body], use_bin_type=True)


def _as_view(buf: Any, limits: WireLimits) -> memoryview:
    try:
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError):  # not a buffer, or a non-contiguous one
        raise WireError("malformed", f"expected a contiguous bytes-like buffer, got {type(buf).__name__}") from None
    if view.nbytes > limits.max_bytes:
        raise WireError("too_large", f"{view.nbytes} bytes > limit {limits.max_bytes}")
    return view


def _read_header(view: memoryview, limits: WireLimits, max_bin: int) -> tuple[str, dict, int]:
    """Parse the msgpack header from the first <= max_header_bytes bytes; -> (kind, body, end)."""
    if bytes(view[: len(_PREFIX)]) != _PREFIX:
        raise WireError("bad_magic", "buffer does not start with the treerpo magic")
    limit = min(len(view), limits.max_header_bytes)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_buffer_size=max(limit, 1),
        max_str_len=limits.max_str_len,
        max_bin_len=max_bin,
        max_array_len=limits.max_list_len,
        max_map_len=64,
        max_ext_len=0,
    )
    fed, chunk = 0, 4096  # feed in growing chunks: small headers copy only a few KiB
    while True:
        end = min(limit, fed + chunk)
        unpacker.feed(view[fed:end])
        fed = end
        try:
            header = unpacker.unpack()
            break
        except msgpack.OutOfData:
            if fed >= limit:
                why = "too_large" if limit < len(view) else "malformed"
                raise WireError(why, f"header not complete within {limit} bytes") from None
            chunk *= 2
        except (ValueError, TypeError) as e:  # FormatError, StackError, ExtraData, UnicodeDecodeError
            raise WireError("malformed", f"header is not valid msgpack: {e}") from None
    end = unpacker.tell()
    if not isinstance(header, list) or len(header) != 4:
        raise WireError("malformed", "header must be a 4-element array")
    _, version, kind, body = header
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {version!r}, this build speaks {PROTOCOL_VERSION}")
    if not isinstance(kind, str):
        raise WireError("bad_kind", f"message kind must be a string, got {type(kind).__name__}")
    if not isinstance(body, dict):
        raise WireError("schema", "message body must be a map")
    return kind, body, end


def _check_keys(where: str, got: dict, expected: typing.Iterable[str], optional: typing.Iterable[str] = ()) -> None:
    expected = tuple(expected)
    missing = sorted(set(expected) - set(got) - set(optional))
    extra = sorted(map(str, set(got) - set(expected)))
    if missing or extra:
        raise WireError("schema", f"{where}: missing keys {missing}, unknown keys {extra}")


# ---------------------------------------------------------------------------------------------
# meta: a bounded JSON-like dict
# ---------------------------------------------------------------------------------------------
def check_meta(meta: Any, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Raise WireError unless meta is a dict of str keys holding str/int/float/bool/None/list/dict."""
    if not isinstance(meta, dict):
        raise WireError("schema", f"meta must be a dict, got {type(meta).__name__}")
    stack: list[tuple[Any, int]] = [(meta, 1)]
    items = 0
    while stack:  # iterative: hostile nesting cannot hit the recursion limit
        obj, depth = stack.pop()
        if depth > limits.max_meta_depth:
            raise WireError("too_large", f"meta nests deeper than {limits.max_meta_depth}")
        children = obj.values() if isinstance(obj, dict) else obj
        if isinstance(obj, dict) and not all(type(k) is str for k in obj):
            raise WireError("schema", "meta dict keys must be strings")
        items += len(obj)
        if items > limits.max_list_len:
            raise WireError("too_large", f"meta holds more than {limits.max_list_len} items")
        for value in children:
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            elif isinstance(value, str):
                if len(value) > limits.max_str_len:
                    raise WireError("too_large", f"meta string of {len(value)} chars > {limits.max_str_len}")
            elif type(value) is float:
                if not math.isfinite(value):
                    raise WireError("non_finite", "meta holds a non-finite float")
            elif type(value) is int:
                if not -(2**63) <= value < 2**64:
                    raise WireError("out_of_range", "meta int does not fit 64 bits")
            elif value is not None and type(value) is not bool:
                raise WireError("schema", f"meta value of type {type(value).__name__} is not JSON-like")


def _decode_meta(blob: Any, limits: WireLimits) -> dict[str, Any]:
    if not isinstance(blob, bytes):
        raise WireError("schema", "meta must be a msgpack blob (bin)")
    if len(blob) > limits.max_meta_bytes:
        raise WireError("too_large", f"meta of {len(blob)} bytes > limit {limits.max_meta_bytes}")
    try:
        meta = msgpack.unpackb(
            blob,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=0,
            max_array_len=limits.max_list_len,
            max_map_len=limits.max_list_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError) as e:
        raise WireError("malformed", f"meta is not valid msgpack: {e}") from None
    check_meta(meta, limits)
    return meta


# ---------------------------------------------------------------------------------------------
# trees
# ---------------------------------------------------------------------------------------------
# name -> little-endian dtype; the payload holds the arrays in this order.
TREE_ARRAYS: dict[str, np.dtype] = {
    "prompt": np.dtype("<i4"),
    "tokens": np.dtype("<i4"),  # (T,) all nodes' token ids, node after node
    "logprobs": np.dtype("<f4"),  # (T,)
    "lengths": np.dtype("<i4"),  # (n,) tokens per node
    "parents": np.dtype("<i4"),  # (n,)
    "versions": np.dtype("<i8"),  # (n,)
    "finish": np.dtype("u1"),  # (n,) index into FINISH_REASONS
    "rewards": np.dtype("<f8"),  # (n,) NaN on inner nodes
}
_TREE_BODY_KEYS = ("tree_id", "prompt_id", "actor_id", "meta", "arrays")
_ARRAY_DTYPE_STRS = tuple((name, dtype.str) for name, dtype in TREE_ARRAYS.items())
(_DT_PROMPT, _DT_TOKENS, _DT_LOGPROBS, _DT_LENGTHS,
 _DT_PARENTS, _DT_VERSIONS, _DT_FINISH, _DT_REWARDS) = TREE_ARRAYS.values()
_NO_IDS, _NO_LOGPROBS = np.zeros(0, dtype=_DT_TOKENS), np.zeros(0, dtype=_DT_LOGPROBS)
_PADDING = tuple(bytes(k) for k in range(_ALIGN))


def _pad(n: int) -> int:
    return -n % _ALIGN


def encode_tree(tree: ReasoningTree, *, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """One frame holding the whole tree. Checks meta (JSON-like); the caller validates the tree.

    One pass over the nodes gathers the per-node fields; token ids and log-probs are
    concatenated once, and the frame is joined from the header and the arrays' own buffers.
    """
    check_meta(tree.meta, limits)
    nodes = tree.nodes
    n = len(nodes)
    tokens, logprobs = [_NO_IDS] * n, [_NO_LOGPROBS] * n
    lengths, parents, versions, finish, rewards = [0] * n, [0] * n, [0] * n, [0] * n, [math.nan] * n
    code_of = FINISH_CODE.get
    for i, nd in enumerate(nodes):
        tokens[i], logprobs[i], lengths[i] = nd.token_ids, nd.logprobs, len(nd.token_ids)
        parents[i], versions[i], finish[i] = nd.parent, nd.version, code_of(nd.finish, UNKNOWN_FINISH_CODE)
        if nd.reward is not None:
            rewards[i] = nd.reward
    try:
        arrays = (
            np.ascontiguousarray(tree.prompt_token_ids, dtype=_DT_PROMPT).reshape(-1),
            np.concatenate(tokens, dtype=_DT_TOKENS).reshape(-1) if n else _NO_IDS,
            np.concatenate(logprobs, dtype=_DT_LOGPROBS).reshape(-1) if n else _NO_LOGPROBS,
            np.array(lengths, dtype=_DT_LENGTHS),
            np.array(parents, dtype=_DT_PARENTS),
            np.array(versions, dtype=_DT_VERSIONS),
            np.array(finish, dtype=_DT_FINISH),
            np.array(rewards, dtype=_DT_REWARDS),
        )
    except OverflowError as e:  # e.g. a version beyond int64: valid in Python, not on the wire
        raise WireError("out_of_range", f"a tree field does not fit its wire dtype: {e}") from None
    body = {
        "tree_id": tree.tree_id,
        "prompt_id": tree.prompt_id,
        "actor_id": tree.actor_id,
        "meta": msgpack.packb(tree.meta, use_bin_type=True),
        "arrays": {name: [dstr, [a.shape[0]]] for (name, dstr), a in zip(_ARRAY_DTYPE_STRS, arrays, strict=True)},
    }
    header = _pack_header(TREE_KIND, body)
    parts: list[Any] = [header, _PADDING[-len(header) % _ALIGN]]
    for a in arrays:
        parts.append(a)  # C-contiguous 1-D: joined through the buffer protocol, no extra copy
        parts.append(_PADDING[-a.nbytes % _ALIGN])
    parts.pop()  # no padding after the last array
    return b"".join(parts)


def _array_specs(arrays: Any, limits: WireLimits) -> dict[str, int]:
    """Check dtypes and shapes in the header; -> element count per array."""
    if not isinstance(arrays, dict):
        raise WireError("schema", "body.arrays must be a map")
    _check_keys("body.arrays", arrays, TREE_ARRAYS)
    counts = {}
    for name, dtype in TREE_ARRAYS.items():
        spec = arrays[name]
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
            raise WireError("schema", f"arrays.{name} must be [dtype, shape]")
        if spec[0] != dtype.str:
            raise WireError("schema", f"arrays.{name} has dtype {spec[0]!r}, expected {dtype.str!r}")
        shape = spec[1]
        if len(shape) != 1 or type(shape[0]) is not int or shape[0] < 0:
            raise WireError("schema", f"arrays.{name} shape {shape!r} must be one non-negative int")
        counts[name] = shape[0]
    n, total = counts["lengths"], counts["tokens"]
    if n > limits.max_nodes:
        raise WireError("too_large", f"{n} nodes > limit {limits.max_nodes}")
    if total > limits.max_tokens or counts["prompt"] > limits.max_tokens:
        raise WireError("too_large", f"{total} generated / {counts['prompt']} prompt tokens > {limits.max_tokens}")
    if counts["logprobs"] != total:
        raise WireError("schema", f"{counts['logprobs']} log-probs for {total} tokens")
    for name in ("parents", "versions", "finish", "rewards"):
        if counts[name] != n:
            raise WireError("schema", f"arrays.{name} has {counts[name]} entries for {n} nodes")
    return counts


def _map_arrays(view: memoryview, start: int, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Zero-copy views of the payload; its size must match the header exactly."""
    offset = start + _pad(start)
    readonly = view.readonly
    out = {}
    for i, (name, dtype) in enumerate(TREE_ARRAYS.items()):
        if i:
            offset += _pad(offset)
        nbytes = counts[name] * dtype.itemsize
        if offset + nbytes > len(view):
            raise WireError("malformed", f"payload ends before arrays.{name} ({len(view)} bytes)")
        arr = np.frombuffer(view, dtype=dtype, count=counts[name], offset=offset)
        if not readonly:
            arr.flags.writeable = False  # even over a mutable buffer: decoded trees are read-only
        out[name] = arr
        offset += nbytes
    if offset != len(view):
        raise WireError("malformed", f"{len(view) - offset} trailing bytes after the payload")
    if sys.byteorder != "little":
        out = {k: v.astype(v.dtype.newbyteorder("=")) for k, v in out.items()}
    return out


# TreeError.rule -> WireError.reason (rules not listed: "invalid_tree")
_REASON_OF_RULE = {
    "layout": "schema",
    "parent": "out_of_range",
    "token_range": "out_of_range",
    "empty_segment": "out_of_range",
    "finish": "out_of_range",
    "non_finite": "non_finite",
}


def _validate(tree_id: str, a: dict[str, np.ndarray], vocab_size: int | None) -> None:
    """Every tree invariant, checked on the decoded flat arrays (common.tree.validate_flat)."""
    try:
        validate_flat(
            tree_id=tree_id,
            prompt=a["prompt"],
            tokens=a["tokens"],
            logprobs=a["logprobs"],
            lengths=a["lengths"],
            parents=a["parents"],
            versions=a["versions"],
            finish=a["finish"],
            rewards=a["rewards"],  # NaN: no reward
            vocab_size=vocab_size,
        )
    except TreeError as e:
        raise WireError(_REASON_OF_RULE.get(e.rule, "invalid_tree"), str(e)) from None


def _build_nodes(a: dict[str, np.ndarray]) -> list[Node]:
    """Nodes (of a validated tree) whose arrays are slices of the concatenated views."""
    tokens, logprobs = a["tokens"], a["logprobs"]
    ends = np.cumsum(a["lengths"], dtype=np.int64).tolist()
    trusted, reasons = Node.trusted, FINISH_REASONS
    nodes = []
    lo = 0
    for hi, parent, version, code, reward in zip(
        ends, a["parents"].tolist(), a["versions"].tolist(), a["finish"].tolist(), a["rewards"].tolist(), strict=True
    ):
        # NaN encodes "no reward"
        nodes.append(trusted(parent, tokens[lo:hi], logprobs[lo:hi], version, reasons[code],
                             None if reward != reward else reward))
        lo = hi
    return nodes


def decode_tree(
    buf: bytes | memoryview, *, vocab_size: int | None = None, limits: WireLimits | None = None
) -> ReasoningTree:
    """Validated tree from one frame, or WireError. Node arrays are read-only views into buf.

    The checks run on the decoded flat arrays (`common.tree.validate_flat`, the same rules as
    `ReasoningTree.validate`), before any Node is made.
    """
    limits = limits or DEFAULT_LIMITS
    view = _as_view(buf, limits)
    kind, body, end = _read_header(view, limits, max_bin=limits.max_header_bytes)  # meta: sized below
    if kind != TREE_KIND:
        raise WireError("bad_kind", f"expected a {TREE_KIND!r} frame, got {kind!r}")
    _check_keys("tree body", body, _TREE_BODY_KEYS)
    for key in ("tree_id", "prompt_id", "actor_id"):
        if not isinstance(body[key], str):
            raise WireError("schema", f"{key} must be a string")
    counts = _array_specs(body["arrays"], limits)
    meta = _decode_meta(body["meta"], limits)
    a = _map_arrays(view, end, counts)
    _validate(body["tree_id"], a, vocab_size)
    return ReasoningTree(
        tree_id=body["tree_id"],
        prompt_id=body["prompt_id"],
        actor_id=body["actor_id"],
        prompt_token_ids=a["prompt"],
        nodes=_build_nodes(a),
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# control messages
# ---------------------------------------------------------------------------------------------
_I64 = 2**63 - 1


def bounded(lo: float, hi: float, **kw: Any) -> Any:
    """A dataclass field whose int/float value must lie in [lo, hi]."""
    return field(metadata={"lo": lo, "hi": hi}, **kw)


def text(max_len: int = 256, *, pattern: str | None = None, **kw: Any) -> Any:
    """A dataclass field holding a string of at most max_len characters (matching `pattern` in full, if given)."""
    return field(metadata={"max_len": max_len, **({"pattern": re.compile(pattern)} if pattern else {})}, **kw)


def items(max_len: int = 1 << 16, *, lo: float = 0, hi: float = _I64, max_str: int = 256) -> Any:
    """A list field: at most max_len entries; ints inside in [lo, hi], strings <= max_str chars."""
    return field(metadata={"max_len": max_len, "lo": lo, "hi": hi, "max_str": max_str})


MESSAGE_TYPES: dict[str, type] = {}


def message(cls: type) -> type:
    """Register a frozen dataclass as a control message; its fields are checked on construction."""
    cls.__post_init__ = _check_message  # set before @dataclass so its __init__ calls it
    cls = dataclass(frozen=True)(cls)
    hints = typing.get_type_hints(cls)
    cls._fields = tuple((f.name, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls))
    cls._defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    MESSAGE_TYPES[cls.__name__] = cls
    return cls


def _check_value(where: str, tp: Any, value: Any, meta: dict[str, Any]) -> None:
    origin = typing.get_origin(tp)
    if origin is list:
        if type(value) is not list:
            raise WireError("schema", f"{where} must be a list, got {type(value).__name__}")
        if len(value) > meta.get("max_len", 1 << 16):
            raise WireError("too_large", f"{where} holds {len(value)} entries > {meta.get('max_len')}")
        (inner,) = typing.get_args(tp)
        inner_meta = {"lo": meta.get("lo", 0), "hi": meta.get("hi", _I64), "max_len": meta.get("max_str", 256)}
        if typing.get_origin(inner) is list:
            inner_meta["max_len"] = 64  # nested lists: shapes and bucket triples
        for i, v in enumerate(value):
            _check_value(f"{where}[{i}]", inner, v, inner_meta)
    elif tp is bool:
        if type(value) is not bool:
            raise WireError("schema", f"{where} must be a bool, got {type(value).__name__}")
    elif tp is int:
        if type(value) is not int:
            raise WireError("schema", f"{where} must be an int, got {type(value).__name__}")
        lo, hi = meta.get("lo", 0), meta.get("hi", _I64)
        if not lo <= value <= hi:
            raise WireError("out_of_range", f"{where} = {value} outside [{lo}, {hi}]")
    elif tp is float:
        if type(value) not in (float, int):
            raise WireError("schema", f"{where} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise WireError("non_finite", f"{where} = {value} is not finite")
        lo, hi = meta.get("lo", 0.0), meta.get("hi", 1e12)
        if not lo <= value <= hi:
            raise WireError("out_of_range", f"{where} = {value} outside [{lo}, {hi}]")
    elif tp is str:
        if type(value) is not str:
            raise WireError("schema", f"{where} must be a string, got {type(value).__name__}")
        if len(value) > meta.get("max_len", 256):
            raise WireError("too_large", f"{where} has {len(value)} chars > {meta.get('max_len', 256)}")
        if "pattern" in meta and not meta["pattern"].fullmatch(value):
            raise WireError("out_of_range", f"{where} = {value[:64]!r} is not of the form {meta['pattern'].pattern}")
    else:  # a message declared a type this codec cannot check: a programming error
        raise TypeError(f"{where}: unsupported control-message field type {tp!r}")


def _check_message(self: Any) -> None:
    for name, tp, meta in self._fields:
        value = getattr(self, name)
        _check_value(f"{type(self).__name__}.{name}", tp, value, meta)
        if tp is float and type(value) is int:
            object.__setattr__(self, name, float(value))  # msgpack may carry 2.0 as 2


def encode_message(msg: Any) -> bytes:
    """One frame for a registered control message (fields were checked when it was built)."""
    kind = type(msg).__name__
    if MESSAGE_TYPES.get(kind) is not type(msg):
        raise TypeError(f"{kind} is not a registered control message; decorate it with @message")
    body = {name: getattr(msg, name) for name, _, _ in msg._fields}
    return _pack_header(kind, {k: v for k, v in body.items() if k not in msg._defaults or v != msg._defaults[k]})


def decode_message(buf: bytes | memoryview, *, limits: WireLimits | None = None) -> Any:
    """The control message in one frame, validated, or WireError."""
    limits = limits or DEFAULT_LIMITS
    view = _as_view(buf, limits)
    kind, body, end = _read_header(view, limits, max_bin=len(MAGIC))
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise WireError("bad_kind", f"unknown control message kind {kind!r}; known: {sorted(MESSAGE_TYPES)}")
    if end != len(view):
        raise WireError("malformed", f"{len(view) - end} trailing bytes after a control message")
    _check_keys(kind, body, (name for name, _, _ in cls._fields), optional=cls._defaults)
    return cls(**body)


_U31 = 2**31 - 1
_PORT = 65535
GPU_UUID_PATTERN = r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|"  # or "" (no GPU)


@message
class Register:
    """actor -> learner: first message, and again after a reconnect."""

    actor_id: str = text(255)
    incarnation_seen: int = bounded(-1, _I64)  # -1: no learner seen yet
    version: int = bounded(-1, _I64)  # weight version loaded; -1: none yet
    pid: int = bounded(0, _U31)
    hostname: str = text(255)
    engine: str = text(32)
    vocab_size: int = bounded(1, _U31)
    has_cuda: bool
    # the GPU it computes on, as nvidia-smi names it ("" = none): processes on one GPU sync over gloo
    # (NCCL refuses two ranks on one device; weightsync.group.resolve_backend). Optional (added
    # within a version): a Register without it decodes with "" (GPU unknown).
    gpu_uuid: str = text(40, pattern=GPU_UUID_PATTERN, default="")


@message
class Welcome:
    """learner -> actor: reply to Register. No credit yet: that follows the confirmation of the
    weights, in Credit messages of this `registration`."""

    incarnation: int = bounded(0, _I64)
    version: int = bounded(0, _I64)
    registration: int = bounded(0, _I64)
    rendezvous_host: str = text(255)
    rendezvous_port: int = bounded(0, _PORT)


@message
class Heartbeat:
    """actor -> learner, every transport.heartbeat_interval_s: trees sent under `registration`
    (the last seq) and the credits it holds, for the learner to reconcile its count with."""

    actor_id: str = text(255)
    incarnation_seen: int = bounded(-1, _I64)
    registration: int = bounded(-1, _I64)  # -1: none
    version: int = bounded(-1, _I64)
    trees_sent: int = bounded(0, _I64)
    credits: int = bounded(0, _I64)


@message
class Credit:
    """learner -> actor: under `registration`, send trees up to seq `limit` (cumulative: a later
    Credit restates it, so a lost one only delays); `settled` of them the learner is done with."""

    incarnation: int = bounded(0, _I64)
    version: int = bounded(0, _I64)
    registration: int = bounded(0, _I64)
    limit: int = bounded(0, _I64)
    settled: int = bounded(0, _I64)


@message
class WeightAnnounce:
    """learner -> actor: metadata of the next weight sync; tensors follow on the sync group."""

    sync_id: int = bounded(0, _I64)
    version: int = bounded(0, _I64)
    group: str = text(255)
    rank: int = bounded(0, 1 << 20)
    world_size: int = bounded(1, 1 << 20)
    backend: str = text(16)
    rendezvous_host: str = text(255)
    rendezvous_port: int = bounded(0, _PORT)
    timeout_s: float = bounded(1e-3, 86_400.0)
    names: list[str] = items(1 << 16, max_str=1024)
    shapes: list[list[int]] = items(1 << 16, hi=1 << 40)
    dtypes: list[str] = items(1 << 16, max_str=32)
    buckets: list[list[int]] = items(1 << 16, hi=1 << 48)  # [first, end, numel]
    secret: str = text(64, repr=False)  # hex: keys the group's store values and the seal (weightsync.seal)


@message
class WeightAck:
    """actor -> learner: weights of `version` loaded (ok) or not (error)."""

    actor_id: str = text(255)
    sync_id: int = bounded(0, _I64)
    version: int = bounded(0, _I64)
    ok: bool
    checksum: str = text(128)
    load_seconds: float = bounded(0.0, 86_400.0)
    error: str = text(4096)


@message
class Rejoin:
    """learner -> actor: you are not (or no longer) a member -- dropped after a failed sync, or
    unknown to this learner: register again (and receive the current weights) before sending."""

    incarnation: int = bounded(0, _I64)
    reason: str = text(1024)


@message
class Shutdown:
    """Either direction: the sender is stopping (reason is free text, bounded)."""

    reason: str = text(1024)


__all__ = [
    "DEFAULT_LIMITS",
    "MESSAGE_TYPES",
    "WIRE_ERROR_REASONS",
    "Credit",
    "Heartbeat",
    "Register",
    "Rejoin",
    "Shutdown",
    "WeightAck",
    "WeightAnnounce",
    "Welcome",
    "WireError",
    "WireLimits",
    "check_meta",
    "decode_message",
    "decode_tree",
    "encode_message",
    "encode_tree",
    "message",
]
