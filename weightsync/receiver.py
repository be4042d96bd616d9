"""Actor side of the weight sync: join the announced group, receive, load, checksum (design §6).

Guarantees:
* Atomic load: every bucket is received into staging buffers first; the engine is touched only
  once all arrived, so a sync that fails midway leaves the engine's weights (and version) untouched.
* Zero-copy install (`swap_fn`): the engine may adopt the staged tensors as its parameters
  (`HFEngine.swap_in`: ``param.data = staged view`` under its lock) instead of copying them.
  The receiver then keeps two buffer sets and receives each sync into the one the engine does
  not hold (ping-pong), so a live parameter is never written by a later sync. Memory: one
  staging copy of the weights besides the engine's, as with copying. `swap_fn` returning False
  (cannot adopt, e.g. dtype or device differ) means it changed nothing; `load_fn` then copies.
* One group per membership: a successful sync keeps its group, and the next announcement that
  names the same group (the learner reuses it while the members are unchanged) is received on
  it, so an NCCL communicator is created once, not per sync; a new name or a failure drops it.
* Bounded device memory (`stage_on_host`, the vLLM worker on a GPU): buckets arrive in a ring
  of at most `MAX_IN_FLIGHT` device buffers and are staged in host memory, so the receive never
  holds a second copy of the model on the device.
* Bounded: the whole receive (rendezvous + buckets) ends by the announcement's `timeout_s`.
  Up to `MAX_IN_FLIGHT` bucket broadcasts are posted at once, completed in order (`on_bucket`
  runs after each, in order). On a dead learner, a deadline or a bad announcement it raises
  `WeightSyncError` (with a `.reason`), after telling the learner "alive, but failed" through
  the rendezvous store (key ``<group>/failed/<rank>``), so the learner keeps this actor for the
  next sync.
* Nothing a rogue sends is installed (design §6.1): the group forms on a `SealedStore` of the
  announcement's `secret` (a store value a member did not write fails the sync, reason
  "forged"), and after the last bucket comes the learner's seal: the engine is touched only if
  the seal was made with the secret and what arrived hashes to the checksum it carries (hashed
  as it arrives; with `checksum` off here but on at the learner, hashed once it all arrived).
  The failure report is MAC'd with the secret too.
* The returned checksum (`tensor_checksum`) proves what the engine holds: after a copy it hashes
  the parameters read back; after a swap, the buckets were hashed as they arrived (while later
  ones were still on the wire) and every parameter read back is checked to BE the hashed tensor
  (same memory, shape, stride, dtype), otherwise the read-back parameters are hashed. With
  `checksum_received` it is of what arrived (engines that cannot read back, e.g. vLLM).

Driving it: the HF engine's `receive_weights` (actor/hf_engine.py), on a WeightAnnounce the
actor's weights thread hands it::

    checksum, seconds = receiver.receive(
        announce, lambda named: engine.load_weights(named, announce.version),
        read_back=engine.named_parameters_for_sync,
        swap_fn=lambda named: engine.swap_in(named, announce.version))
    # WeightSyncError: the actor acks the failure and keeps generating with the old weights

The vLLM worker (actor/vllm_worker.py) drives it with `stage_on_host` and `checksum_received`
and installs through vLLM's layerwise reload, checked by `expected_installed` /
`installed_mismatches`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from weightsync.buckets import MAX_IN_FLIGHT, InFlight, broadcast_bucket
from weightsync.errors import Deadline, WeightSyncError
from weightsync.group import bucket_device, connect_store, keep_group, make_group, release_group, take_group
from weightsync.layout import check_layout, torch_dtype, unflatten
from weightsync.seal import (
    SEAL_BYTES,
    Digests,
    combine_digests,
    failure_key,
    group_store,
    open_seal,
    secret_key,
    tensor_checksum,
    tensor_digest,
)

LoadFn = Callable[[list[tuple[str, Any]]], Any]
ReadBackFn = Callable[[], Iterable[tuple[str, Any]]]
SwapFn = Callable[[list[tuple[str, Any]]], bool]
Expected = dict[str, tuple[tuple[int, ...], bytes]]  # name -> (shape sent, digest the installed parameter must have)


def installed_view(param: Any, shape: Sequence[int]) -> Any:
    """The part of an engine parameter that holds a sent tensor of `shape` byte for byte, or None.

    That is the whole parameter when the shapes are equal, or its leading rows when only the first
    dimension grew (vLLM pads an embedding's vocabulary). A fused, sharded or repacked parameter
    (vLLM's qkv_proj; on CPU a packed GEMM weight reads back with shape [0]) holds it in another
    layout: None."""
    shape = tuple(int(s) for s in shape)
    if tuple(param.shape) == shape:
        return param
    if len(shape) >= 1 and param.dim() == len(shape) and tuple(param.shape[1:]) == shape[1:] \
            and param.shape[0] > shape[0]:
        return param[:shape[0]]
    return None


def expected_installed(params: Iterable[tuple[str, Any]], staged: Iterable[tuple[str, Any]],
                       digests: Mapping[str, bytes]) -> Expected:
    """What the engine's 1:1 parameters (same name, `installed_view`) must hold once `staged` is
    installed: the digest of what arrived (`digests`, hashed on arrival; else hashed here), of the
    tensor cast to the parameter's dtype where the two differ (the loader's copy casts the same way)."""
    held = dict(params)
    out: Expected = {}
    for name, t in staged:
        param = held.get(name)
        if param is None or installed_view(param, t.shape) is None:
            continue
        same = t.dtype == param.dtype
        out[name] = (tuple(t.shape), digests[name] if same and digests.get(name) else
                     tensor_digest(t if same else t.to(param.dtype)))
    return out


def installed_mismatches(params: Iterable[tuple[str, Any]], expected: Expected) -> list[str]:
    """The names of `expected` whose installed parameter does not hold what arrived (read back and
    hashed after the install; a parameter gone, in another layout or not materialized counts too)."""
    held = dict(params)
    bad: list[str] = []
    hashing = Digests(True)
    try:
        for name, (shape, _) in expected.items():
            param = held.get(name)
            view = None if param is None else installed_view(param, shape)
            if view is None or view.device.type == "meta":
                bad.append(name)
            else:
                hashing.add(name, view)
        got = hashing.result()
    finally:
        hashing.close()
    return sorted(bad + [n for n, d in got.items() if d != expected[n][1]])


class WeightReceiver:
    """Receives announced weight syncs; keeps one client connection to the rendezvous store."""

    def __init__(self, *, checksum: bool = True, reuse_buffers: bool = True,
                 on_bucket: Callable[[int, int], None] | None = None, stage_on_host: bool = False,
                 ring: bool | None = None):
        self.checksum = checksum
        # stage_on_host: the staging buffers live in host memory; buckets on another device (NCCL)
        # pass through a ring of MAX_IN_FLIGHT device buffers (ring=None: whenever the bucket device
        # is not the CPU; True forces the ring, e.g. to test it on CPU)
        self.stage_on_host = stage_on_host
        self.ring = ring
        self._ring: dict[tuple[int, str], Any] = {}  # (slot, dtype) -> device buffer
        # Keep the staging buffers between syncs (fresh memory costs page faults several times the
        # copy). Set False where memory is scarcer than time.
        self.reuse_buffers = reuse_buffers
        self._sets: list[dict[tuple[str, int, str], Any]] = [{}, {}]  # (dtype, bucket, device) -> buffer
        self._live: int | None = None  # the set the engine adopted with the last swap (never received into)
        self.on_bucket = on_bucket  # (bucket index, bucket count) after each bucket arrived; tests, progress
        self._store: Any = None
        self._store_addr: tuple[str, int] | None = None
        self._group: tuple[str, list] | None = None  # (name, keep_group holder) kept for the next sync in it
        self.last_swapped = False  # did the last successful receive install by swap (else by copy)?
        self.last_digests: dict[str, bytes] = {}  # name -> digest of what arrived (hashed on arrival), last receive

    def reset(self) -> None:
        """Forget the store connection and the kept group (the learner restarted: its store is a new one)."""
        self._store, self._store_addr = None, None
        self._drop_group()

    def close(self) -> None:
        """Release everything held between syncs (store connection, group, buffers)."""
        self.reset()
        self._sets, self._live, self._ring = [{}, {}], None, {}

    def _drop_group(self) -> None:
        if self._group is not None:
            holder, self._group = self._group[1], None
            release_group(holder)

    def _client(self, host: str, port: int, timeout_s: float) -> Any:
        if self._store is None or self._store_addr != (host, port):
            self._store = connect_store(host, port, timeout_s)
            self._store_addr = (host, port)
        return self._store

    def receive(self, announce: Any, load_fn: LoadFn, read_back: ReadBackFn | None = None,
                swap_fn: SwapFn | None = None, *, checksum_received: bool = False) -> tuple[str, float]:
        """Join `announce.group` at `announce.rank`, receive all buckets, install them once (swap_fn,
        else / if it declines load_fn), and return (checksum, seconds). Raises WeightSyncError.

        checksum_received: the checksum is of what arrived (hashed as it arrives), for engines whose
        parameters cannot be read back under the sent names (vLLM's fused layouts)."""
        deadline = Deadline(announce.timeout_s)
        plan = check_layout(announce.names, announce.shapes, announce.dtypes, announce.buckets, announce.version)
        if not 1 <= announce.rank < announce.world_size:
            raise WeightSyncError("invalid_announce", f"rank {announce.rank} is not a member rank of a group "
                                  f"of {announce.world_size} (rank 0 is the learner)")
        secret_key(announce.secret)
        target = 1 if self._live == 0 else 0
        early = self.checksum  # hashed as it arrives: checked against the seal before anything is installed
        store = None
        try:
            store = self._client(announce.rendezvous_host, announce.rendezvous_port, deadline.check("connect"))
            named, digests = self._receive_buckets(store, announce, plan, deadline, target, early)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # the frames below hold the group: close it now
            if not isinstance(e, WeightSyncError):
                raise
            self._report_failure(store, announce, e)
            if e.reason != "invalid_announce":
                self.reset()  # the store may be gone with its learner: reconnect next time
            raise
        self.last_digests = digests if early else {}
        swapped = False
        try:
            if swap_fn is not None:
                try:
                    swapped = bool(swap_fn(named))
                except BaseException:
                    self._sets[target] = {}  # in case it kept some: never receive into them again
                    raise
            if not swapped:
                load_fn(named)
        except Exception as e:  # noqa: BLE001 - any engine error becomes a failed ack, with its text
            raise WeightSyncError("load", f"loading version {announce.version} failed: {e}") from e
        if swapped:
            self._live = target if self.reuse_buffers else None
        self.last_swapped = swapped
        checksum = ""
        if self.checksum and checksum_received:
            checksum = combine_digests((n, plan.dtypes[i], plan.shapes[i], digests[n])
                                       for i, n in enumerate(plan.names))
        elif self.checksum and read_back is not None:  # else nothing proves the load: the learner skips it
            checksum = self._proof(plan, named, digests if swapped else None, read_back)
        return checksum, deadline.elapsed()

    @staticmethod
    def _proof(plan: Any, named: list[tuple[str, Any]], digests: dict[str, bytes] | None,
               read_back: ReadBackFn) -> str:
        """Checksum of the engine's parameters: the early digests when every one read back is the
        very tensor hashed, else a fresh hash of what was read back."""
        held = [(n, t) for n, t in read_back() if n in plan.index]
        if digests is not None and len(digests) == len(plan.names):
            staged = dict(named)

            def same(n: str, t: Any) -> bool:
                s = staged.get(n)
                return (s is not None and t.data_ptr() == s.data_ptr() and t.shape == s.shape
                        and t.stride() == s.stride() and t.dtype == s.dtype and t.device == s.device)

            if len(held) == len(plan.names) and all(same(n, t) for n, t in held):
                return combine_digests((n, plan.dtypes[i], plan.shapes[i], digests[n])
                                       for i, n in enumerate(plan.names))
        return tensor_checksum(held)

    def _receive_buckets(self, store: Any, announce: Any, plan: Any, deadline: Deadline, target: int,
                         early: bool) -> tuple[list[tuple[str, Any]], dict[str, bytes]]:
        """Receive every bucket into buffer set `target`; (named views in layout order, digests if early)."""
        if self._group is not None and self._group[0] == announce.group:
            pg = take_group(self._group[1])  # the learner reuses the last sync's group (same members)
            self._group = None
        else:
            self._drop_group()
            pg = make_group(announce.rendezvous_host, announce.rendezvous_port, announce.group, announce.rank,
                            announce.world_size, deadline.check("rendezvous"), announce.backend,
                            secret=announce.secret, store=store)
        try:
            out = self._receive_into(pg, announce, plan, deadline, target, early)
        except BaseException:
            del pg  # at once (the caller clears the frames below that hold it): the learner fails now
            raise
        self._group = (announce.group, keep_group(pg))  # everything arrived: kept for the next sync in it
        return out

    def _receive_into(self, pg: Any, announce: Any, plan: Any, deadline: Deadline, target: int,
                      early: bool) -> tuple[list[tuple[str, Any]], dict[str, bytes]]:
        wire = InFlight(deadline, announce.backend, pg, f"sync {announce.sync_id}")
        named: list[tuple[str, Any]] = []
        digests = Digests(early)  # XXH3 hashes in worker threads, while later buckets are on the wire
        try:
            done = self._receive_all(wire, pg, announce, plan, deadline, target, named, digests)
            seal = torch.empty(SEAL_BYTES, dtype=torch.uint8, device=bucket_device(announce.backend))
            wire.post(len(plan.buckets), broadcast_bucket(pg, seal, deadline, "seal"), seal)
            wire.drain()
        finally:
            digests.close()
        self._check_seal(announce, plan, named, done, bytes(seal.cpu().numpy()))
        return named, done

    @staticmethod
    def _check_seal(announce: Any, plan: Any, named: list[tuple[str, Any]], digests: dict[str, bytes],
                    seal: bytes) -> None:
        """WeightSyncError('forged') unless the seal is the learner's and what arrived is what it sealed."""
        sealed = open_seal(announce.secret, announce.sync_id, announce.version, seal)
        if not sealed:
            return  # weights.checksum off at the learner: the seal vouches for the sender, not the bytes
        if len(digests) != len(plan.names):  # not hashed on arrival (checksum off here): hash them now
            hashing = Digests(True)
            try:
                for n, t in named:
                    hashing.add(n, t)
                digests = hashing.result()
            finally:
                hashing.close()
        arrived = combine_digests((n, plan.dtypes[i], plan.shapes[i], digests[n]) for i, n in enumerate(plan.names))
        if arrived != sealed:
            raise WeightSyncError("forged", f"sync {announce.sync_id}: what arrived (checksum {arrived}) is not what "
                                  f"the learner sealed ({sealed}): changed in transit; nothing was installed")

    def _receive_all(self, wire: InFlight, pg: Any, announce: Any, plan: Any, deadline: Deadline, target: int,
                     named: list[tuple[str, Any]], digests: Digests) -> dict[str, bytes]:
        device = bucket_device(announce.backend)
        stage = torch.device("cpu") if self.stage_on_host else device
        ring = self.ring if self.ring is not None else (self.stage_on_host and device.type != "cpu")
        posted = 0

        def arrive(done: list[tuple[int, Any]]) -> None:
            for b, (views, buf, wire_buf) in done:
                if wire_buf is not buf:
                    buf.copy_(wire_buf)  # ring slot -> host staging (the collective has completed)
                if self.on_bucket is not None:
                    self.on_bucket(b, len(plan.buckets))
                if digests.enabled:
                    for n, v in views:
                        digests.add(n, v)

        for b, (first, end, count) in enumerate(plan.buckets):
            buf = self._buffer(target, b, count, plan.dtypes[first], stage)
            views = list(zip(plan.names[first:end], unflatten(buf, plan.shapes[first:end]), strict=True))
            named.extend(views)
            if count:
                done = wire.room()
                if ring:  # the slot this post takes was held by the bucket `room()` just completed
                    arrive(done)
                    done = []
                    wire_buf = self._ring_slot(posted % MAX_IN_FLIGHT, count, plan.dtypes[first], device)
                else:
                    wire_buf = buf
                wire.post(b, broadcast_bucket(pg, wire_buf, deadline, f"bucket {b}"), (views, buf, wire_buf))
                posted += 1
                arrive(done)
            else:
                arrive(wire.drain() + [(b, (views, buf, buf))])  # keep on_bucket in bucket order
        arrive(wire.drain())
        return digests.result()

    def _ring_slot(self, slot: int, count: int, dtype: str, device: Any) -> Any:
        """Device buffer `slot` of the ring (one per dtype, grown to the largest bucket seen)."""
        buf = self._ring.get((slot, dtype))
        if buf is None or buf.numel() < count:
            buf = self._ring[(slot, dtype)] = torch.empty(count, dtype=torch_dtype(dtype), device=device)
        return buf[:count]

    def _buffer(self, target: int, b: int, count: int, dtype: str, device: Any) -> Any:
        pin = self.stage_on_host and device.type == "cpu" and torch.cuda.is_available()  # fast copies from the ring
        if not self.reuse_buffers:
            return torch.empty(count, dtype=torch_dtype(dtype), device=device, pin_memory=pin)
        key = (dtype, b, str(device))
        buffers = self._sets[target]
        buf = buffers.get(key)
        if buf is None or buf.numel() < count:
            buf = buffers[key] = torch.empty(count, dtype=torch_dtype(dtype), device=device, pin_memory=pin)
        return buf[:count]

    def _report_failure(self, store: Any, announce: Any, err: WeightSyncError) -> None:
        """Tell the learner this actor is alive (best effort: the learner may be gone too)."""
        if store is None:
            return
        try:
            group_store(store, announce.group, announce.secret).set(failure_key(announce.rank), err.reason)
        except Exception:  # noqa: BLE001 - the store died with the learner; the ack path reports it
            self._store = None
