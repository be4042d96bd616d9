"""Weight sync units: bucket layout, flatten/unflatten, checksums, group drops, swap_in validation,
the sync's secret (sealed store values, the seal), where the rendezvous store listens, and the
check that an install holds what arrived.

The real-process syncs (gloo + ZeroMQ control, actors as subprocesses) are in
tests/integration/test_weightsync.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from actor.engine import EngineError
from common.config import WeightsConfig
from tests.support.models import hf_engine
from tests.support.paths import REPO
from weightsync.buckets import NCCL_WATCHDOG_MARGIN_S, op_timeout
from weightsync.errors import Deadline, WeightSyncError
from weightsync.group import (
    bound_nccl_setup,
    connect_store,
    drop_group_later,
    make_group,
    meet,
    nccl_options,
    wait_group_drops,
)
from weightsync.layout import check_layout, flatten_into, plan_layout, unflatten
from weightsync.publisher import WeightPublisher
from weightsync.receiver import expected_installed, installed_mismatches, installed_view
from weightsync.seal import SEAL_BYTES, SealedStore, make_seal, new_secret, open_seal, tensor_checksum, tensor_digest


def test_layout_groups_by_dtype_and_splits_by_size():
    f32, bf16 = torch.float32, torch.bfloat16
    meta = [("a", [10], f32), ("b", [3, 2], bf16), ("c", [100], f32), ("d", [5], f32), ("e", [4], bf16),
            ("f", [2, 2], f32)]
    plan = plan_layout(meta, bucket_bytes=64, version=7)
    # dtype groups in order of first appearance: f32 (a, c, d, f) then bf16 (b, e).
    assert plan.names == ["a", "c", "d", "f", "b", "e"]
    # f32, 64 B = 16 elements per bucket: a (10) alone since a + c = 110 > 16; c (100) is larger
    # than a bucket -> its own; d (5) + f (4) = 9 <= 16 share one. bf16, 32 elements per bucket:
    # b (6) + e (4) = 10 share one.
    assert plan.buckets == [[0, 1, 10], [1, 2, 100], [2, 4, 9], [4, 6, 10]]
    assert plan.dtypes == ["float32"] * 4 + ["bfloat16"] * 2
    assert plan.nbytes == (10 + 100 + 9) * 4 + 10 * 2
    assert plan.offsets() == [0, 0, 0, 5, 0, 6]
    assert plan.bucket_of() == [0, 1, 2, 2, 3, 3]
    # The receiver's validation accepts exactly this layout ...
    again = check_layout(plan.names, plan.shapes, plan.dtypes, plan.buckets, 7)
    assert again.buckets == plan.buckets and again.names == plan.names
    # ... and refuses a bucket that mixes dtypes, skips a parameter or lies about numel.
    for buckets in ([[0, 5, 125], [5, 6, 4]], [[0, 1, 10], [2, 4, 9], [4, 6, 10]],
                    [[0, 1, 10], [1, 2, 99], [2, 4, 9], [4, 6, 10]]):
        with pytest.raises(WeightSyncError) as e:
            check_layout(plan.names, plan.shapes, plan.dtypes, buckets)
        assert e.value.reason == "invalid_announce"


def test_layout_is_deterministic_and_one_bucket_when_large():
    meta = [(f"p{i}", [i + 1, 3], torch.float32) for i in range(20)]
    one = plan_layout(meta, bucket_bytes=1 << 30, version=0)
    assert one.buckets == [[0, 20, 3 * sum(range(1, 21))]]  # 3 * 210 = 630 elements
    assert plan_layout(meta, 100, 0) == plan_layout(list(meta), 100, 0)
    with pytest.raises(ValueError, match="twice"):
        plan_layout(meta + [("p0", [1], torch.float32)], 100, 0)


def test_layout_solo_bytes_gives_large_tensors_their_own_bucket():
    f32 = torch.float32
    meta = [("a", [3], f32), ("b", [8], f32), ("c", [2], f32), ("d", [1], f32), ("e", [9], f32), ("f", [2], f32)]
    plan = plan_layout(meta, bucket_bytes=1 << 20, version=0, solo_bytes=32)
    # solo_bytes 32 = 8 float32: b (8) and e (9) stand alone, cutting the run of small ones:
    # [a] [b] [c d] [e] [f]; without solo_bytes everything fits one 1 MiB bucket.
    assert plan.buckets == [[0, 1, 3], [1, 2, 8], [2, 4, 3], [4, 5, 9], [5, 6, 2]]
    assert plan_layout(meta, 1 << 20, 0).buckets == [[0, 6, 25]]
    assert check_layout(plan.names, plan.shapes, plan.dtypes, plan.buckets).buckets == plan.buckets
    with pytest.raises(ValueError, match="solo_bytes"):
        plan_layout(meta, 1 << 20, 0, solo_bytes=0)


def test_flatten_unflatten_round_trip_bit_exact():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g).to(torch.bfloat16), torch.randn(7, generator=g).to(torch.bfloat16),
               torch.randn(2, 1, 5, generator=g).to(torch.bfloat16), torch.zeros(0, 3, dtype=torch.bfloat16)]
    buf = flatten_into(torch.empty(12 + 7 + 10, dtype=torch.bfloat16), tensors)
    views = unflatten(buf, [list(t.shape) for t in tensors])
    for t, v in zip(tensors, views, strict=True):
        assert v.shape == t.shape and torch.equal(v.view(torch.int16), t.view(torch.int16))
    assert views[1].data_ptr() == buf.data_ptr() + 12 * 2  # views, not copies
    with pytest.raises(ValueError):
        flatten_into(torch.empty(5, dtype=torch.bfloat16), tensors)


def test_checksum_bit_sensitive_and_order_independent():
    g = torch.Generator().manual_seed(1)
    named = [("w", torch.randn(4, 4, generator=g)), ("b", torch.randn(4, generator=g).to(torch.bfloat16))]
    base = tensor_checksum(named)
    assert base == tensor_checksum(list(reversed(named)))  # sorted by name internally
    assert base == tensor_checksum([(n, t.clone()) for n, t in named])
    for name, t in named:  # flip the lowest bit of one element: a different checksum
        flipped = t.clone()
        ints = flipped.view(torch.int32 if t.dtype == torch.float32 else torch.int16).reshape(-1)
        ints[3] ^= 1
        assert tensor_checksum([(n, flipped if n == name else u) for n, u in named]) != base
    # Same bytes, other name / dtype / shape: different checksums.
    assert tensor_checksum([("w2", named[0][1]), named[1]]) != base
    assert tensor_checksum([("w", named[0][1].view(torch.int32)), named[1]]) != base
    assert tensor_checksum([("w", named[0][1].reshape(2, 8)), named[1]]) != base
    # -0.0 and 0.0 compare equal as floats but differ in bits.
    assert tensor_checksum([("z", torch.tensor([0.0]))]) != tensor_checksum([("z", torch.tensor([-0.0]))])


def _bits(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().view(torch.int32) for n, t in named}


def test_swap_in_validates_all_before_changing_anything(make_tiny_model):
    torch.set_num_threads(1)
    engine = hf_engine(make_tiny_model(seed=1, max_position_embeddings=64))
    held = _bits(engine.named_parameters_for_sync())
    named = [(n, torch.zeros_like(p)) for n, p in engine.named_parameters_for_sync()]
    cases = [named[:-1] + [("nope.weight", named[-1][1])],                      # unknown name
             named[:-1] + [(named[-1][0], named[-1][1][:1])],                   # wrong shape
             named + [("lm_head.weight", named[0][1])]]                         # tied alias sent twice
    assert named[0][0] == "model.embed_tokens.weight"
    for bad in cases:
        with pytest.raises(EngineError):
            engine.swap_in(bad, version=9)
    with pytest.raises(EngineError, match="strict"):
        engine.swap_in(named[1:], version=9, strict=True)
    # dtype differs: declined (False), nothing changed; load_weights would convert instead.
    assert engine.swap_in([(n, t.double()) for n, t in named], version=9) is False
    now = _bits(engine.named_parameters_for_sync())
    assert engine.version == 0 and all(torch.equal(now[n], held[n]) for n in held)
    # A receiver whose swap_fn declines falls back to load_fn (copy): covered by last_swapped.


def test_wait_group_drops_joins_and_reports_leftovers():
    assert wait_group_drops(120)  # none left by an earlier test: the waits below are this test's own
    release = threading.Event()
    done = []

    class Blocking:
        def __del__(self):
            release.wait(10)
            done.append(True)

    drop_group_later([Blocking()])
    assert wait_group_drops(0.2) is False  # still tearing down: reported, not waited on forever
    release.set()
    assert wait_group_drops(10) is True and done == [True]


# -- NCCL's deadline (what a CPU can show: the store barrier and the timeouts handed to NCCL) ------
def _store():
    return connect_store("127.0.0.1", 0, 10.0, is_master=True)  # port 0: see .port


def test_meet_passes_when_every_rank_comes_and_fails_by_the_deadline_naming_the_missing():
    store = _store()
    peer = connect_store("127.0.0.1", store.port, 10.0)  # the other rank's own connection
    other = threading.Thread(target=lambda: (time.sleep(0.2), meet(dist.PrefixStore("g1", peer), 1, 2, 5.0)))
    other.start()
    meet(dist.PrefixStore("g1", store), 0, 2, 5.0)  # returns once rank 1 checked in
    other.join(5)
    # a peer that never comes (dead): rank 0 fails by the deadline, not whenever NCCL would notice
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"\[timeout\].*ranks \[1, 2\] did not reach the store"):
        meet(dist.PrefixStore("g2", store), 0, 3, 0.5)
    assert time.monotonic() - t0 < 3.0


def test_nccl_timeouts_leave_python_the_first_abort():
    # NCCL's watchdog kills the whole process when an op outlives NCCL's own timeout: that timeout
    # must end after the deadline Python polls and aborts at, never at the same instant
    deadline = Deadline(10.0)
    assert op_timeout(deadline, "gloo", "x").total_seconds() <= 10.0
    nccl = op_timeout(deadline, "nccl", "x").total_seconds()
    assert deadline.remaining() + NCCL_WATCHDOG_MARGIN_S - 1 < nccl <= 10.0 + NCCL_WATCHDOG_MARGIN_S
    if not hasattr(dist, "ProcessGroupNCCL"):
        pytest.skip("this torch build has no NCCL: the ProcessGroupNCCL options cannot be built")
    opts = nccl_options(10.0)
    assert opts._timeout.total_seconds() == 10.0 + NCCL_WATCHDOG_MARGIN_S
    assert opts.config.blocking == 0  # non-blocking communicator: abortable while it forms


class _NcclNeverForms:
    """Fault injection: a ProcessGroupNCCL whose communicator never forms. NCCL forms it inside the
    first collective's posting, which waits (TORCH_NCCL_NONBLOCKING_TIMEOUT, 30 min by default)
    for a peer that met at the store and died; here it waits until the group is aborted."""

    def __init__(self):
        self.posted, self.aborted = threading.Event(), threading.Event()

    def broadcast(self, bufs, opts):
        self.posted.set()
        self.aborted.wait(600.0)
        raise RuntimeError("NCCL communicator was aborted")

    def abort(self):
        self.aborted.set()


def test_an_nccl_communicator_that_never_forms_fails_the_group_by_its_deadline(monkeypatch):
    # before: the group was handed out unformed and the sync's first bucket blocked in posting,
    # past every deadline (the learner frozen, a vLLM actor's whole engine with it)
    import weightsync.group as group  # noqa: PLC0415

    pg = _NcclNeverForms()
    monkeypatch.setattr(group, "_nccl_group", lambda *args: pg)
    monkeypatch.setattr(group, "bucket_device", lambda backend: torch.device("cpu"))
    store = _store()
    with pytest.raises(WeightSyncError, match=r"\[timeout\].*communicator did not form"):
        make_group("127.0.0.1", store.port, "g", 0, 1, 0.5, "nccl", secret=new_secret(), store=store)
    assert pg.posted.is_set()  # formed at once, not at the first bucket
    assert pg.aborted.is_set()  # and abandoned with its group
    assert wait_group_drops(10.0)  # the abandoned formation ended with the abort


def test_bound_nccl_setup_bounds_the_communicator_wait_and_keeps_an_operators_choice():
    env = {}
    bound_nccl_setup(120.0, env)
    assert env == {"TORCH_NCCL_NONBLOCKING_TIMEOUT": str(int(120 + NCCL_WATCHDOG_MARGIN_S)), "NCCL_CUMEM_ENABLE": "0"}
    env = {"TORCH_NCCL_NONBLOCKING_TIMEOUT": "30", "NCCL_CUMEM_ENABLE": "1"}
    bound_nccl_setup(120.0, env)
    assert env == {"TORCH_NCCL_NONBLOCKING_TIMEOUT": "30", "NCCL_CUMEM_ENABLE": "1"}


def test_a_kept_group_is_dropped_at_exit_not_left_to_abort_the_interpreter():
    # a group still alive when the interpreter finalizes makes it call std::terminate (SIGABRT)
    code = ("import torch.distributed as dist; from weightsync.group import connect_store, keep_group, make_group;"
            "store = connect_store('127.0.0.1', 0, 10.0, is_master=True);"
            "h = keep_group(make_group('127.0.0.1', store.port, 'g', 0, 1, 10.0, secret='ab' * 32, store=store));"
            "print('kept')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert out.returncode == 0 and "kept" in out.stdout, out.stderr[-2000:]


# -- the sync's secret: sealed store values, the seal, where the store listens ------------------
def test_sealed_store_refuses_every_value_a_holder_of_the_secret_did_not_write():
    store = _store()
    rogue = connect_store("127.0.0.1", store.port, 10.0)  # reaches the port, lacks the secret
    secret = new_secret()
    member = SealedStore(dist.PrefixStore("g", store), secret)
    member.set("0/0", b"\x02address-of-rank-0\x00")
    member.set("0/1", "text values too")
    assert member.get("0/0") == b"\x02address-of-rank-0\x00" and member.get("0/1") == b"text values too"
    assert SealedStore(dist.PrefixStore("g", rogue), secret).get("0/0") == b"\x02address-of-rank-0\x00"
    genuine = {k: rogue.get(f"g/{k}") for k in ("0/0", "0/1")}
    forgeries = [b"", b"xx", bytes(SEAL_BYTES), genuine["0/1"],  # another key's genuine value
                 genuine["0/0"][:-1] + bytes([genuine["0/0"][-1] ^ 1])]  # one bit of the value
    for forged in forgeries:
        rogue.set("g/0/0", forged)
        with pytest.raises(WeightSyncError, match=r"\[forged\].*'0/0'"):
            member.get("0/0")
    rogue.set("g/0/0", genuine["0/0"])
    with pytest.raises(WeightSyncError, match=r"\[forged\]"):  # genuine, but for another sync's secret
        SealedStore(dist.PrefixStore("g", store), new_secret()).get("0/0")
    for bad in ("", "ab" * 31, "zz" * 32):
        with pytest.raises(WeightSyncError, match=r"\[invalid_announce\]"):
            SealedStore(dist.PrefixStore("g", store), bad)
    # what is not authenticated (existence, counters) still works through the view
    assert member.check(["0/0"]) and not member.check(["nope"]) and member.add("n", 2) == 2
    assert member.delete_key("0/1") and not member.check(["0/1"])


def test_seal_binds_secret_sync_version_and_checksum():
    secret, checksum = new_secret(), tensor_checksum([("w", torch.ones(3))])
    seal = make_seal(secret, 7, 3, checksum)
    assert len(seal) == SEAL_BYTES and open_seal(secret, 7, 3, seal) == checksum
    assert open_seal(secret, 7, 3, make_seal(secret, 7, 3, "")) == ""  # weights.checksum off: no bytes vouched for
    for other in ((new_secret(), 7, 3), (secret, 8, 3), (secret, 7, 4)):
        with pytest.raises(WeightSyncError, match=r"\[forged\]"):
            open_seal(*other, seal)
    for i in range(SEAL_BYTES):  # any bit of it, padding included
        bent = bytearray(seal)
        bent[i] ^= 0x10
        with pytest.raises(WeightSyncError, match=r"\[forged\]"):
            open_seal(secret, 7, 3, bytes(bent))
    with pytest.raises(WeightSyncError, match=r"\[forged\]"):
        open_seal(secret, 7, 3, seal[:-1])


_FORGED_GLOO_ADDRESS = """
import sys
from weightsync.errors import WeightSyncError
from weightsync.group import connect_store, make_group
from weightsync.seal import new_secret
store = connect_store("127.0.0.1", 0, 10.0, is_master=True)
rogue = connect_store("127.0.0.1", store.port, 10.0)
rogue.set("g/0/1", bytes.fromhex(sys.argv[1]))  # where rank 0's gloo would read rank 1's address
try:
    make_group("127.0.0.1", store.port, "g", 0, 2, 5.0, secret=new_secret(), store=store)
except WeightSyncError as e:
    print("refused", e.reason)
"""


@pytest.mark.parametrize("value", ["", "7878", "00" * 4096], ids=["empty", "short", "long"])
def test_a_rogue_gloo_address_fails_the_group_instead_of_crashing_the_process(value):
    # unsealed, gloo parses whatever it finds there: an empty or short value segfaults the
    # process that reads it (the learner), a long one raises ValueError/MemoryError from C++
    out = subprocess.run([sys.executable, "-c", _FORGED_GLOO_ADDRESS, value], capture_output=True, text=True,
                         cwd=str(REPO), timeout=120)
    assert out.returncode == 0 and "refused forged" in out.stdout, (out.returncode, out.stderr[-2000:])


def _listening(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on port (IPv4 and IPv6, from /proc/net)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(addr if len(addr) == width else "?")
    return found


def test_the_rendezvous_store_listens_on_its_host_only_and_announces_the_advertised_one():
    cfg = WeightsConfig(backend="gloo", rendezvous_port=0, timeout_s=10.0)
    pub = WeightPublisher(cfg, "127.0.0.1")
    assert _listening(pub.port) == {"0100007F"}  # 127.0.0.1 only, not 0.0.0.0 / [::]
    # a client still reaches it, and a second publisher cannot take the port
    connect_store("127.0.0.1", pub.port, 10.0).set("k", "v")
    with pytest.raises(WeightSyncError, match="(?i)address already in use"):
        WeightPublisher(WeightsConfig(backend="gloo", rendezvous_port=pub.port), "127.0.0.1")
    pub.close()
    # a wildcard host listens everywhere; members are told to dial the advertised address
    anywhere = WeightPublisher(cfg, "0.0.0.0", advertise="127.0.0.1")
    assert _listening(anywhere.port) & {"00000000", "00000000000000000000000000000000"}
    plan = anywhere.plan([("w", torch.zeros(2))], 1)
    sync = anywhere.prepare(plan, ["a", "b"])
    assert {a.rendezvous_host for a in sync.announcements} == {"127.0.0.1"}
    assert {a.secret for a in sync.announcements} == {sync.secret} and len(sync.secret) == 64
    assert sync.secret not in sync.group and anywhere.prepare(plan, ["a"]).secret != sync.secret
    anywhere.close()



def test_the_installed_check_reads_back_what_holds_a_sent_tensor_one_to_one():
    """issue 21 (7): after an install, the parameters that hold a sent tensor byte for byte (same
    name; same shape, or vocabulary rows padded) must hash to what arrived; fused or repacked ones
    (another name, or shape [0] on vLLM's CPU backend) cannot be read back and are left out."""
    g = torch.Generator().manual_seed(0)
    sent = {"norm.weight": torch.randn(8, generator=g), "embed.weight": torch.randn(5, 4, generator=g),
            "head.weight": torch.randn(3, 4, generator=g), "o_proj.weight": torch.randn(4, 4, generator=g),
            "q_proj.weight": torch.randn(4, 4, generator=g)}
    params = {"norm.weight": torch.zeros(8), "embed.weight": torch.zeros(8, 4),  # 3 padding rows
              "head.weight": torch.zeros(3, 4, dtype=torch.bfloat16),  # the loader casts
              "o_proj.weight": torch.zeros(0), "qkv_proj.weight": torch.zeros(12, 4)}  # repacked; fused
    digests = {n: tensor_digest(t) for n, t in sent.items()}
    expected = expected_installed(params.items(), sent.items(), digests)
    assert sorted(expected) == ["embed.weight", "head.weight", "norm.weight"]
    assert expected["norm.weight"] == ((8,), digests["norm.weight"])  # the receive's own digest
    assert expected["head.weight"][1] == tensor_digest(sent["head.weight"].to(torch.bfloat16))
    assert installed_mismatches(params.items(), expected) == ["embed.weight", "head.weight", "norm.weight"]

    for name in expected:  # the install, as a loader does it: copy (and cast) into the parameter
        installed_view(params[name], sent[name].shape).copy_(sent[name])
    params["embed.weight"][5:] = 7.0  # padding rows are the engine's business
    assert installed_mismatches(params.items(), expected) == []
    params["norm.weight"].zero_()  # a layer the finalize left with its old weights
    assert installed_mismatches(params.items(), expected) == ["norm.weight"]
    params["norm.weight"] = torch.empty(8, device="meta")  # or never materialized
    del params["head.weight"]  # or gone
    assert installed_mismatches(params.items(), expected) == ["head.weight", "norm.weight"]
