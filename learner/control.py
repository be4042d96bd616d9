"""The learner's control plane: registration, heartbeats, credits, weight acks (design §5.3, §5.4, §6.5).

One thread owns the ROUTER socket (ZeroMQ sockets are single-threaded); other threads hand it
messages through `send()`, a thread-safe queue drained every poll. Guarantees:

* an actor is a *member* from its Register until it is silent for `transport.peer_timeout_s`,
  says Shutdown, or fails a weight sync; a member that registers again (restart, reconnect)
  starts over: no credits, weights pending;
* every member gets the current weights before its first tree counts: a newly (re)registered
  member is *pending* until a sync that includes it succeeds (`pending()`), and the learner
  runs such a sync between steps;
* credits (design §5.6): none while pending -- Welcome carries none; the confirmed members get
  theirs at the next poll after a sync (`grant_soon`) and whenever trees leave the buffer (every
  sweep). Each heartbeat is reconciled with the buffer's count (`ReplayBuffer.reconcile`: trees
  lost on the way come back as credits) and answered with a Credit restating the cumulative
  limit, so a lost Credit only delays;
* a stall is seen, not silent: confirmed members that all say they hold no credit while the
  learner waits in vain for trees for `stalled_after_s` raise `treerpo_learner_credit_stall`
  (and the TreerpoCreditStall alert), count it and log each member's counts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common.transport import LearnerEndpoints
from common.wire import Credit, Heartbeat, Register, Rejoin, Shutdown, WeightAck, Welcome, WireError

log = logging.getLogger("treerpo.learner.control")


@dataclass
class Member:
    actor_id: str
    registered_at: float
    last_seen: float
    has_cuda: bool
    gpu_uuid: str = ""  # the GPU it computes on ("" = none or unknown): members on one GPU rule NCCL out
    version: int = -1  # weights confirmed by a WeightAck
    pending: bool = True  # needs the current weights before its trees count
    registration: int = 0
    trees_sent: int = 0  # as its last heartbeat said
    credits: int = 0  # as its last heartbeat said


@dataclass
class ControlState:
    incarnation: int
    version: int
    rendezvous_host: str
    rendezvous_port: int
    members: dict[str, Member] = field(default_factory=dict)


class ControlPlane:
    def __init__(self, endpoints: LearnerEndpoints, buffer, state: ControlState, *, peer_timeout_s: float,
                 metrics=None, poll_s: float = 0.02, stalled_after_s: float = 10.0) -> None:
        self.endpoints = endpoints
        self.buffer = buffer
        self.state = state
        self.peer_timeout_s = peer_timeout_s
        self.metrics = metrics
        self.poll_s = poll_s
        self.stalled_after_s = stalled_after_s
        self.stalled = False
        self._written_off = 0  # of the buffer's written-off trees, those already in the metric
        self.lock = threading.Lock()
        self.acks: queue.Queue[WeightAck] = queue.Queue()
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._grant_soon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    # -- other threads ---------------------------------------------------------------------
    def start(self) -> ControlPlane:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():  # never started: nothing to join
            self._thread.join(timeout_s)

    def send(self, actor_id: str, msg: Any) -> None:
        self._out.put((actor_id, msg))

    def grant_soon(self) -> None:
        """Hand the confirmed members their credits at the next poll instead of the next sweep."""
        self._grant_soon.set()

    def broadcast_shutdown(self, reason: str) -> None:
        for actor_id in self.member_ids():
            self.send(actor_id, Shutdown(reason=reason))

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) until queued outgoing messages were handed to ZeroMQ."""
        deadline = time.monotonic() + timeout_s
        while not self._out.empty() and time.monotonic() < deadline:
            time.sleep(self.poll_s)

    def confirmed(self) -> list[str]:
        """Members that hold the current weights (not pending)."""
        with self.lock:
            return [a for a, m in self.state.members.items() if not m.pending]

    def member_ids(self) -> list[str]:
        with self.lock:
            return list(self.state.members)

    def pending(self) -> list[str]:
        with self.lock:
            return [a for a, m in self.state.members.items() if m.pending]

    def all_have_cuda(self, ids: list[str]) -> bool:
        with self.lock:
            return all(self.state.members[a].has_cuda for a in ids if a in self.state.members)

    def gpu_uuids(self, ids: list[str]) -> list[str]:
        """Each member's GPU UUID, in the order of `ids` ("" for none, unknown, or no longer a member)."""
        with self.lock:
            return [self.state.members[a].gpu_uuid if a in self.state.members else "" for a in ids]

    def membership(self, ids: list[str]) -> tuple:
        """Who `ids` are right now: (actor_id, registered_at) each; changes when any re-registers
        (a sync group is reused only while this stays the same)."""
        with self.lock:
            return tuple((a, self.state.members[a].registered_at if a in self.state.members else None) for a in ids)

    def set_version(self, version: int) -> None:
        with self.lock:
            self.state.version = version

    def confirm(self, actor_id: str, version: int) -> None:
        with self.lock:
            member = self.state.members.get(actor_id)
            if member is not None:
                member.version, member.pending = version, False

    def drop(self, actor_id: str, reason: str) -> None:
        with self.lock:
            gone = self.state.members.pop(actor_id, None)
        if gone is not None:
            self.buffer.forget_actor(actor_id)
            log.warning("dropped actor %s: %s", actor_id, reason)
        self._update_gauges()

    def is_member(self, actor_id: str) -> bool:
        with self.lock:
            m = self.state.members.get(actor_id)
            return m is not None and not m.pending

    # -- the control thread ----------------------------------------------------------------
    def _run(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            self.poll_once(self.poll_s)
            now = time.monotonic()
            if now - last_sweep > 0.5:
                last_sweep = now
                self.sweep(now)
            elif self._grant_soon.is_set():
                self._grant_soon.clear()
                self._grant_ready()
        self._drain_outgoing()

    def poll_once(self, timeout_s: float) -> bool:
        """One turn of the control thread's loop: send what is queued, then handle at most one
        message (waiting up to timeout_s); True if one was handled. Call it from one thread only:
        the control thread, or a test that drives a plane it did not start."""
        self._drain_outgoing()
        try:
            got = self.endpoints.recv_control(timeout_s)
        except WireError as e:
            if self.metrics is not None:
                self.metrics.wire_error(e.reason)
            log.warning("bad control message from %r: %s", getattr(e, "identity", b"?"), e)
            return False
        if got is None:
            return False
        identity, msg = got
        self._handle(identity.decode(errors="replace"), msg)
        return True

    def _drain_outgoing(self) -> None:
        while True:
            try:
                actor_id, msg = self._out.get_nowait()
            except queue.Empty:
                return
            self._send_now(actor_id, msg)

    def _send_now(self, actor_id: str, msg: Any) -> bool:
        """Hand msg to ZeroMQ; an undeliverable one (peer not connected, queue full) is logged --
        the protocol recovers: heartbeats re-grant credits, a missed WeightAnnounce fails that
        actor's sync, and a dropped actor is told to Rejoin."""
        ok = self.endpoints.send_control(actor_id, msg)
        if not ok:
            log.warning("could not deliver %s to actor %s", type(msg).__name__, actor_id)
        return ok

    def _handle(self, identity: str, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, Register):
            if msg.actor_id != identity:
                log.warning("Register from %r claims actor_id %r: refused", identity, msg.actor_id)
                return
            registration = self.buffer.register_actor(identity)
            with self.lock:
                self.state.members[identity] = Member(identity, now, now, msg.has_cuda, msg.gpu_uuid,
                                                      registration=registration)
                st = self.state
            self._send_now(identity, Welcome(
                incarnation=st.incarnation, version=st.version, registration=registration,
                rendezvous_host=st.rendezvous_host,
                rendezvous_port=st.rendezvous_port,
            ))
            log.info("actor %s registered (pid %d on %s, engine %s%s)", identity, msg.pid, msg.hostname, msg.engine,
                     f", {msg.gpu_uuid}" if msg.gpu_uuid else "")
            self._update_gauges()
        elif isinstance(msg, Heartbeat):
            with self.lock:
                member = self.state.members.get(identity)
                if member is not None:
                    member.last_seen, member.trees_sent, member.credits = now, msg.trees_sent, msg.credits
                st = self.state
            if member is None:  # dropped (e.g. a failed sync) or registered with another incarnation
                self._send_now(identity, Rejoin(incarnation=st.incarnation, reason="not a member of this learner"))
                return
            if member.pending:  # an ack that keeps it registered; its credits follow the weights
                self._send_now(identity, Credit(incarnation=st.incarnation, version=st.version,
                                                registration=member.registration, limit=0, settled=0))
                return
            lost = self.buffer.reconcile(identity, msg.registration, msg.trees_sent)
            if lost:
                log.warning("actor %s: %d trees it sent (registration %d, up to seq %d) never arrived: written "
                            "off, their credits granted again", identity, lost, msg.registration, msg.trees_sent)
                self._count_written_off()
            self._send_credit(identity, self.buffer.grant(identity), always=True)
        elif isinstance(msg, WeightAck):
            with self.lock:
                member = self.state.members.get(identity)
                if member is not None:
                    member.last_seen = now
            self.acks.put(msg)
        elif isinstance(msg, Shutdown):
            self.drop(identity, f"actor shut down: {msg.reason}")
        else:
            log.warning("unexpected %s from actor %s: ignored", type(msg).__name__, identity)

    def sweep(self, now: float | None = None) -> None:
        """Drop silent members, grant what the buffer frees, check for a stall (every 0.5 s)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            silent = [a for a, m in self.state.members.items() if now - m.last_seen > self.peer_timeout_s]
        for actor_id in silent:
            self.drop(actor_id, f"silent for more than {self.peer_timeout_s:.0f} s")
        self._grant_ready()
        self._check_stalled()
        self._count_written_off()  # also the seq gaps the ingest found
        self._update_gauges()

    def _count_written_off(self) -> None:
        total = self.buffer.stats().written_off
        if self.metrics is not None and total > self._written_off:
            self.metrics.credits_written_off.inc(total - self._written_off)
        self._written_off = total

    def _grant_ready(self) -> None:
        for actor_id in self.confirmed():  # pending members get credit once their weights are confirmed
            self._send_credit(actor_id, self.buffer.grant(actor_id))

    def _send_credit(self, actor_id: str, grant, *, always: bool = False) -> None:
        """Tell the actor its limit: when credits were added, or `always` (a heartbeat's answer)."""
        if grant is None or not (always or grant.added):
            return
        with self.lock:
            st = self.state
            incarnation, version = st.incarnation, st.version
        self._send_now(actor_id, Credit(incarnation=incarnation, version=version, registration=grant.registration,
                                        limit=grant.limit, settled=grant.settled))

    def _check_stalled(self) -> None:
        """Stalled: confirmed members, every one saying (last heartbeat) it holds no credit, while
        the learner has waited `stalled_after_s` for trees and none came. Credits are reconciled
        on every heartbeat, so this is a bug report: logged, counted, alerted."""
        with self.lock:
            confirmed = [(m.actor_id, m.trees_sent, m.credits) for m in self.state.members.values() if not m.pending]
            stalled = (bool(confirmed) and all(credits == 0 for _, _, credits in confirmed)
                       and self.buffer.starving_s() >= self.stalled_after_s)
        if stalled and not self.stalled:  # the counts are formatted only for the log line
            log.error("stalled: no tree for %.0f s, the buffer short of a batch, and no confirmed actor holds a "
                      "credit (%s; learner: %s)", self.stalled_after_s,
                      ", ".join(f"{a}: sent {sent}, holds {credits}" for a, sent, credits in confirmed),
                      ", ".join(f"{a}: {self.buffer.in_flight(a)} in flight" for a, _, _ in confirmed))
            if self.metrics is not None:
                self.metrics.credit_stalls.inc()
        elif self.stalled and not stalled:
            log.info("no longer stalled: trees or credits move again")
        self.stalled = stalled
        if self.metrics is not None:
            self.metrics.credit_stall.set(int(stalled))

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            with self.lock:
                self.metrics.actors_registered.set(len(self.state.members))
