"""Actor side of the weight sync: join the announced group, receive, load, checksum (DESIGN §6).

Guarantees:
* Atomic load: every bucket is received into fresh buffers first; `load_fn` runs only once all
  arrived, so a sync that fails midway leaves the engine's weights (and version) untouched.
  Cost: one extra copy of the weights in memory (on the GPU for NCCL) during a sync.
* Bounded: the whole receive (rendezvous + buckets) ends by the announcement's `timeout_s`.
  On a dead learner, a deadline or a bad announcement it raises `WeightSyncError` (with a
  `.reason`), after telling the learner "alive, but failed" through the rendezvous store
  (key ``<group>/failed/<rank>``), so the learner keeps this actor for the next sync.
* The returned checksum is `tensor_checksum` of the parameters read back after loading (when a
  `read_back` is given), so it proves what the engine holds, not just what arrived.

Driving it (actor process), on a WeightAnnounce from the control channel::

    try:
        checksum, seconds = receiver.receive(announce, lambda named: engine.load_weights(named, announce.version),
                                             read_back=engine.named_parameters_for_sync)
        send WeightAck(actor_id, announce.sync_id, announce.version, True, checksum, seconds, "")
    except WeightSyncError as e:
        send WeightAck(actor_id, announce.sync_id, announce.version, False, "", 0.0, str(e))
        keep generating with the old weights; wait for the next announcement
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from common.weightsync import (
    Deadline,
    WeightSyncError,
    broadcast_bucket,
    bucket_device,
    check_layout,
    connect_store,
    make_group,
    tensor_checksum,
    torch_dtype,
    unflatten,
    wait_work,
)

LoadFn = Callable[[list[tuple[str, Any]]], Any]
ReadBackFn = Callable[[], Iterable[tuple[str, Any]]]


class WeightReceiver:
    """Receives announced weight syncs; keeps one client connection to the rendezvous store."""

    def __init__(self, *, checksum: bool = True, reuse_buffers: bool = True,
                 on_bucket: Callable[[int, int], None] | None = None):
        self.checksum = checksum
        # Keep the receive buffers between syncs (one weight copy stays allocated; fresh memory
        # costs page faults several times the copy). Set False where memory is scarcer than time.
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[tuple[str, int, str], Any] = {}  # (dtype, bucket index, device) -> buffer
        self.on_bucket = on_bucket  # (bucket index, bucket count) after each bucket arrived; tests, progress
        self._store: Any = None
        self._store_addr: tuple[str, int] | None = None

    def reset(self) -> None:
        """Forget the store connection (the learner restarted: its store is a new one)."""
        self._store, self._store_addr = None, None

    def _client(self, host: str, port: int, timeout_s: float) -> Any:
        if self._store is None or self._store_addr != (host, port):
            self._store = connect_store(host, port, timeout_s)
            self._store_addr = (host, port)
        return self._store

    def receive(self, announce: Any, load_fn: LoadFn, read_back: ReadBackFn | None = None) -> tuple[str, float]:
        """Join `announce.group` at `announce.rank`, receive all buckets, call load_fn(named tensors)
        once, and return (checksum, seconds). Raises WeightSyncError on any failure."""
        deadline = Deadline(announce.timeout_s)
        plan = check_layout(announce.names, announce.shapes, announce.dtypes, announce.buckets, announce.version)
        if not 1 <= announce.rank < announce.world_size:
            raise WeightSyncError("invalid_announce", f"rank {announce.rank} is not a member rank of a group "
                                  f"of {announce.world_size} (rank 0 is the learner)")
        store = None
        try:
            store = self._client(announce.rendezvous_host, announce.rendezvous_port, deadline.check("connect"))
            buffers = self._receive_buckets(store, announce, plan, deadline)
        except WeightSyncError as e:
            self._report_failure(store, announce, e)
            if e.reason != "invalid_announce":
                self.reset()  # the store may be gone with its learner: reconnect next time
            raise
        named: list[tuple[str, Any]] = []
        for (first, end, _), buf in zip(plan.buckets, buffers):
            named.extend(zip(plan.names[first:end], unflatten(buf, plan.shapes[first:end])))
        try:
            load_fn(named)
        except Exception as e:  # noqa: BLE001 - any engine error becomes a failed ack, with its text
            raise WeightSyncError("load", f"loading version {announce.version} failed: {e}") from e
        del named, buffers
        checksum = ""
        if self.checksum:
            if read_back is not None:
                wanted = plan.index
                checksum = tensor_checksum((n, t) for n, t in read_back() if n in wanted)
            else:
                checksum = ""  # nothing to prove the load with; the learner then skips the comparison
        return checksum, deadline.elapsed()

    def _receive_buckets(self, store: Any, announce: Any, plan: Any, deadline: Deadline) -> list[Any]:
        import torch

        device = bucket_device(announce.backend)
        pg = make_group(announce.rendezvous_host, announce.rendezvous_port, announce.group, announce.rank,
                        announce.world_size, deadline.check("rendezvous"), announce.backend, store=store)
        try:
            buffers = []
            for b, (first, _, count) in enumerate(plan.buckets):
                buf = self._buffer(b, count, plan.dtypes[first], device)
                if count:
                    work = broadcast_bucket(pg, buf, deadline, f"bucket {b}")
                    wait_work(work, deadline, announce.backend, f"bucket {b} of sync {announce.sync_id}", pg)
                buffers.append(buf)
                if self.on_bucket is not None:
                    self.on_bucket(b, len(plan.buckets))
            return buffers
        finally:
            del pg

    def _buffer(self, b: int, count: int, dtype: str, device: Any) -> Any:
        import torch

        if not self.reuse_buffers:
            return torch.empty(count, dtype=torch_dtype(dtype), device=device)
        key = (dtype, b, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < count:
            buf = self._buffers[key] = torch.empty(count, dtype=torch_dtype(dtype), device=device)
        return buf[:count]

    def _report_failure(self, store: Any, announce: Any, err: WeightSyncError) -> None:
        """Tell the learner this actor is alive (best effort: the learner may be gone too)."""
        if store is None:
            return
        try:
            store.set(f"{announce.group}/failed/{announce.rank}", err.reason)
        except Exception:  # noqa: BLE001 - the store died with the learner; the ack path reports it
            self._store = None
