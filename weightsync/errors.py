"""How a weight sync fails, and the one deadline every wait of it shares (design §6).

* `WeightSyncError(reason, message)`: one side's part of a sync failed; `reason` is one of
  `SYNC_ERROR_REASONS` (a metric label). A publisher never raises it for a member's fault (it
  reports the member failed); a receiver raises it and tells the learner "alive, but failed".
* `Deadline`: a fixed point in monotonic time; each collective, rendezvous and ack wait of a
  sync takes the time left of the whole sync (`remaining`, `check`, `timedelta`), so a sync ends
  by its `weights.timeout_s` however its steps divide it.
"""

from __future__ import annotations

import time
from datetime import timedelta

SYNC_ERROR_REASONS: tuple[str, ...] = (
    "timeout", "peer_lost", "rendezvous", "invalid_announce", "load", "forged", "error",
)
"""Why one side's part of a sync failed (`WeightSyncError.reason`, usable as a metric label)."""


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

