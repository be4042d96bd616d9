"""Weight-sync mechanism shared by the learner's publisher and the actors' receivers (design §6).

Guarantees:
* **Layout is a pure function of the metadata.** `plan_layout` orders parameters by dtype (dtype
  groups in order of first appearance, names stable inside a group) and cuts each group greedily
  into buckets of at most `bucket_bytes`; a parameter larger than a bucket, or of at least
  `solo_bytes`, gets a bucket of its own (the learner then broadcasts it straight from its own
  memory, no flatten copy; the receiver cannot tell). A bucket is the triple
  ``[first, end, numel]`` over the announced (layout-ordered) name list, as
  `common.wire.WeightAnnounce.buckets` carries it. `check_layout` lets a receiver
  validate any announced layout without knowing the bucket size.
* **Bit-exact checksum.** `tensor_checksum` is order independent and sensitive to every bit:
  ``h_i = xxh3_128(raw bytes of tensor i)``; ``checksum = xxh3_128(concat over names sorted of
  name | dtype | shape | h_i)``. bf16/fp16 are hashed through their raw bytes, never converted.
  XXH3-128 is an integrity hash, not a cryptographic one (peers are authenticated by CURVE, the
  checksum proves what was loaded): ~9 GB/s per core here against sha256's ~1.4 GB/s.
  `Digests` computes the h_i in worker threads while buckets are on the wire.
* **A sync group lives while its membership does.** `make_group` builds a gloo (or NCCL)
  process group on a `PrefixStore` named by the learner, separate from any DeepSpeed world. A
  side may keep it after a successful sync for the next sync of the same members (`keep_group`);
  it drops it when the membership changes and at once after a failure (dropping a gloo group
  closes its sockets, so peers blocked on it fail at once). `drop_group_later` drops in a daemon
  thread (the first side to close a gloo group waits ~20 ms for its peer; nobody waits on it),
  except the exiting interpreter: it drops the kept groups and joins pending drops (at exit),
  since a group still alive when the interpreter finalizes aborts the process (std::terminate).
* **Every wait has a deadline.** `Deadline` hands each collective the time left of the whole sync.
  `InFlight` keeps at most `MAX_IN_FLIGHT` collectives posted (= the gloo group's worker threads,
  so a posted collective starts at once and its timeout, counted from its start, still ends by
  the deadline) and completes them in posting order.
* **NCCL never outlives Python's deadline.** Before an NCCL group is built every member meets at
  the store within the deadline (`meet`; NCCL creates its communicator lazily at the first
  collective, where a missing peer would block without a bound); the communicator is
  non-blocking, every NCCL op is polled and its group aborted by Python at the deadline, and
  NCCL's own timeout (whose watchdog kills the whole process) is the deadline plus
  `NCCL_WATCHDOG_MARGIN_S`, so Python always aborts first.

Nothing here imports actor/ or learner/; torch is imported inside functions only.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import xxhash

SYNC_ERROR_REASONS: tuple[str, ...] = ("timeout", "peer_lost", "rendezvous", "invalid_announce", "load", "error")
"""Why one side's part of a sync failed (`WeightSyncError.reason`, usable as a metric label)."""

DTYPE_NAMES: tuple[str, ...] = (
    "float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
)
"""Parameter dtypes a sync may carry (wire names are torch's names without the `torch.` prefix)."""

GLOO_THREADS = 4
"""Worker threads of every gloo sync group (torch's default is 2; see MAX_IN_FLIGHT)."""

NCCL_WATCHDOG_MARGIN_S = 60.0
"""NCCL's own timeout is the sync deadline plus this: its watchdog, which tears down the whole
process (learner or vLLM engine core) on a timed-out op, must never fire before Python's abort."""

MAX_IN_FLIGHT = GLOO_THREADS
"""Collectives a side keeps posted at once: hides the per-collective latency between buckets and
runs several transfers at once (on loopback gloo, 4 concurrent beat one flat broadcast), and no
posted collective waits in a queue (its timeout would start late and overrun the deadline)."""


class WeightSyncError(RuntimeError):
    """One side of a weight sync failed; `.reason` is one of SYNC_ERROR_REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in SYNC_ERROR_REASONS:
            raise ValueError(f"unknown weight-sync error reason {reason!r}; known: {SYNC_ERROR_REASONS}")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Deadline
# --------------------------------------------------------------------------------------------
class Deadline:
    """A fixed point in (monotonic) time; every wait of a sync takes `remaining()` of it."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"a deadline needs a positive number of seconds, got {seconds}")
        self.seconds = float(seconds)
        self.start = time.monotonic()
        self.end = self.start + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self, what: str) -> float:
        """Seconds left, or WeightSyncError('timeout') naming what ran out of time."""
        left = self.remaining()
        if left <= 0.0:
            raise WeightSyncError("timeout", f"{what}: the sync deadline of {self.seconds:.1f}s has passed")
        return left

    def timedelta(self, what: str, floor_s: float = 0.05) -> timedelta:
        return timedelta(seconds=max(floor_s, self.check(what)))


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (the wire spelling)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be synced; supported: {DTYPE_NAMES}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} cannot be synced; supported: {DTYPE_NAMES}")
    return getattr(torch, name)


def itemsize(dtype: str) -> int:
    return torch_dtype(dtype).itemsize


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class SyncPlan:
    """What a sync moves, in layout order; converts 1:1 to WeightAnnounce's tensor fields."""

    version: int
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    buckets: list[list[int]]  # [first, end, numel] over names
    index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(b[2] * itemsize(self.dtypes[b[0]]) for b in self.buckets)

    def bucket_of(self) -> list[int]:
        """For each parameter index, the index of its bucket."""
        out = [0] * len(self.names)
        for b, (first, end, _) in enumerate(self.buckets):
            for i in range(first, end):
                out[i] = b
        return out

    def offsets(self) -> list[int]:
        """For each parameter index, its element offset inside its bucket."""
        out = [0] * len(self.names)
        for first, end, _ in self.buckets:
            off = 0
            for i in range(first, end):
                out[i] = off
                off += numel(self.shapes[i])
        return out


def plan_layout(meta: Iterable[tuple[str, Sequence[int], Any]], bucket_bytes: int, version: int,
                solo_bytes: int | None = None) -> SyncPlan:
    """Group (name, shape, dtype) by dtype and cut each group into buckets of <= bucket_bytes.

    Order: dtype groups in order of first appearance; inside a group, the given order.
    A bucket closes when the next parameter would push it past bucket_bytes or the dtype changes;
    a parameter larger than bucket_bytes, or of at least solo_bytes (None: no such rule), gets a
    bucket of its own.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    if solo_bytes is not None and solo_bytes < 1:
        raise ValueError(f"solo_bytes must be >= 1 or None, got {solo_bytes}")
    groups: dict[str, list[tuple[str, list[int]]]] = {}
    seen: set[str] = set()
    for name, shape, dtype in meta:
        if name in seen:
            raise ValueError(f"parameter {name!r} appears twice; names must be unique")
        seen.add(name)
        groups.setdefault(dtype_name(dtype), []).append((name, [int(s) for s in shape]))
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[str] = []
    buckets: list[list[int]] = []
    for dtype, params in groups.items():
        size = itemsize(dtype)
        first, count = len(names), 0  # open bucket: [first, len(names)), `count` elements
        for name, shape in params:
            n = numel(shape)
            solo = solo_bytes is not None and n * size >= solo_bytes
            if len(names) > first and (solo or (count + n) * size > bucket_bytes):
                buckets.append([first, len(names), count])
                first, count = len(names), 0
            names.append(name)
            shapes.append(shape)
            dtypes.append(dtype)
            count += n
            if solo:
                buckets.append([first, len(names), count])
                first, count = len(names), 0
        if len(names) > first:
            buckets.append([first, len(names), count])
    return SyncPlan(version, names, shapes, dtypes, buckets, {n: i for i, n in enumerate(names)})


def check_layout(names: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
                 buckets: Sequence[Sequence[int]], version: int = 0) -> SyncPlan:
    """Validate an announced layout (buckets tile [0, len(names)) in order, one dtype each,
    numel adds up, names unique, dtypes known) and return it as a SyncPlan; else
    WeightSyncError('invalid_announce')."""

    def bad(msg: str) -> WeightSyncError:
        return WeightSyncError("invalid_announce", f"announced layout is inconsistent: {msg}")

    if not (len(names) == len(shapes) == len(dtypes)):
        raise bad(f"{len(names)} names, {len(shapes)} shapes, {len(dtypes)} dtypes")
    if len(set(names)) != len(names):
        raise bad("duplicate parameter names")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise bad(f"dtype {d!r} not in {DTYPE_NAMES}")
    if any(int(s) < 0 for shape in shapes for s in shape):
        raise bad("negative dimension")
    expect_first = 0
    for b, bucket in enumerate(buckets):
        if len(bucket) != 3:
            raise bad(f"bucket {b} = {list(bucket)} is not [first, end, numel]")
        first, end, count = (int(x) for x in bucket)
        if first != expect_first or end <= first or end > len(names):
            raise bad(f"bucket {b} = {list(bucket)} does not continue at {expect_first} within {len(names)} names")
        if len(set(dtypes[first:end])) != 1:
            raise bad(f"bucket {b} mixes dtypes {sorted(set(dtypes[first:end]))}")
        if sum(numel(s) for s in shapes[first:end]) != count:
            raise bad(f"bucket {b} claims {count} elements, its shapes hold {sum(numel(s) for s in shapes[first:end])}")
        expect_first = end
    if expect_first != len(names):
        raise bad(f"buckets cover {expect_first} of {len(names)} parameters")
    return SyncPlan(int(version), list(names), [list(map(int, s)) for s in shapes], list(dtypes),
                    [list(map(int, b)) for b in buckets], {n: i for i, n in enumerate(names)})


# --------------------------------------------------------------------------------------------
# Flatten / unflatten
# --------------------------------------------------------------------------------------------
def flatten_into(buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Copy tensors one after another into the 1-D buffer buf (same dtype); returns buf."""
    total = sum(t.numel() for t in tensors)
    if total != buf.numel():
        raise ValueError(f"flatten_into: tensors hold {total} elements, the buffer {buf.numel()}")
    off = 0
    for t in tensors:
        n = t.numel()
        buf[off:off + n].copy_(t.reshape(-1))
        off += n
    return buf


def unflatten(buf: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views of the 1-D buffer buf, one per shape, in order (no copy)."""
    out, off = [], 0
    for shape in shapes:
        n = numel(shape)
        out.append(buf[off:off + n].view(tuple(shape)))
        off += n
    if off != buf.numel():
        raise ValueError(f"unflatten: shapes hold {off} elements, the buffer {buf.numel()}")
    return out


# --------------------------------------------------------------------------------------------
# Checksum
# --------------------------------------------------------------------------------------------
def tensor_digest(t: torch.Tensor) -> bytes:
    """XXH3-128 of the tensor's raw bytes (moved to CPU, made contiguous; dtype untouched)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return xxhash.xxh3_128(memoryview(raw) if flat.numel() else raw).digest()  # releases the GIL


class Digests:
    """`tensor_digest` of named tensors in `workers` threads (xxhash releases the GIL, so hashing
    overlaps the transfer and other hashing); `result()` waits for all. Disabled: no work, b"" each.
    A tensor handed to `add` must not change until `result()` returns."""

    def __init__(self, enabled: bool, workers: int = 2):
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="weightsync-digest") if enabled else None
        self._futures: dict[str, Any] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._futures[name] = self._pool.submit(tensor_digest, tensor) if self._pool is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self._futures

    def __len__(self) -> int:
        return len(self._futures)

    def result(self) -> dict[str, bytes]:
        return {n: (f.result() if f is not None else b"") for n, f in self._futures.items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def combine_digests(entries: Iterable[tuple[str, str, Sequence[int], bytes]]) -> str:
    """Hex checksum over (name, dtype, shape, digest) entries, taken in sorted name order."""
    h = xxhash.xxh3_128()
    for name, dtype, shape, digest in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}\0{dtype}\0{','.join(str(int(s)) for s in shape)}\0".encode())
        h.update(digest)
    return h.hexdigest()


def tensor_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Bit-exact, order-independent checksum of named tensors (see the module docstring)."""
    return combine_digests(
        (name, dtype_name(t.dtype), list(t.shape), tensor_digest(t)) for name, t in named_tensors
    )


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------
def resolve_backend(backend: str, all_have_cuda: bool) -> str:
    """'nccl' when asked (or auto) and every member has CUDA, else 'gloo'."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"weights.backend must be auto, gloo or nccl, got {backend!r}")
    cuda = torch.cuda.is_available() and all_have_cuda
    if backend == "nccl" and not cuda:
        raise ValueError("weights.backend=nccl but not every sync member has CUDA; use backend=auto or gloo")
    return "nccl" if backend == "nccl" or (backend == "auto" and cuda) else "gloo"


def bucket_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def connect_store(host: str, port: int, timeout_s: float, *, is_master: bool = False) -> Any:
    """A TCPStore master (is_master: binds host:port, port 0 = ephemeral, see `.port`) or client."""
    try:
        return dist.TCPStore(host, int(port), None, is_master, timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the address and a hint
        role = "bind" if is_master else "reach"
        raise WeightSyncError("rendezvous", f"cannot {role} the weight-sync rendezvous store at {host}:{port} "
                              f"({e}); check weights.rendezvous_port / the learner's endpoints.json") from e


def meet(store: Any, rank: int, world_size: int, timeout_s: float, what: str = "group") -> None:
    """Every rank checks in at `store` (a group's PrefixStore) and waits for all the others, within
    timeout_s; else WeightSyncError('timeout') naming the ranks that never came."""
    store.set(f"meet/{rank}", "1")
    keys = [f"meet/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=max(0.05, timeout_s)))
    except Exception as e:  # noqa: BLE001 - the store raises DistStoreError / RuntimeError on timeout
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise WeightSyncError("timeout", f"{what}: ranks {missing} did not reach the store within "
                              f"{timeout_s:.1f}s ({str(e)[:200]})") from e


def nccl_options(timeout_s: float) -> Any:
    """ProcessGroupNCCL options: a non-blocking communicator (abortable while it forms) whose own
    timeout outlasts the sync deadline by NCCL_WATCHDOG_MARGIN_S (Python aborts first)."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=max(0.05, timeout_s) + NCCL_WATCHDOG_MARGIN_S)
    config = getattr(opts, "config", None)
    if config is not None and hasattr(config, "blocking"):
        config.blocking = 0
    return opts


def op_timeout(deadline: Deadline, backend: str, what: str) -> timedelta:
    """The timeout of one collective: the time left (gloo); that plus the watchdog margin (NCCL,
    which Python polls and aborts at the deadline itself, `wait_work`)."""
    if backend == "nccl":
        return timedelta(seconds=deadline.check(what) + NCCL_WATCHDOG_MARGIN_S)
    return deadline.timedelta(what)


def make_group(host: str, port: int, group_name: str, rank: int, world_size: int, timeout_s: float,
               backend: str = "gloo", *, store: Any = None) -> Any:
    """A process group of `world_size` ranks on a fresh PrefixStore `group_name` of the TCPStore at
    host:port (or `store`, e.g. the learner's master). Blocks until every rank joined (gloo: its
    own rendezvous; NCCL: `meet` at the store) or timeout_s passed (WeightSyncError('rendezvous'/
    'timeout')). Drop the group to end it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    if store is None:
        store = connect_store(host, port, timeout_s)
    prefixed = dist.PrefixStore(group_name, store)
    td = timedelta(seconds=max(0.05, timeout_s))
    try:
        if backend == "nccl":
            meet(prefixed, rank, world_size, timeout_s, f"NCCL group {group_name!r}")
            return dist.ProcessGroupNCCL(prefixed, rank, world_size, nccl_options(timeout_s))
        if backend != "gloo":
            raise ValueError(f"make_group: backend must be gloo or nccl, got {backend!r}")
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td
        opts._threads = GLOO_THREADS
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        opts._devices = [dist.ProcessGroupGloo.create_device(interface=ifname) if ifname
                         else dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    except (RuntimeError, dist.DistError) as e:
        reason = "timeout" if "timeout" in str(e).lower() or "timed out" in str(e).lower() else "rendezvous"
        raise WeightSyncError(reason, f"group {group_name!r} (rank {rank} of {world_size}, {backend}) did not "
                              f"form within {timeout_s:.1f}s: {str(e)[:300]}") from e


_DROPS: set[threading.Thread] = set()  # drop_group_later threads still running
_DROPS_LOCK = threading.Lock()
_KEPT: dict[int, list] = {}  # id(holder) -> [group]: groups kept between syncs (`keep_group`)
DROP_EXIT_WAIT_S = 10.0
"""How long an exiting interpreter waits for pending group teardowns (gloo's take ~20 ms)."""


def drop_group_later(holder: list) -> None:
    """Drop `holder`'s items (a finished sync's group, whose last reference it must hold) in a
    daemon thread, so the group's teardown does not delay the end of the sync. The interpreter
    joins that thread at exit (`wait_group_drops`)."""
    thread = threading.Thread(target=_drop, args=(holder,), name="weightsync-drop-group", daemon=True)
    with _DROPS_LOCK:  # started under the lock: wait_group_drops never sees an unstarted thread
        _DROPS.add(thread)
        thread.start()


def keep_group(group: Any) -> list:
    """Keep a finished sync's group for the next sync of the same members: returns its holder
    (the only reference to keep). `release_group(holder)` drops it; the exiting interpreter
    drops whatever is still kept."""
    holder = [group]
    with _DROPS_LOCK:
        _KEPT[id(holder)] = holder
    return holder


def take_group(holder: list) -> Any:
    """Take a kept group back for a sync (the holder is emptied; keep it again afterwards)."""
    with _DROPS_LOCK:
        _KEPT.pop(id(holder), None)
    return holder.pop()


def release_group(holder: list | None) -> None:
    """Drop a kept group (in a daemon thread, `drop_group_later`); None does nothing."""
    if holder is None:
        return
    with _DROPS_LOCK:
        _KEPT.pop(id(holder), None)
    drop_group_later(holder)


def _drop(holder: list) -> None:
    try:
        holder.clear()
    finally:
        with _DROPS_LOCK:
            _DROPS.discard(threading.current_thread())


def wait_group_drops(timeout_s: float = DROP_EXIT_WAIT_S) -> bool:
    """Join the pending `drop_group_later` teardowns, within timeout_s; True if none is left.

    Run at exit (after the kept groups are dropped): a daemon thread is frozen mid-teardown when the interpreter
    finalizes, and a gloo group destroyed then (its worker threads still joinable) makes the
    C++ runtime call std::terminate -- a clean exit turned into SIGABRT."""
    deadline = time.monotonic() + timeout_s
    while True:
        with _DROPS_LOCK:
            pending = next(iter(_DROPS), None)
        if pending is None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pending.join(left)


def _at_exit() -> None:
    with _DROPS_LOCK:
        kept = list(_KEPT.values())
    for holder in kept:
        release_group(holder)
    wait_group_drops()


atexit.register(_at_exit)


def broadcast_bucket(pg: Any, buf: torch.Tensor, deadline: Deadline, what: str) -> Any:
    """Start broadcasting buf from rank 0 (async); wait on the result with `wait_work`."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    opts.timeout = op_timeout(deadline, "nccl" if buf.is_cuda else "gloo", what)
    return pg.broadcast([buf], opts)


def wait_work(work: Any, deadline: Deadline, backend: str, what: str, pg: Any = None) -> None:
    """Wait for an async collective; WeightSyncError('timeout'/'peer_lost') past the deadline or on a
    broken peer. NCCL never raises on a dead peer, so it is polled and its group aborted at the deadline."""
    try:
        if backend == "nccl":
            while not work.is_completed():
                if deadline.expired():
                    if pg is not None:
                        pg.abort()
                    raise WeightSyncError("timeout", f"{what}: NCCL collective missed the deadline")
                time.sleep(0.001)
            work.wait()
            torch.cuda.current_stream().synchronize()
        else:
            work.wait(deadline.timedelta(what))
    except WeightSyncError:
        raise
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError/DistError with the cause in text
        text = str(e)
        reason = "timeout" if ("Timed out" in text or "timeout" in text.lower()) else "peer_lost"
        raise WeightSyncError(reason, f"{what}: {text[:300]}") from e


class InFlight:
    """Collectives posted in order and completed in that order, at most `limit` posted at a time.

    `room()` completes the oldest ones until one more may be posted and returns their (key, hold)
    pairs; `post(key, work, hold)` adds one (`hold` keeps what it reads or writes alive until it
    completes); `drain()` completes the rest. Each wait takes the deadline's time left
    (WeightSyncError('timeout'/'peer_lost') from `wait_work`).
    """

    def __init__(self, deadline: Deadline, backend: str, pg: Any, what: str, limit: int = MAX_IN_FLIGHT):
        if limit < 1:
            raise ValueError(f"InFlight needs a limit >= 1, got {limit}")
        self.deadline, self.backend, self.pg, self.what, self.limit = deadline, backend, pg, what, limit
        self._posted: list[tuple[int, Any, Any]] = []

    def __len__(self) -> int:
        return len(self._posted)

    def room(self) -> list[tuple[int, Any]]:
        done = []
        while len(self._posted) >= self.limit:
            done.append(self._complete_oldest())
        return done

    def post(self, key: int, work: Any, hold: Any) -> None:
        if len(self._posted) >= self.limit:
            raise RuntimeError("InFlight.post without room(): a posted collective would wait in a queue")
        self._posted.append((key, work, hold))

    def holds(self) -> list[Any]:
        """What the posted collectives hold, oldest first."""
        return [hold for _, _, hold in self._posted]

    def oldest(self) -> list[tuple[int, Any]]:
        """Complete the oldest posted collective, if any; returns [(key, hold)] or []."""
        return [self._complete_oldest()] if self._posted else []

    def drain(self) -> list[tuple[int, Any]]:
        done = []
        while self._posted:
            done.append(self._complete_oldest())
        return done

    def _complete_oldest(self) -> tuple[int, Any]:
        key, work, hold = self._posted[0]
        wait_work(work, self.deadline, self.backend, f"{self.what} bucket {key}", self.pg)
        self._posted.pop(0)
        return key, hold
