"""The actor's side of the credit protocol (design §5.6): what it may send, and the sending itself.

A registration (one Welcome) numbers its trees 1, 2, ... in the order they are handed to ZeroMQ;
each tree carries `meta['registration']` and `meta['seq']`. The learner's Credit messages say
up to which seq the actor may send (a cumulative `limit`), so the actor's credits are
`limit - sent`, and a Credit that is lost or repeated changes nothing. Guarantees:

* a tree is charged only to the registration it was stamped with, and only once it was handed to
  ZeroMQ: a Welcome landing while a send blocks leaves the new registration's credits whole
  (the learner, seeing the old stamp, does not charge it either);
* no credit before the learner confirms this registration's weights (Welcome carries none);
* when the learner is lost, `lose()` returns the trees handed to it that it had not yet reported
  settled (trained or dropped) -- trees, never unused credits.
"""

from __future__ import annotations

import threading

from common.wire import Credit, Welcome, encode_tree


class Credits:
    """Registration and credit state; thread-safe (the control thread applies messages, the main
    thread stamps and charges trees)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.incarnation = -1  # learner incarnation of the last Welcome (-1: not registered)
        self.registration = -1
        self.limit = 0  # may send trees up to this seq
        self.sent = 0  # trees handed to ZeroMQ under this registration (the last seq)
        self.settled = 0  # of those, the learner is done with this many

    @property
    def available(self) -> int:
        """Trees it may still send under this registration."""
        with self._lock:
            return max(0, self.limit - self.sent)

    def budget(self) -> tuple[int, int]:
        """(incarnation, available), read together."""
        with self._lock:
            return self.incarnation, max(0, self.limit - self.sent)

    def welcome(self, msg: Welcome) -> None:
        with self._lock:
            self.incarnation, self.registration = msg.incarnation, msg.registration
            self.limit = self.sent = self.settled = 0

    def credit(self, msg: Credit) -> bool:
        """Apply a Credit; False when it comes from another learner incarnation (register again).
        A Credit of another registration (an old one's, still on the way) is ignored."""
        with self._lock:
            if msg.incarnation != self.incarnation:
                return False
            if msg.registration == self.registration:
                self.limit = max(self.limit, msg.limit)
                self.settled = max(self.settled, min(msg.settled, self.sent))
            return True

    def lose(self) -> int:
        """Forget the registration; returns the trees sent under it that were not reported settled."""
        with self._lock:
            unsettled = self.sent - self.settled
            self.incarnation = self.registration = -1
            self.limit = self.sent = self.settled = 0
            return unsettled

    def stamp(self) -> tuple[int, int, int]:
        """(incarnation, registration, seq) for the next tree to send."""
        with self._lock:
            return self.incarnation, self.registration, self.sent + 1

    def charge(self, registration: int, seq: int) -> bool:
        """The tree stamped (registration, seq) was handed to ZeroMQ: spend its credit, unless a new
        registration came in between (then it is not this registration's tree)."""
        with self._lock:
            if registration != self.registration or seq != self.sent + 1:
                return False
            self.sent = seq
            return True

    def heartbeat_fields(self) -> dict[str, int]:
        with self._lock:
            return {"registration": self.registration, "trees_sent": self.sent,
                    "credits": max(0, self.limit - self.sent)}


class TreeSender:
    """Hands finished trees to the data socket, stamped and charged to the right registration."""

    def __init__(self, net, credits: Credits, metrics, stop: threading.Event, *, retry_s: float = 0.5) -> None:
        self.net, self.credits, self.metrics, self.stop = net, credits, metrics, stop
        self.retry_s = retry_s

    def send(self, tree, incarnation: int) -> bool:
        """Send one tree made for learner `incarnation`; give up (and count it) only if that learner
        is gone or the actor stops. Returns True once ZeroMQ has the tree."""
        blocked0 = self.net.blocked_seconds
        stamped, buf = None, b""
        try:
            while True:
                if self.stop.is_set():
                    self.metrics.trees_lost("shutdown")
                    return False
                now_incarnation, registration, seq = self.credits.stamp()
                if now_incarnation != incarnation:
                    self.metrics.trees_lost("incarnation")
                    return False
                if stamped != (registration, seq):  # first try, or a new registration since the last
                    tree.meta["registration"], tree.meta["seq"] = registration, seq
                    buf, stamped = encode_tree(tree), (registration, seq)
                if self.net.send_tree(buf, timeout_s=self.retry_s):
                    self.credits.charge(registration, seq)
                    self.metrics.credits.set(self.credits.available)
                    self.metrics.trees.inc()
                    return True
        finally:
            self.metrics.send_blocked_seconds.inc(self.net.blocked_seconds - blocked0)
