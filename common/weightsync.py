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
  the deadline) and completes them in posting order. A gloo group's construction is abandoned
  at the deadline (`_formed_within`): gloo's own rendezvous, retrying, can wait 5x its timeout for
  a peer that wrote its address and left.
* **Only holders of the sync's secret shape a sync** (design §6.1). The rendezvous TCPStore
  authenticates nobody and lists its keys to any client (`list_keys`), so group names are unique,
  not secret. What a rogue lacks is the sync's `secret` (`new_secret`, 32 random bytes the learner
  sends in the CURVE-authenticated `WeightAnnounce`, never written to the store), and two things
  rest on it: (1) `SealedStore` -- every value a member writes for its group (gloo's and NCCL's
  addresses, `meet` check-ins, failure reports) carries a BLAKE2b MAC of key and value under the
  secret, and a value without a valid one is refused (`WeightSyncError('forged')`) before gloo or
  NCCL parse it (a rogue's short value under a gloo address key segfaults the process that reads
  it); (2) the seal -- after the last bucket rank 0 broadcasts `SEAL_BYTES` carrying its checksum
  of what it sent and a MAC over (sync id, version, checksum): a receiver installs nothing unless
  the MAC is valid and what arrived hashes to that checksum (`open_seal`). With `weights.checksum`
  off the seal still proves the sender holds the secret, but not the bytes.
* **NCCL never outlives Python's deadline.** Before an NCCL group is built every member meets at
  the store within the deadline (`meet`); then its communicator is formed at once by a
  one-element broadcast posted in a thread abandoned (and the group aborted) at the deadline
  (`_connected_within`): NCCL forms a communicator lazily inside the first collective's posting,
  which blocks for TORCH_NCCL_NONBLOCKING_TIMEOUT when a peer met and died. That wait itself is
  bounded per process by `bound_nccl_setup` (the sync timeout plus `NCCL_WATCHDOG_MARGIN_S`),
  so an abandoned formation ends too. The communicator is non-blocking, every NCCL op is polled
  and its group aborted by Python at the deadline, and NCCL's own timeout (whose watchdog kills
  the whole process) is the deadline plus `NCCL_WATCHDOG_MARGIN_S`, so Python always aborts first.

Nothing here imports actor/ or learner/; torch is imported inside functions only.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from common.errors import one_line

log = logging.getLogger(__name__)

SYNC_ERROR_REASONS: tuple[str, ...] = (
    "timeout", "peer_lost", "rendezvous", "invalid_announce", "load", "forged", "error",
)
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


SECRET_BYTES = 32
"""Bytes of a sync's secret (`new_secret`; hex in `WeightAnnounce.secret`): the BLAKE2b key."""

SEAL_BYTES = 64
"""The seal rank 0 broadcasts after the last bucket: MAC (32) | checksum (16) | has-checksum (1) | 0s."""

_MAC_BYTES = 32
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


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
# Authentication: the sync's secret, sealed store values, the seal
# --------------------------------------------------------------------------------------------
def new_secret() -> str:
    """A sync's secret: SECRET_BYTES random bytes, hex (sent only in the CURVE-authenticated announce)."""
    return secrets.token_hex(SECRET_BYTES)


def new_group_name() -> str:
    """A fresh group's PrefixStore name: unique and unguessable in advance, though not secret once
    used (any store client can list the keys under it)."""
    return f"ws-{secrets.token_hex(16)}"


def secret_key(secret: str) -> bytes:
    """The BLAKE2b key of a hex secret; WeightSyncError('invalid_announce') unless SECRET_BYTES long."""
    try:
        key = bytes.fromhex(secret)
    except (TypeError, ValueError):
        key = b""
    if len(key) != SECRET_BYTES:
        raise WeightSyncError("invalid_announce", f"the sync's secret must be {2 * SECRET_BYTES} hex digits")
    return key


def _mac(key: bytes, domain: bytes, *parts: bytes) -> bytes:
    """BLAKE2b-256 keyed MAC over length-prefixed parts (no two part lists give the same input)."""
    h = hashlib.blake2b(key=key, digest_size=_MAC_BYTES, person=domain)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


class SealedStore(dist.Store):
    """A view of a group's store (a PrefixStore) whose values only holders of the sync's secret
    can write: `set` prepends a MAC of (key, value), `get` returns the value only when its MAC is
    valid, else raises WeightSyncError('forged') -- so gloo and NCCL never parse a value a rogue
    wrote (through any store call) in place of a member's. Existence (`check`, `wait`), counters
    (`add`) and deletion are not authenticated: a rogue can delay or fail a sync, not shape it.

    torch calls these methods from C++: keep this object alive as long as anything built on it
    (`make_group` lets the group hold it)."""

    def __init__(self, store: Any, secret: str):
        super().__init__()
        self._store, self._key = store, secret_key(secret)

    def _tag(self, key: str, value: bytes) -> bytes:
        return _mac(self._key, b"treerpo-store", key.encode(), value)

    def set(self, key: str, value: Any) -> None:
        value = value.encode() if isinstance(value, str) else bytes(value)
        self._store.set(key, self._tag(key, value) + value)

    def get(self, key: str) -> bytes:
        raw = bytes(self._store.get(key))
        tag, value = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(raw) < _MAC_BYTES or not hmac.compare_digest(tag, self._tag(key, value)):
            raise WeightSyncError("forged", f"rendezvous key {key!r} holds a value that no member of this sync "
                                  "wrote: a peer without the sync's secret writes to the store")
        return value

    def check(self, keys: list[str]) -> bool:
        return self._store.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self._store.wait(keys)
        else:
            self._store.wait(keys, timeout)

    def add(self, key: str, amount: int) -> int:
        return self._store.add(key, amount)

    def delete_key(self, key: str) -> bool:
        return self._store.delete_key(key)

    def num_keys(self) -> int:
        return self._store.num_keys()


def group_store(store: Any, group: str, secret: str | None) -> Any:
    """What one sync's members share of the rendezvous `store`: its PrefixStore `group`, sealed
    with the sync's `secret` (None: bare, for benchmarks of the transport only)."""
    prefixed = dist.PrefixStore(group, store)
    return prefixed if secret is None else SealedStore(prefixed, secret)


def failure_key(rank: int) -> str:
    """Where member `rank` reports "alive, but failed" in its `group_store`."""
    return f"failed/{rank}"


def _seal(key: bytes, sync_id: int, version: int, digest: bytes, flag: bytes) -> bytes:
    mac = _mac(key, b"treerpo-seal", str(int(sync_id)).encode(), str(int(version)).encode(), digest, flag)
    return (mac + digest + flag).ljust(SEAL_BYTES, b"\0")


def make_seal(secret: str, sync_id: int, version: int, checksum: str) -> bytes:
    """The SEAL_BYTES rank 0 broadcasts after the last bucket: MAC | checksum | has-checksum | zeros."""
    digest = bytes.fromhex(checksum) if checksum else bytes(16)
    return _seal(secret_key(secret), sync_id, version, digest, b"\x01" if checksum else b"\x00")


def open_seal(secret: str, sync_id: int, version: int, seal: bytes) -> str:
    """The checksum rank 0 sealed (hex, "" when it sent none), or WeightSyncError('forged') unless
    `seal` is, to the last byte, this sync's seal made with its secret."""
    seal = bytes(seal)
    digest, flag = seal[_MAC_BYTES:_MAC_BYTES + 16], seal[_MAC_BYTES + 16:_MAC_BYTES + 17]
    expect = _seal(secret_key(secret), sync_id, version, digest.ljust(16, b"\0"), flag or b"\x00")
    if not hmac.compare_digest(seal, expect) or flag not in (b"\x00", b"\x01"):
        raise WeightSyncError("forged", f"sync {sync_id}: the seal after the last bucket was not made with the "
                              "sync's secret: the buckets did not come from the learner that announced it")
    return digest.hex() if flag == b"\x01" else ""


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------
def shared_gpus(gpus: Sequence[str]) -> list[str]:
    """The GPU UUIDs held by more than one process of `gpus` ("" = none or unknown: never shared)."""
    return sorted(g for g, n in Counter(g for g in gpus if g).items() if n > 1)


def resolve_backend(backend: str, all_have_cuda: bool, gpus: Sequence[str] = ()) -> str:
    """The sync group's backend: 'nccl' when asked (or auto), every process of the group has CUDA
    (`all_have_cuda`, the learner's own included) and no two of them compute on one GPU (`gpus`:
    each process's GPU UUID, "" = none or unknown); else 'gloo'. NCCL refuses two ranks on one
    device ("Duplicate GPU detected"), so a shared GPU means gloo for the whole group (design §6.1)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"weights.backend must be auto, gloo or nccl, got {backend!r}")
    shared = shared_gpus(gpus)
    if backend == "nccl" and not all_have_cuda:
        raise ValueError("weights.backend=nccl but not every sync member has CUDA; use backend=auto or gloo")
    if backend == "nccl" and shared:
        raise ValueError(f"weights.backend=nccl but sync members share GPU {shared[0]}: NCCL refuses two ranks on "
                         "one device; use backend=auto (gloo then) or give each process a GPU of its own")
    return "nccl" if backend == "nccl" or (backend == "auto" and all_have_cuda and not shared) else "gloo"


def bucket_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def connect_store(host: str, port: int, timeout_s: float, *, is_master: bool = False) -> Any:
    """A TCPStore master (is_master: listens on host:port, port 0 = ephemeral, see `.port`) or client.

    The master listens on `host` only (torch's TCPStore would listen on every interface whatever
    host it is given); a wildcard host ("0.0.0.0", "::", "*", "") listens on all of them."""
    listen_fd = None
    try:
        if is_master and host not in _WILDCARD_HOSTS:
            listen_fd, port = _listen(host, int(port))
        return dist.TCPStore(host, int(port), None, is_master, timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=listen_fd)
    except Exception as e:  # noqa: BLE001 - re-raised with the address and a hint
        # (a listening fd handed to a TCPStore that failed is not closed here: it may own it by now)
        role = "bind" if is_master else "reach"
        raise WeightSyncError("rendezvous", f"cannot {role} the weight-sync rendezvous store at {host}:{port} "
                              f"({e}); check weights.rendezvous_port / the learner's endpoints.json") from e


def _listen(host: str, port: int) -> tuple[int, int]:
    """A listening TCP socket on host:port (the first address host resolves to): (fd, port).
    The fd is handed over: the TCPStore that takes it closes it."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        bound = int(sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise
    return sock.detach(), bound


def meet(store: Any, rank: int, world_size: int, timeout_s: float, what: str = "group") -> None:
    """Every rank checks in at `store` (a group's PrefixStore or SealedStore) and waits for all the
    others, within timeout_s; else WeightSyncError('timeout') naming the ranks that never came
    (or, on a SealedStore, 'forged' when a check-in was not written by a member)."""
    store.set(f"meet/{rank}", "1")
    keys = [f"meet/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=max(0.05, timeout_s)))
    except Exception as e:  # noqa: BLE001 - the store raises DistStoreError / RuntimeError on timeout
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise WeightSyncError("timeout", f"{what}: ranks {missing} did not reach the store within "
                              f"{timeout_s:.1f}s ({str(e)[:200]})") from e
    for k in keys:
        store.get(k)  # a SealedStore refuses a check-in a rogue wrote for a missing rank


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


_GROUP_CLASSES: dict[type, type] = {}


def _holding_store(cls: type, store: Any, *args: Any) -> Any:
    """cls(store, *args) as an instance of a subclass of cls that keeps `store` referenced: a
    Python store (SealedStore) whose last Python reference dies is no longer callable from C++
    (NCCL reads the store again when its communicator forms, at the first collective)."""
    sub = _GROUP_CLASSES.get(cls)
    if sub is None:
        sub = _GROUP_CLASSES[cls] = type(f"Sealed{cls.__name__}", (cls,), {})
    group = sub(store, *args)
    group.rendezvous_store = store
    return group


def make_group(host: str, port: int, group_name: str, rank: int, world_size: int, timeout_s: float,
               backend: str = "gloo", *, secret: str | None, store: Any = None) -> Any:
    """A process group of `world_size` ranks on a fresh PrefixStore `group_name` of the TCPStore at
    host:port (or `store`, e.g. the learner's master), seen through a `SealedStore` of the sync's
    `secret` (None: unauthenticated, for benchmarks of the bare transport only). Blocks until every
    rank joined (gloo: its own rendezvous; NCCL: `meet` at the store) or timeout_s passed
    (WeightSyncError('rendezvous'/'timeout'/'forged')). Drop the group to end it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    deadline = Deadline(timeout_s)
    if store is None:
        store = connect_store(host, port, timeout_s)
    prefixed = group_store(store, group_name, secret)
    td = timedelta(seconds=max(0.05, timeout_s))
    try:
        if backend == "nccl":
            what = f"NCCL group {group_name!r} (rank {rank} of {world_size})"
            meet(prefixed, rank, world_size, deadline.remaining(), what)
            pg = _nccl_group(prefixed, rank, world_size, deadline.remaining())
            return _connected_within(pg, deadline, what)
        if backend != "gloo":
            raise ValueError(f"make_group: backend must be gloo or nccl, got {backend!r}")
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td
        opts._threads = GLOO_THREADS
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        opts._devices = [dist.ProcessGroupGloo.create_device(interface=ifname) if ifname
                         else dist.ProcessGroupGloo.create_default_device()]
        return _formed_within(lambda: _holding_store(dist.ProcessGroupGloo, prefixed, rank, world_size, opts),
                              timeout_s, f"gloo group {group_name!r} (rank {rank} of {world_size})")
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, WeightSyncError):
            raise
        text = str(e)
        reason = ("forged" if "[forged]" in text else
                  "timeout" if "timeout" in text.lower() or "timed out" in text.lower() else "rendezvous")
        raise WeightSyncError(reason, f"group {group_name!r} (rank {rank} of {world_size}, {backend}) did not "
                              f"form within {timeout_s:.1f}s: {text[:300]}") from e


def _nccl_group(store: Any, rank: int, world_size: int, timeout_s: float) -> Any:
    """A ProcessGroupNCCL on `store` (non-blocking communicator, `nccl_options`); its communicator
    is not formed yet (`_connected_within` forms it)."""
    return _holding_store(dist.ProcessGroupNCCL, store, rank, world_size, nccl_options(timeout_s))


def _connected_within(pg: Any, deadline: Deadline, what: str) -> Any:
    """pg with its NCCL communicator formed, or WeightSyncError('timeout') at the deadline.

    NCCL forms a communicator lazily, inside the first collective's *posting*, which then blocks
    for TORCH_NCCL_NONBLOCKING_TIMEOUT (30 min by default) while a peer that met at the store and
    died never joins: no deadline polled after posting could end it. So a one-element broadcast
    forms it here, posted in a thread abandoned at the deadline (`_formed_within`), and the group
    is aborted; the thread ends within the bound `bound_nccl_setup` put on that wait."""
    def connect() -> Any:
        buf = torch.zeros(1, device=bucket_device("nccl"))
        wait_work(broadcast_bucket(pg, buf, deadline, f"{what}: connect"), deadline, "nccl", f"{what}: connect", pg)
        return pg

    try:
        return _formed_within(connect, deadline.remaining(), f"{what}: its communicator")
    except WeightSyncError:
        try:
            pg.abort()  # a communicator still forming is abandoned with its group
        except Exception as e:  # noqa: BLE001 - best effort: the sync fails either way
            log.debug("abort of %s failed: %s", what, one_line(e))
        raise


def bound_nccl_setup(timeout_s: float, env: dict[str, str] | None = None) -> None:
    """Bound, for this process, how long an NCCL communicator may take to form: torch waits for a
    non-blocking communicator's setup for TORCH_NCCL_NONBLOCKING_TIMEOUT seconds (30 min unless
    set, read once per process at its first NCCL use: call this at start-up). Sets it to the sync
    timeout plus NCCL_WATCHDOG_MARGIN_S unless the operator set it; and NCCL_CUMEM_ENABLE=0 (as
    vLLM sets for its own process, and OpenRLHF and AReaL for trainer-to-vLLM NCCL groups: cuMem
    buffers break NCCL between a trainer and a vLLM worker) unless set."""
    env = os.environ if env is None else env
    env.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(math.ceil(timeout_s + NCCL_WATCHDOG_MARGIN_S)))
    env.setdefault("NCCL_CUMEM_ENABLE", "0")


def _formed_within(build: Any, timeout_s: float, what: str) -> Any:
    """build() -- a gloo group's construction -- or WeightSyncError('timeout') after timeout_s.

    gloo bounds each connection attempt of its rendezvous by the group's timeout, but retries:
    a peer that wrote its address and left (died, gave up, or had its key deleted by a rogue
    before the other side read it) keeps the side that waits for its connection for 5x the
    timeout. So the construction runs in a thread and is abandoned at the deadline; it ends by
    itself within those 5x (the interpreter joins it at exit, as a pending drop) and drops a
    group that formed too late."""
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def run() -> None:
        try:
            out = ("group", build())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            out = ("error", e)
        with lock:
            if not state.get("abandoned"):
                state[out[0]] = out[1]
        del out  # abandoned: a late group is dropped here, in this thread
        with _DROPS_LOCK:
            _DROPS.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="weightsync-form-group", daemon=True)
    with _DROPS_LOCK:
        _DROPS.add(thread)
        thread.start()
    thread.join(max(0.05, timeout_s))
    with lock:
        if "group" in state:
            return state.pop("group")
        if "error" in state:
            raise state.pop("error")
        state["abandoned"] = True
    raise WeightSyncError("timeout", f"{what} did not form within {timeout_s:.1f}s: a peer never came, or left "
                          "mid-rendezvous (the construction goes on in the background until gloo gives up)")


_DROPS: set[threading.Thread] = set()  # drop_group_later threads and abandoned formations still running
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
    """Start broadcasting buf from rank 0 (async); wait on the result with `wait_work`.

    Posting can fail too: a non-blocking NCCL communicator that failed to form raises
    DistBackendError from `broadcast` itself. That is the peers' fault, not the caller's:
    WeightSyncError('peer_lost'), as a failed wait would be, so the sync fails and the process lives."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    opts.timeout = op_timeout(deadline, "nccl" if buf.is_cuda else "gloo", what)
    try:
        return pg.broadcast([buf], opts)
    except RuntimeError as e:  # DistBackendError / DistError are RuntimeErrors
        raise WeightSyncError("peer_lost", f"{what}: posting the broadcast failed: {one_line(e)[:300]}") from e


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
