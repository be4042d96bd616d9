"""Learner side of the weight sync: plan, announce, broadcast, collect the acks (design §6).

Guarantees:
* One rendezvous TCPStore lives as long as the publisher, listening on `host` only (a wildcard
  host: every interface) at `weights.rendezvous_port` (0 = ephemeral; `.port` is the bound port);
  announcements tell members to dial `advertise` (default: `host`). A sync builds a group on a
  fresh random prefix (`new_group_name`): learner rank 0, members rank 1..k in the order given,
  so a rebuilt group never meets an old one. A successful sync's group is kept and reused by the
  next sync whose members and membership `epoch` (who registered when) are the same, so an NCCL
  communicator is built once per membership, not per sync; any change or failure drops it.
  Members registered after `prepare` join at the next sync.
* `broadcast` returns by the deadline (`weights.timeout_s` for rendezvous + every bucket), whatever
  the members do: a dead member makes gloo raise, a stalled one trips the deadline. It never
  raises for a member's fault; it reports `SyncResult(ok=False, ...)`. It raises only for the
  caller's own mistakes (a tensor missing from / not in the plan, wrong shape or dtype).
* Tensors are consumed from an iterator once, in any order (ZeRO-3: gathered one by one on rank 0).
  A tensor of at least `SOLO_BYTES` has a bucket of its own and, when contiguous and on the
  bucket device, is broadcast straight from its memory (no flatten copy; the publisher holds a
  reference until it is sent, so the caller may drop it after the next `next()`, but must not
  modify it in place before `broadcast` returns). Smaller tensors are copied into pooled bucket
  buffers at once. Buckets go out in layout order, up to `weightsync.MAX_IN_FLIGHT` posted at once (of
  them at most `POOLED_IN_FLIGHT` flattened ones: extra memory <= 3 buckets), so the next bucket
  is filled (and hashed) while earlier ones are on the wire.
* The backend is NCCL when every member and the learner have CUDA and no two of them compute on
  one GPU (by their GPU UUIDs: the learner's `gpu`, each member's from its Register), else gloo;
  the first sync that falls back to gloo for a shared GPU says so in the log (design §6.1).
* With `weights.checksum`, `SyncResult.checksum` is `tensor_checksum` of exactly what was sent;
  an actor's WeightAck must carry the same string (`check_ack`).
* Only holders of the sync's secret shape it (design §6.1): each sync has a fresh `secret`,
  sent to each member in its WeightAnnounce (over the CURVE-authenticated control plane) and
  never written to the store; the group forms on a `SealedStore` of it, the last broadcast is the
  seal (`make_seal`: the checksum of what was sent, MAC'd with the secret), and a member's "alive,
  but failed" report counts only when MAC'd with it. A rogue store client can make a sync fail
  (within its deadline), not change what a member installs or keep a dead member.

Driving it (learner process)::

    pub = WeightPublisher(cfg.weights, bind_host, advertise=host, gpu=uuid)  # once; advertise host:pub.port
    plan = pub.plan(meta_or_named, version)                    # names/shapes/dtypes, no data
    sync = pub.prepare(plan, members, all_have_cuda, gpus)     # sync.announcements[i] -> members[i]
    ... send each WeightAnnounce over the control channel ...
    outcome = pub.publish(sync, trainer.named_parameters_for_sync(), acks_queue)
    confirm outcome.confirmed (they hold the version), keep outcome.kept pending (alive, failed:
    they get the next sync), drop outcome.dropped (member -> reason).

`publish` is `broadcast` (the buckets, `SyncResult`) and then the acks: each WeightAck of this
sync is checked by `check_ack` (version, ok, the checksum sent), until every member that received
everything answered or the deadline passed; a member whose ack is missing or wrong is dropped.
"""

from __future__ import annotations

import gc
import logging
import queue
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.config import WeightsConfig
from common.wire import WeightAnnounce
from weightsync.buckets import InFlight, broadcast_bucket
from weightsync.errors import Deadline, WeightSyncError
from weightsync.group import (
    bucket_device,
    connect_store,
    drop_group_later,
    keep_group,
    make_group,
    new_group_name,
    release_group,
    resolve_backend,
    shared_gpus,
    take_group,
)
from weightsync.layout import SyncPlan, dtype_name, plan_layout, torch_dtype
from weightsync.seal import Digests, combine_digests, failure_key, group_store, make_seal, new_secret, tensor_digest

log = logging.getLogger(__name__)

ACK_GRACE_S = 5.0  # after the last bucket: time for members to load, checksum and ack
REPORT_GRACE_S = 2.0  # after a failure: how long members get to say "alive, but failed" via the store
POOLED_IN_FLIGHT = 2  # flattened buckets on the wire at once (bounds the learner's extra memory)
SOLO_BYTES = 8 << 20  # a tensor this large gets its own bucket and is sent without a copy (below it,
# flattening is cheaper than one more collective: measured with bench/weights.py)


@dataclass(frozen=True)
class PreparedSync:
    """One sync about to happen; `announcements[i]` goes to `members[i]` (rank i + 1)."""

    sync_id: int
    group: str
    backend: str
    plan: SyncPlan
    members: list[str]
    announcements: list[Any]  # common.wire.WeightAnnounce
    epoch: Any = None  # the membership it was prepared for (None: never reuse its group)
    reuse: bool = False  # runs on the group kept from the previous sync
    secret: str = field(default="", repr=False)  # this sync's secret (hex), sent only in the announcements


@dataclass
class SyncResult:
    """What one broadcast achieved (learner side; acks come separately over the control plane)."""

    sync_id: int
    version: int
    ok: bool
    ok_members: list[str]  # received every bucket as far as the transport can tell
    failed_members: list[str]  # dead or unresponsive: drop them
    aborted_members: list[str] = field(default_factory=list)  # alive, reported the failure: keep them
    reason: str = "ok"  # "ok" or a SYNC_FAILURE_REASONS label: timeout, actor_lost, forged, error
    error: str = ""
    seconds: float = 0.0
    bytes: int = 0
    checksum: str = ""


@dataclass
class SyncOutcome:
    """What one whole sync (broadcast and acks) decided for each member (`WeightPublisher.publish`)."""

    result: SyncResult
    confirmed: list[str]  # received, installed and acked the checksum sent: they hold the version now
    kept: list[str]  # alive but failed (their "alive, failed" report): they stay and get the next sync
    dropped: dict[str, str]  # member -> why it failed (a SYNC_ERROR_REASONS label, "checksum", "version")
    acks: dict[str, dict[str, Any]]  # member -> {"problem": None or the reason, "checksum": what it acked}


def _meta_of(item: Any) -> tuple[str, Sequence[int], Any]:
    """(name, shape, dtype) from a (name, tensor) pair or a (name, shape, dtype) triple."""
    if len(item) == 3:
        return item[0], item[1], item[2]
    name, t = item
    return name, tuple(getattr(t, "ds_shape", t.shape)), t.dtype


class WeightPublisher:
    """Learner rank 0's end of the weight sync; see the module docstring for the protocol."""

    def __init__(self, cfg: WeightsConfig, host: str, *, advertise: str | None = None,
                 solo_bytes: int | None = SOLO_BYTES, gpu: str = ""):
        self.cfg = cfg
        self.gpu = gpu  # the learner's GPU UUID ("" = none): a member on it rules NCCL out
        self._told_shared = False  # the gloo fallback for a shared GPU is logged once
        self.solo_bytes = solo_bytes  # None: pack every tensor into buckets (always one flatten copy)
        self.host = host  # the store listens here (a wildcard: on every interface)
        self.advertise = advertise or host  # members dial this (learner.main: advertised_host)
        self.store = connect_store(host, cfg.rendezvous_port, cfg.timeout_s, is_master=True)
        self.port: int = int(self.store.port)
        self._next_sync_id = 0
        self._pool: dict[tuple[str, str], list[Any]] = {}  # (dtype, device) -> free bucket buffers
        # the last sync's group, kept for the next one: (group, members, backend, epoch, keep_group holder)
        self._kept: tuple[str, tuple[str, ...], str, Any, list] | None = None

    def _take_buffer(self, count: int, dtype: str, device: Any) -> Any:
        """A 1-D buffer of `count` elements, a view of a pooled one when one is large enough
        (fresh memory costs page faults that are several times the copy itself)."""
        free = self._pool.setdefault((dtype, str(device)), [])
        for k, buf in enumerate(free):
            if buf.numel() >= count:
                return free.pop(k)[:count]
        return torch.empty(count, dtype=torch_dtype(dtype), device=device)

    def _give_back(self, buf: Any, dtype: str, device: Any) -> None:
        base = buf._base if buf._base is not None else buf
        free = self._pool.setdefault((dtype, str(device)), [])
        if len(free) < POOLED_IN_FLIGHT + 1:  # steady state: POOLED_IN_FLIGHT on the wire, one filling
            free.append(base)

    # ---------------------------------------------------------------- planning and announcing
    def plan(self, named: Iterable[Any], version: int) -> SyncPlan:
        """Layout for (name, tensor) pairs or (name, shape, dtype) triples (ZeRO-3: use ds_shape)."""
        bucket_bytes = max(1, int(self.cfg.bucket_mb * (1 << 20)))
        return plan_layout((_meta_of(x) for x in named), bucket_bytes, version, solo_bytes=self.solo_bytes)

    def prepare(self, plan: SyncPlan, members: Sequence[str], all_have_cuda: bool = False,
                gpus: Sequence[str] = (), epoch: Any = None) -> PreparedSync:
        """Allocate a sync id and group, and build one WeightAnnounce per member (rank = index + 1).

        `all_have_cuda`: every member has CUDA; `gpus`: their GPU UUIDs ("" = none or unknown), for
        the backend (`resolve_backend`, with the learner's own CUDA and `gpu`).
        `epoch` names the membership (e.g. each member's registration time): the group kept from
        the previous sync is reused when members, backend and epoch are the same (None: never)."""
        if len(set(members)) != len(members):
            raise ValueError(f"duplicate sync members: {list(members)}")
        if gpus and len(gpus) != len(members):
            raise ValueError(f"{len(gpus)} GPU UUIDs for {len(members)} sync members")
        sync_id = self._next_sync_id
        self._next_sync_id += 1
        cuda = all_have_cuda and torch.cuda.is_available()
        placed = [("learner", self.gpu), *zip(members, gpus or [""] * len(members), strict=True)]
        backend = resolve_backend(self.cfg.backend, cuda, [g for _, g in placed])
        shared = shared_gpus([g for _, g in placed])
        if cuda and shared and not self._told_shared:
            self._told_shared = True
            log.warning("weight sync over gloo, not NCCL: %s share a GPU (%s), and NCCL refuses two ranks on one "
                        "device; give each a GPU of its own for NCCL",
                        ", ".join(n for n, g in placed if g in shared), ", ".join(shared))
        kept = self._kept
        reuse = epoch is not None and kept is not None and kept[1:4] == (tuple(members), backend, epoch)
        group = kept[0] if reuse else new_group_name()
        secret = new_secret()  # per sync: a kept group's next sync has a new one (for its seal and reports)
        world = len(members) + 1
        announcements = [
            WeightAnnounce(sync_id=sync_id, version=plan.version, group=group, rank=i + 1, world_size=world,
                           backend=backend, rendezvous_host=self.advertise, rendezvous_port=self.port,
                           timeout_s=float(self.cfg.timeout_s), names=list(plan.names),
                           shapes=[list(s) for s in plan.shapes], dtypes=list(plan.dtypes),
                           buckets=[list(b) for b in plan.buckets], secret=secret)
            for i in range(len(members))
        ]
        return PreparedSync(sync_id, group, backend, plan, list(members), announcements, epoch, reuse, secret)

    # ---------------------------------------------------------------- the broadcast
    def broadcast(self, sync: PreparedSync, named_tensors: Iterable[tuple[str, Any]]) -> SyncResult:
        """Form the group, broadcast every bucket from rank 0, release the group (see module doc)."""
        deadline = Deadline(self.cfg.timeout_s)
        result = SyncResult(sync.sync_id, sync.plan.version, ok=False, ok_members=[], failed_members=[])
        if not sync.members:
            result.ok, result.checksum = True, self._checksum_only(sync.plan, named_tensors)
            return result
        pg = None
        try:
            self.store.set_timeout(deadline.timedelta("rendezvous"))
            if sync.reuse and self._kept is not None and self._kept[0] == sync.group:
                pg = take_group(self._kept[4])  # the members hold it too: no rendezvous, no new communicator
                self._kept = None
            else:
                self.release_kept()
                pg = make_group(self.host, self.port, sync.group, 0, len(sync.members) + 1, deadline.remaining(),
                                sync.backend, secret=sync.secret, store=self.store)
            result.checksum, result.bytes = self._send_all(pg, sync, named_tensors, deadline)
            result.ok, result.ok_members = True, list(sync.members)
            if sync.epoch is not None:  # kept for the next sync of the same membership
                self._kept = (sync.group, tuple(sync.members), sync.backend, sync.epoch, keep_group(pg))
                pg = None
            else:
                holder, pg = [pg], None
                drop_group_later(holder)  # every member has it all: its teardown need not delay us
        except WeightSyncError as e:
            traceback.clear_frames(e.__traceback__)  # the frames below hold the group
            result.reason = e.reason if e.reason in ("timeout", "forged") else "actor_lost"
            result.error = str(e)
        except BaseException as e:  # the caller's mistake (ValueError) or an interrupt: re-raised,
            traceback.clear_frames(e.__traceback__)  # but first the group goes, so members fail now
            raise
        finally:
            del pg  # closes the group's sockets: members still blocked on it fail at once
            if not result.ok:
                gc.collect()  # in case a traceback cycle still holds the group
            result.seconds = deadline.elapsed()
        if not result.ok:
            result.aborted_members = self._collect_reports(sync, deadline)
            result.failed_members = [m for m in sync.members if m not in result.aborted_members]
            result.seconds = deadline.elapsed()
        return result

    def _send_all(self, pg: Any, sync: PreparedSync, named_tensors: Iterable[tuple[str, Any]],
                  deadline: Deadline) -> tuple[str, int]:
        plan, device = sync.plan, bucket_device(sync.backend)
        bucket_of, offsets = plan.bucket_of(), plan.offsets()
        missing = [b[1] - b[0] for b in plan.buckets]  # tensors each bucket still waits for
        ready: dict[int, tuple[Any, bool]] = {}  # bucket -> (1-D tensor to send, pooled buffer?)
        digests = Digests(self.cfg.checksum)  # XXH3 hashes in worker threads, while buckets are on the wire
        wire = InFlight(deadline, sync.backend, pg, f"sync {sync.sync_id}")
        next_send, sent_bytes = 0, 0

        def release(done: list[tuple[int, Any]]) -> None:
            for b, (buf, pooled) in done:
                if pooled:
                    self._give_back(buf, plan.dtypes[plan.buckets[b][0]], device)

        def send_ready() -> None:
            nonlocal next_send, sent_bytes
            while next_send < len(plan.buckets) and missing[next_send] == 0:
                buf, pooled = ready.pop(next_send)
                if buf.numel():
                    release(wire.room())
                    wire.post(next_send, broadcast_bucket(pg, buf, deadline, f"bucket {next_send}"), (buf, pooled))
                    sent_bytes += buf.numel() * buf.element_size()
                elif pooled:
                    self._give_back(buf, plan.dtypes[plan.buckets[next_send][0]], device)
                next_send += 1

        try:
            for name, t in named_tensors:
                i = plan.index.get(name)
                if i is None or name in digests:
                    what = "sent twice" if i is not None else "not in the plan"
                    raise ValueError(f"broadcast: tensor {name!r} is {what} of sync {sync.sync_id}; "
                                     "pass exactly the tensors the plan was made from")
                if list(t.shape) != plan.shapes[i] or dtype_name(t.dtype) != plan.dtypes[i]:
                    raise ValueError(f"broadcast: {name!r} is {list(t.shape)} {t.dtype}, the plan says "
                                     f"{plan.shapes[i]} {plan.dtypes[i]}")
                b = bucket_of[i]
                src = t.detach()
                first, end, count = plan.buckets[b]
                if end - first == 1 and src.is_contiguous() and src.device == device:
                    ready[b] = (src.reshape(-1), False)  # a bucket of its own: sent from its memory, no copy
                else:
                    if b not in ready:
                        while sum(pooled for _, pooled in wire.holds()) >= POOLED_IN_FLIGHT:
                            release(wire.oldest())  # memory: at most POOLED_IN_FLIGHT + 1 flattened buckets
                        ready[b] = (self._take_buffer(count, plan.dtypes[i], device), True)
                    ready[b][0][offsets[i]:offsets[i] + src.numel()].copy_(src.reshape(-1))
                missing[b] -= 1
                send_ready()
                digests.add(name, src)
            if len(digests) != len(plan.names):
                absent = [n for n in plan.names if n not in digests]
                raise ValueError(f"broadcast: {len(absent)} planned tensors never came, e.g. {absent[:3]}")
            release(wire.drain())
            done = digests.result()
            checksum = combine_digests((n, plan.dtypes[i], plan.shapes[i], done[n]) for i, n in enumerate(plan.names)) \
                if self.cfg.checksum else ""
            seal = torch.frombuffer(bytearray(make_seal(sync.secret, sync.sync_id, plan.version, checksum)),
                                    dtype=torch.uint8).to(device)
            wire.post(len(plan.buckets), broadcast_bucket(pg, seal, deadline, "seal"), (seal, False))
            wire.drain()
            return checksum, sent_bytes
        finally:
            digests.close()

    def _checksum_only(self, plan: SyncPlan, named_tensors: Iterable[tuple[str, Any]]) -> str:
        if not self.cfg.checksum:
            return ""
        entries = []
        for name, t in named_tensors:
            i = plan.index[name]
            entries.append((name, plan.dtypes[i], plan.shapes[i], tensor_digest(t)))
        return combine_digests(entries)

    def _collect_reports(self, sync: PreparedSync, deadline: Deadline) -> list[str]:
        """Members that wrote `<group>/failed/<rank>` (alive, they saw the sync fail) with the sync's
        secret, within a short grace; a report without a valid MAC (a rogue's) is no proof of life."""
        reports = group_store(self.store, sync.group, sync.secret)
        keys = {m: failure_key(r + 1) for r, m in enumerate(sync.members)}
        until = time.monotonic() + min(REPORT_GRACE_S, deadline.remaining())
        alive: list[str] = []
        while True:
            for m, k in keys.items():
                if m not in alive and reports.check([k]):
                    # a get never blocks past the grace, even if a rogue deletes the key after the check
                    self.store.set_timeout(timedelta(seconds=max(0.05, until - time.monotonic())))
                    try:
                        reports.get(k)
                        alive.append(m)
                    except (RuntimeError, dist.DistError):  # forged, or deleted since the check
                        pass
            if len(alive) == len(keys) or time.monotonic() >= until:
                break
            time.sleep(0.02)
        return [m for m in sync.members if m in alive]

    # ---------------------------------------------------------------- acks
    def publish(self, sync: PreparedSync, named_tensors: Iterable[tuple[str, Any]], acks: Any) -> SyncOutcome:
        """Broadcast (`broadcast`), then collect the members' WeightAcks from `acks` (a queue.Queue
        the control plane fills) until every member that received everything answered or the
        sync's deadline passes (`weights.timeout_s` from now, at least `ACK_GRACE_S` after the last
        bucket). Acks of other syncs are discarded. Call it once the announcements are sent."""
        deadline = time.monotonic() + self.cfg.timeout_s
        result = self.broadcast(sync, named_tensors)
        deadline = max(deadline, time.monotonic() + ACK_GRACE_S)
        problems: dict[str, str | None] = {}  # member -> None (confirmed) or the failure reason
        checksums: dict[str, str] = {}
        waiting = set(result.ok_members) | set(result.aborted_members)
        while waiting - set(problems) and time.monotonic() < deadline:
            try:
                ack = acks.get(timeout=0.1)
            except queue.Empty:
                continue
            if ack.actor_id in waiting and ack.sync_id == sync.sync_id:
                problems[ack.actor_id] = self.check_ack(sync, result, ack)
                checksums[ack.actor_id] = ack.checksum
        confirmed = [m for m in result.ok_members if m in problems and problems[m] is None]
        kept = [m for m in sync.members if m not in confirmed and m in result.aborted_members]
        dropped = {}
        for m in sync.members:
            if m not in confirmed and m not in kept:
                reason = problems.get(m) or (result.reason if m in result.failed_members else "timeout")
                dropped[m] = reason if reason != "ok" else "timeout"
        return SyncOutcome(result, confirmed, kept, dropped,
                           {m: {"problem": r, "checksum": checksums[m]} for m, r in problems.items()})

    @staticmethod
    def check_ack(sync: PreparedSync, result: SyncResult, ack: Any) -> str | None:
        """None when `ack` (a WeightAck) confirms this sync, else the failure reason label."""
        if ack.sync_id != sync.sync_id or ack.version != sync.plan.version:
            return "version"
        if not ack.ok:
            return "error"
        if result.checksum and ack.checksum != result.checksum:
            return "checksum"
        return None

    def release_kept(self) -> None:
        """Drop the group kept from the last sync (the next sync builds a new one)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            release_group(kept[4])

    def close(self) -> None:
        """Drop the kept group and stop hosting the rendezvous store."""
        self.release_kept()
        self.store = None
