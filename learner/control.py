"""The learner's control plane: registration, heartbeats, credits, weight acks (design §5.3, §5.4, §6.5).

One thread owns the ROUTER socket (ZeroMQ sockets are single-threaded); other threads hand it
messages through `send()`, a thread-safe queue drained every poll. Guarantees:

* an actor is a *member* from its Register until it is silent for `transport.peer_timeout_s`,
  says Shutdown, or fails a weight sync; a member that registers again (restart, reconnect)
  starts over: no credits, weights pending;
* every member gets the current weights before its first tree counts: a newly (re)registered
  member is *pending* until a sync that includes it succeeds (`pending()`), and the learner
  runs such a sync between steps;
* credits: Welcome carries the initial grant; each heartbeat is answered with a Credit carrying
  whatever the buffer lets the actor have now (0 is an ack), so a lost Credit only delays.
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
    version: int = -1  # weights confirmed by a WeightAck
    pending: bool = True  # needs the current weights before its trees count
    trees_sent: int = 0


@dataclass
class ControlState:
    incarnation: int
    version: int
    max_staleness: int
    rendezvous_host: str
    rendezvous_port: int
    members: dict[str, Member] = field(default_factory=dict)


class ControlPlane:
    def __init__(self, endpoints: LearnerEndpoints, buffer, state: ControlState, *, peer_timeout_s: float,
                 metrics=None, poll_s: float = 0.02) -> None:
        self.endpoints = endpoints
        self.buffer = buffer
        self.state = state
        self.peer_timeout_s = peer_timeout_s
        self.metrics = metrics
        self.poll_s = poll_s
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
            self._drain_outgoing()
            try:
                got = self.endpoints.recv_control(self.poll_s)
            except WireError as e:
                if self.metrics is not None:
                    self.metrics.wire_error(e.reason)
                log.warning("bad control message from %r: %s", getattr(e, "identity", b"?"), e)
                continue
            if got is not None:
                identity, msg = got
                self._handle(identity.decode(errors="replace"), msg)
            now = time.monotonic()
            if now - last_sweep > 0.5:
                last_sweep = now
                self._sweep(now)
            elif self._grant_soon.is_set():
                self._grant_soon.clear()
                self._grant_ready()
        self._drain_outgoing()

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
            with self.lock:
                self.state.members[identity] = Member(identity, now, now, msg.has_cuda)
                st = self.state
            credits = self.buffer.register_actor(identity)
            self._send_now(identity, Welcome(
                incarnation=st.incarnation, version=st.version, credits=credits, max_staleness=st.max_staleness,
                rendezvous_host=st.rendezvous_host, rendezvous_port=st.rendezvous_port,
            ))
            log.info("actor %s registered (pid %d on %s, engine %s)", identity, msg.pid, msg.hostname, msg.engine)
            self._update_gauges()
        elif isinstance(msg, Heartbeat):
            with self.lock:
                member = self.state.members.get(identity)
                if member is not None:
                    member.last_seen, member.trees_sent = now, msg.trees_sent
                st = self.state
            if member is None:  # dropped (e.g. a failed sync) or registered with another incarnation
                self._send_now(identity, Rejoin(incarnation=st.incarnation, reason="not a member of this learner"))
                return
            grant = self.buffer.grant_credits(identity) if not member.pending else 0
            self._send_now(identity, Credit(incarnation=st.incarnation, version=st.version, credits=grant))
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

    def _sweep(self, now: float) -> None:
        with self.lock:
            silent = [a for a, m in self.state.members.items() if now - m.last_seen > self.peer_timeout_s]
        for actor_id in silent:
            self.drop(actor_id, f"silent for more than {self.peer_timeout_s:.0f} s")
        self._grant_ready()
        self._update_gauges()

    def _grant_ready(self) -> None:
        with self.lock:
            st = self.state
            ready = [a for a, m in st.members.items() if not m.pending]
        for actor_id in ready:  # pending members get credit once their weights are confirmed
            n = self.buffer.grant_credits(actor_id)
            if n > 0:
                self._send_now(actor_id, Credit(incarnation=st.incarnation, version=st.version, credits=n))

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            with self.lock:
                self.metrics.actors_registered.set(len(self.state.members))
