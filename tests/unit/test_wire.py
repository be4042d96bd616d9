"""Wire codec: exact round trips, and every hostile buffer gives WireError (with its reason) only."""

from __future__ import annotations

import math
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common import wire
from common.tree import ReasoningTree
from common.wire import (
    WIRE_ERROR_REASONS,
    Credit,
    Heartbeat,
    Register,
    Rejoin,
    Shutdown,
    WeightAck,
    WeightAnnounce,
    Welcome,
    WireError,
    WireLimits,
    decode_message,
    decode_tree,
    encode_message,
    encode_tree,
)
from tests.support.treegen import mutate, random_tree, tree_from_parents

VOCAB = 50
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_like = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8
)
metas = st.dictionaries(st.text(max_size=8), json_like, max_size=5)


def _depth(obj, d=1):
    kids = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return max([d] + [_depth(k, d + 1) for k in kids if isinstance(k, (dict, list))])


@st.composite
def trees(draw) -> ReasoningTree:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tree = random_tree(
        rng,
        max_depth=draw(st.integers(1, 4)),
        max_branch=draw(st.integers(1, 3)),
        reward_values=draw(st.sampled_from([(0.0, 1.0), None])),
        max_seg_len=draw(st.integers(1, 7)),
        max_prompt_len=draw(st.integers(1, 9)),
        vocab_size=VOCAB,
        max_version=draw(st.integers(0, 2**40)),
    )
    meta = draw(metas)
    assume(_depth(meta) <= WireLimits().max_meta_depth)
    tree.meta = meta
    tree.actor_id = draw(st.text(max_size=20))
    return tree


def _assert_same(a: ReasoningTree, b: ReasoningTree) -> None:
    assert (a.tree_id, a.prompt_id, a.actor_id, a.meta) == (b.tree_id, b.prompt_id, b.actor_id, b.meta)
    assert b.prompt_token_ids.dtype == np.int32 and np.array_equal(a.prompt_token_ids, b.prompt_token_ids)
    assert len(a.nodes) == len(b.nodes)
    for x, y in zip(a.nodes, b.nodes, strict=True):
        assert (x.parent, x.version, x.finish, x.reward) == (y.parent, y.version, y.finish, y.reward)
        assert type(y.parent) is int and type(y.version) is int
        assert y.token_ids.dtype == np.int32 and np.array_equal(x.token_ids, y.token_ids)
        assert y.logprobs.dtype == np.float32
        assert x.logprobs.tobytes() == y.logprobs.tobytes()  # bit-exact


def _decodes_or_wire_error(buf, **kw) -> None:
    """The property: a valid tree or a WireError with a known reason; no other exception."""
    try:
        tree = decode_tree(buf, **kw)
    except WireError as e:
        assert e.reason in WIRE_ERROR_REASONS
        return
    tree.validate(kw.get("vocab_size"))


def _reason(buf, **kw) -> str:
    with pytest.raises(WireError) as info:
        decode_tree(buf, **kw)
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(trees())
def test_round_trip_is_identity(tree):
    _assert_same(tree, decode_tree(encode_tree(tree), vocab_size=VOCAB))


def test_decoded_arrays_are_read_only_views_of_the_buffer():
    tree = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 0.5}, seg_len=4)
    buf = bytearray(encode_tree(tree))
    out = decode_tree(memoryview(buf))
    assert all(not n.token_ids.flags.writeable for n in out.nodes)
    # one concatenated buffer: consecutive nodes' token arrays are adjacent slices of it
    gap = out.nodes[1].token_ids.__array_interface__["data"][0] - out.nodes[0].token_ids.__array_interface__["data"][0]
    assert gap == 4 * 4  # 4 int32 tokens
    assert np.shares_memory(out.nodes[0].token_ids, np.frombuffer(buf, dtype=np.uint8))


def test_frame_layout_header_then_aligned_arrays():
    tree = tree_from_parents([-1], {0: 1.0}, seg_len=3, prompt_len=5)
    buf = encode_tree(tree)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(buf)
    magic, version, kind, body = unpacker.unpack()
    assert (magic, version, kind) == (b"TRPO", wire.PROTOCOL_VERSION, "tree")
    start = unpacker.tell() + (-unpacker.tell() % 8)
    prompt = np.frombuffer(buf, dtype="<i4", count=5, offset=start)
    assert prompt.tolist() == tree.prompt_token_ids.tolist()
    # prompt 5*4=20 B, pad to 24; tokens 12 B, pad 16; logprobs 12, pad 16; lengths/parents 4+4 pads
    # 8 each; versions 8; finish 1, pad 8; rewards 8 -> payload = 24+16+16+8+8+8+8+8 = 96
    assert len(buf) == start + 96


def test_pickle_is_never_accepted():
    tree = tree_from_parents([-1], {0: 1.0})
    assert _reason(pickle.dumps(tree)) == "bad_magic"


# ---------------------------------------------------------------------------------------------
# fuzzing: random bytes, truncations, bit flips
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_raise_wire_error_only(data, with_prefix):
    buf = (wire._PREFIX + data) if with_prefix else data
    with pytest.raises(WireError):
        decode_tree(buf, vocab_size=VOCAB)
    with pytest.raises(WireError):
        decode_message(buf)


@FUZZ
@given(trees(), st.data())
def test_every_truncation_raises(tree, data):
    buf = encode_tree(tree)
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(WireError):
        decode_tree(buf[:cut], vocab_size=VOCAB)


@FUZZ
@given(trees(), st.data())
def test_bit_flips_give_a_valid_tree_or_wire_error(tree, data):
    buf = bytearray(encode_tree(tree))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(buf) - 1))
        buf[bit // 8] ^= 1 << (bit % 8)
    _decodes_or_wire_error(bytes(buf), vocab_size=VOCAB)
    _decodes_or_wire_error(bytes(buf))


@settings(FUZZ, max_examples=200)
@given(trees(), st.data())
def test_byte_overwrites_and_insertions_give_a_valid_tree_or_wire_error(tree, data):
    buf = bytearray(encode_tree(tree))
    pos = data.draw(st.integers(0, len(buf) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=9))
    if data.draw(st.booleans()):
        buf[pos : pos + len(junk)] = junk
    else:
        buf[pos:pos] = junk
    _decodes_or_wire_error(bytes(buf), vocab_size=VOCAB)


def test_every_single_bit_flip_of_a_small_tree():
    """Exhaustive over one 2-node tree: no flip escapes as anything but a tree or WireError."""
    buf = encode_tree(tree_from_parents([-1, -1], {0: 1.0, 1: 0.0}, seg_len=2, prompt_len=2))
    for bit in range(8 * len(buf)):
        flipped = bytearray(buf)
        flipped[bit // 8] ^= 1 << (bit % 8)
        _decodes_or_wire_error(bytes(flipped), vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------------
# hand-made hostile buffers
# ---------------------------------------------------------------------------------------------
def _split(buf: bytes) -> tuple[list, bytes]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(buf)
    header = unpacker.unpack()
    start = unpacker.tell() + (-unpacker.tell() % 8)
    return header, buf[start:]


def _reframe(header: list, payload: bytes) -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    return h + bytes(-len(h) % 8) + payload


def _good() -> ReasoningTree:
    return tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0}, seg_len=3, vocab_size=VOCAB)


def _edit_header(edit) -> bytes:
    header, payload = _split(encode_tree(_good()))
    edit(header)
    return _reframe(header, payload)


def test_header_attacks_give_their_reasons():
    good = encode_tree(_good())
    assert _reason(b"XXXX" + good[4:]) == "bad_magic"
    assert _reason(b"") == "bad_magic"
    assert _reason(_edit_header(lambda h: h.__setitem__(1, wire.PROTOCOL_VERSION + 1))) == "bad_version"
    assert _reason(_edit_header(lambda h: h.__setitem__(1, 1))) == "bad_version"  # protocol 1: per-message credits
    assert _reason(_edit_header(lambda h: h.__setitem__(1, "1"))) == "bad_version"
    assert _reason(_edit_header(lambda h: h.__setitem__(2, "Credit"))) == "bad_kind"
    assert _reason(encode_message(Shutdown(reason="x"))) == "bad_kind"
    assert _reason(_edit_header(lambda h: h[3].__setitem__("extra", 1))) == "schema"
    assert _reason(_edit_header(lambda h: h[3].pop("prompt_id"))) == "schema"
    assert _reason(_edit_header(lambda h: h[3].__setitem__("tree_id", 7))) == "schema"
    assert _reason(_edit_header(lambda h: h[3]["arrays"]["tokens"].__setitem__(0, "<i8"))) == "schema"
    assert _reason(_edit_header(lambda h: h[3]["arrays"]["tokens"].__setitem__(1, [3, 3]))) == "schema"
    assert _reason("not bytes") == "malformed"
    assert _reason(np.arange(64, dtype=np.int64)[::2]) == "malformed"  # non-contiguous buffer
    assert decode_tree(np.frombuffer(good, dtype=np.uint8)).tree_id  # any contiguous buffer decodes
    assert _reason(good + b"\0") == "malformed"  # trailing byte
    # a header nested 5000 arrays deep overflows msgpack's parse stack: malformed, not a crash
    assert _reason(wire._PREFIX + b"\x01\xa4tree" + b"\x91" * 5000 + b"\x80") == "malformed"


def test_declared_sizes_are_checked_before_allocating():
    huge = 2**40
    assert _reason(_edit_header(lambda h: h[3]["arrays"]["tokens"].__setitem__(1, [huge]))) == "too_large"
    assert _reason(_edit_header(lambda h: h[3]["arrays"]["lengths"].__setitem__(1, [huge]))) == "too_large"
    # within limits but more bytes than the payload holds
    def claim_more(h):
        for name in ("tokens", "logprobs"):
            h[3]["arrays"][name][1] = [10_000]
    assert _reason(_edit_header(claim_more)) == "malformed"
    assert _reason(encode_tree(_good()), limits=WireLimits(max_bytes=64)) == "too_large"
    assert _reason(encode_tree(_good()), limits=WireLimits(max_header_bytes=32)) == "too_large"
    assert _reason(encode_tree(_good()), limits=WireLimits(max_nodes=3)) == "too_large"
    assert _reason(encode_tree(_good()), limits=WireLimits(max_tokens=11)) == "too_large"  # 12 generated


def test_value_attacks_give_their_reasons():
    def tree_with(edit) -> bytes:
        tree = _good()
        edit(tree)
        return encode_tree(tree)

    good = encode_tree(_good())
    assert decode_tree(good, vocab_size=VOCAB)
    assert _reason(tree_with(lambda t: t.nodes[2].token_ids.__setitem__(0, VOCAB)), vocab_size=VOCAB) == "out_of_range"
    assert _reason(tree_with(lambda t: t.prompt_token_ids.__setitem__(1, -1))) == "out_of_range"
    assert _reason(tree_with(lambda t: t.nodes[1].logprobs.__setitem__(2, np.nan))) == "non_finite"
    assert _reason(tree_with(lambda t: t.nodes[3].logprobs.__setitem__(0, -np.inf))) == "non_finite"
    assert _reason(tree_with(lambda t: setattr(t.nodes[2], "parent", 2))) == "out_of_range"
    assert _reason(tree_with(lambda t: setattr(t.nodes[2], "parent", -2))) == "out_of_range"
    assert _reason(tree_with(lambda t: setattr(t.nodes[0], "finish", "bogus"))) == "out_of_range"

    def empty_node(t):
        t.nodes[0].token_ids, t.nodes[0].logprobs = t.nodes[0].token_ids[:0], t.nodes[0].logprobs[:0]

    assert _reason(tree_with(empty_node)) == "out_of_range"
    # structural breaks are left to ReasoningTree.validate -> invalid_tree
    assert _reason(tree_with(lambda t: setattr(t.nodes[1], "reward", 1.0))) == "invalid_tree"  # inner node
    assert _reason(tree_with(lambda t: setattr(t.nodes[0], "reward", None))) == "invalid_tree"  # leaf
    assert _reason(tree_with(lambda t: setattr(t.nodes[0], "reward", math.inf))) == "invalid_tree"
    assert _reason(tree_with(lambda t: setattr(t.nodes[0], "version", -1))) == "invalid_tree"
    assert _reason(tree_with(lambda t: setattr(t.nodes[1], "finish", "stop"))) == "invalid_tree"
    assert _reason(tree_with(lambda t: setattr(t, "tree_id", ""))) == "invalid_tree"
    # BFS order: parents [-1, -1, 1, 0] decrease at the last node
    bad_bfs = tree_from_parents([-1, -1, 1, 1], {0: 1.0, 2: 0.0, 3: 1.0})
    bad_bfs.nodes[0].finish, bad_bfs.nodes[0].reward = "segment", None
    bad_bfs.nodes[3].parent = 0
    assert _reason(encode_tree(bad_bfs)) == "invalid_tree"


def test_length_and_count_mismatches():
    header, payload = _split(encode_tree(_good()))
    offs = {}
    pos = 0
    for name, dt in wire.TREE_ARRAYS.items():
        pos += -pos % 8
        offs[name] = pos
        pos += header[3]["arrays"][name][1][0] * dt.itemsize
    lengths = bytearray(payload)
    lengths[offs["lengths"] : offs["lengths"] + 4] = np.int32(4).tobytes()  # 4+3+3+3 != 12 tokens
    assert _reason(_reframe(header, bytes(lengths))) == "schema"
    header[3]["arrays"]["logprobs"][1] = [11]
    assert _reason(_reframe(header, payload)) == "schema"


def _meta_frame(meta_blob: bytes) -> bytes:
    return _edit_header(lambda h: h[3].__setitem__("meta", meta_blob))


def test_meta_bombs_and_non_json_meta():
    nested = {}
    obj = nested
    for _ in range(50):
        obj["x"] = {}
        obj = obj["x"]
    assert _reason(_meta_frame(msgpack.packb(nested))) == "too_large"  # depth 51 > 8
    assert _reason(_meta_frame(msgpack.packb([0] * 20_000 + [1] * 50_000))) == "too_large"  # 70 KB blob
    many = _meta_frame(msgpack.packb({"a": [0] * 60, "b": [0] * 60}))
    assert decode_tree(many).meta["b"] == [0] * 60
    assert _reason(many, limits=WireLimits(max_list_len=100)) == "too_large"  # 122 items > 100
    assert _reason(_meta_frame(msgpack.packb({"a": b"bin"}))) == "malformed"  # bin not allowed
    assert _reason(_meta_frame(msgpack.packb({1: 2}))) == "malformed"  # non-str key
    assert _reason(_meta_frame(msgpack.packb({"a": float("nan")}))) == "non_finite"
    assert _reason(_meta_frame(msgpack.packb([1, 2]))) == "schema"  # not a dict
    assert _reason(_meta_frame(msgpack.packb(msgpack.ExtType(1, b"x")))) == "malformed"
    assert _reason(_meta_frame(b"\xc1")) == "malformed"  # reserved byte
    assert _reason(_edit_header(lambda h: h[3].__setitem__("meta", {"a": 1}))) == "schema"  # not a blob
    tree = _good()
    tree.meta = {"t": (1, 2)}
    with pytest.raises(WireError, match="tuple"):
        encode_tree(tree)
    tree.meta = {"t": np.float32(1.0)}
    with pytest.raises(WireError, match="float32"):
        encode_tree(tree)


# ---------------------------------------------------------------------------------------------
# control messages
# ---------------------------------------------------------------------------------------------
EXAMPLES = [
    Register(actor_id="actor-0", incarnation_seen=-1, version=-1, pid=4242, hostname="h", engine="hf",
             vocab_size=151_936, has_cuda=False),
    Welcome(incarnation=3, version=17, registration=(3 << 32) + 1, rendezvous_host="10.0.0.1",
            rendezvous_port=29600),
    Heartbeat(actor_id="actor-0", incarnation_seen=3, registration=(3 << 32) + 1, version=17, trees_sent=12,
              credits=2),
    Credit(incarnation=3, version=17, registration=(3 << 32) + 1, limit=14, settled=9),
    WeightAnnounce(sync_id=5, version=18, group="sync-5", rank=1, world_size=3, backend="gloo",
                   rendezvous_host="127.0.0.1", rendezvous_port=29600, timeout_s=60.0,
                   names=["lm_head.weight", "model.norm.weight"], shapes=[[50, 16], [16]],
                   dtypes=["float32", "float32"], buckets=[[0, 2, 816]], secret="5e" * 32),
    WeightAck(actor_id="actor-0", sync_id=5, version=18, ok=True, checksum="ab" * 32, load_seconds=0.25, error=""),
    Shutdown(reason="max_steps reached"),
    Rejoin(incarnation=2, reason="not a member of this learner"),
    Register(actor_id="actor-1", incarnation_seen=3, version=17, pid=4243, hostname="h", engine="vllm",
             vocab_size=151_936, has_cuda=True, gpu_uuid="GPU-8f1e2a3b-0c4d-5e6f-7a8b-9c0d1e2f3a4b"),
]


def test_every_message_type_round_trips():
    assert {type(m).__name__ for m in EXAMPLES} == set(wire.MESSAGE_TYPES)
    for msg in EXAMPLES:
        back = decode_message(encode_message(msg))
        assert back == msg and type(back) is type(msg)


def _msg_frame(kind: str, body: dict) -> bytes:
    return msgpack.packb([b"TRPO", wire.PROTOCOL_VERSION, kind, body], use_bin_type=True)


def _msg_reason(buf) -> str:
    with pytest.raises(WireError) as info:
        decode_message(buf)
    return info.value.reason


def test_message_rejections():
    body = {"incarnation": 3, "version": 1, "registration": 5, "limit": 2, "settled": 0}
    assert decode_message(_msg_frame("Credit", body)) == Credit(**body)
    assert _msg_reason(_msg_frame("Nope", body)) == "bad_kind"
    assert _msg_reason(_msg_frame("tree", body)) == "bad_kind"
    assert _msg_reason(_msg_frame("Credit", {**body, "extra": 1})) == "schema"
    assert _msg_reason(_msg_frame("Credit", {k: v for k, v in body.items() if k != "settled"})) == "schema"
    assert _msg_reason(_msg_frame("Credit", {**body, "limit": "2"})) == "schema"
    assert _msg_reason(_msg_frame("Credit", {**body, "limit": True})) == "schema"  # bool is not an int
    assert _msg_reason(_msg_frame("Credit", {**body, "limit": -1})) == "out_of_range"
    assert _msg_reason(_msg_frame("Credit", {**body, "limit": 2**63})) == "out_of_range"
    assert _msg_reason(_msg_frame("Credit", body) + b"\0") == "malformed"
    assert _msg_reason(_msg_frame("Shutdown", {"reason": "x" * 1025})) == "too_large"
    ann = {k: getattr(EXAMPLES[4], k) for k in wire.WeightAnnounce.__dataclass_fields__}
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "timeout_s": float("nan")})) == "non_finite"
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "rendezvous_port": 70_000})) == "out_of_range"
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "shapes": [[2, -1]]})) == "out_of_range"
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "shapes": [[2], "x"]})) == "schema"
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "names": ["a"] * 70_000})) in ("too_large", "malformed")
    assert _msg_reason(_msg_frame("WeightAnnounce", {**ann, "shapes": [[1] * 65]})) == "too_large"
    # an int float field is accepted and normalised (msgpack may carry 60.0 as 60)
    assert decode_message(_msg_frame("WeightAnnounce", {**ann, "timeout_s": 60})).timeout_s == 60.0
    with pytest.raises(WireError) as info:
        Welcome(incarnation=0, version=0, registration=1, rendezvous_host="h", rendezvous_port=-1)
    assert info.value.reason == "out_of_range"


def test_register_carries_its_gpu_uuid_and_stays_readable_by_older_peers():
    with_gpu, without = EXAMPLES[-1], EXAMPLES[0]
    assert decode_message(encode_message(with_gpu)).gpu_uuid == "GPU-8f1e2a3b-0c4d-5e6f-7a8b-9c0d1e2f3a4b"
    # no GPU: the field is left out, so the frame is the one an older Register made (older learners read it) ...
    older_body = {k: getattr(without, k) for k in wire.Register.__dataclass_fields__ if k != "gpu_uuid"}
    assert encode_message(without) == _msg_frame("Register", older_body)
    # ... and an older actor's Register, without the key, decodes with the GPU unknown
    assert decode_message(_msg_frame("Register", older_body)) == without and without.gpu_uuid == ""
    body = {k: getattr(with_gpu, k) for k in wire.Register.__dataclass_fields__}
    assert decode_message(_msg_frame("Register", {**body, "gpu_uuid": ""})).gpu_uuid == ""
    # a hostile or garbled UUID is refused with a reason; other keys stay required, unknown ones refused
    for bad, reason in [("GPU-" + "f" * 200, "too_large"), ("GPU-8f1e2a3b", "out_of_range"),
                        ("GPU-8F1E2A3B-0C4D-5E6F-7A8B-9C0D1E2F3A4B", "out_of_range"),
                        ("GPU-8f1e2a3b-0c4d-5e6f-7a8b-9c0d1e2f3a4\n", "out_of_range"), ("0", "out_of_range"),
                        (7, "schema"), (None, "schema")]:
        assert _msg_reason(_msg_frame("Register", {**body, "gpu_uuid": bad})) == reason, bad
    assert _msg_reason(_msg_frame("Register", {k: v for k, v in body.items() if k != "has_cuda"})) == "schema"
    assert _msg_reason(_msg_frame("Register", {**body, "gpu": "x"})) == "schema"
    with pytest.raises(WireError, match="gpu_uuid"):
        Register(**{**body, "gpu_uuid": "cuda:0"})


@FUZZ
@given(st.sampled_from(EXAMPLES), st.data())
def test_message_bit_flips_give_a_valid_message_or_wire_error(msg, data):
    buf = bytearray(encode_message(msg))
    bit = data.draw(st.integers(0, 8 * len(buf) - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    try:
        out = decode_message(bytes(buf))
    except WireError as e:
        assert e.reason in WIRE_ERROR_REASONS
        return
    assert type(out).__name__ in wire.MESSAGE_TYPES


def test_decoder_and_validate_agree_on_single_edits():
    """The decoder checks the flat arrays with the same rules as ReasoningTree.validate."""
    rng = np.random.default_rng(11)
    checked = raised = 0
    while checked < 1000:
        tree = random_tree(rng, max_depth=3, max_branch=3, max_seg_len=4, vocab_size=VOCAB)
        mutate(tree, rng, VOCAB)
        if any(nd.token_ids.dtype != np.int32 or nd.logprobs.dtype != np.float32 or nd.version >= 2**63
               or (nd.reward is not None and math.isnan(nd.reward)) for nd in tree.nodes):
            continue  # not representable on the wire (encode casts dtypes; a NaN reward means "none")
        try:
            tree.validate(VOCAB)
            valid = True
        except ValueError:
            valid = False
        try:
            decode_tree(encode_tree(tree), vocab_size=VOCAB)
            decoded = True
        except WireError as e:
            assert e.reason in WIRE_ERROR_REASONS
            decoded = False
        assert decoded == valid
        checked += 1
        raised += not valid
    assert 300 < raised < 1000


def test_unencodable_values_raise_wire_error():
    tree = _good()
    tree.nodes[0].version = 2**70  # a valid Python int that int64 cannot hold
    with pytest.raises(WireError) as info:
        encode_tree(tree)
    assert info.value.reason == "out_of_range"
