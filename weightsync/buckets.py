"""Moving buckets: posting broadcasts and completing them in order, each by the sync's deadline (design §6).

* `broadcast_bucket` posts one bucket's broadcast from rank 0; a posting that fails (a
  non-blocking NCCL communicator that failed to form raises there) is the peers' fault:
  `WeightSyncError('peer_lost')`, never an exception that kills the process.
* `wait_work` waits for a posted collective by the deadline: gloo with the time left as its
  timeout, NCCL (which never raises on a dead peer) polled and its group aborted at the deadline;
  `WeightSyncError('timeout'/'peer_lost')` otherwise. `op_timeout` is a collective's own timeout:
  the time left, plus `NCCL_WATCHDOG_MARGIN_S` for NCCL, whose watchdog must never fire first.
* `InFlight` keeps at most `MAX_IN_FLIGHT` collectives posted (= the gloo group's worker threads,
  `GLOO_THREADS`, so a posted collective starts at once and its timeout, counted from its start,
  still ends by the deadline) and completes them in posting order.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.errors import one_line
from weightsync.errors import Deadline, WeightSyncError

GLOO_THREADS = 4
"""Worker threads of every gloo sync group (torch's default is 2; see MAX_IN_FLIGHT)."""

NCCL_WATCHDOG_MARGIN_S = 60.0
"""NCCL's own timeout is the sync deadline plus this: its watchdog, which tears down the whole
process (learner or vLLM engine core) on a timed-out op, must never fire before Python's abort."""

MAX_IN_FLIGHT = GLOO_THREADS
"""Collectives a side keeps posted at once: hides the per-collective latency between buckets and
runs several transfers at once (on loopback gloo, 4 concurrent beat one flat broadcast), and no
posted collective waits in a queue (its timeout would start late and overrun the deadline)."""


def op_timeout(deadline: Deadline, backend: str, what: str) -> timedelta:
    """The timeout of one collective: the time left (gloo); that plus the watchdog margin (NCCL,
    which Python polls and aborts at the deadline itself, `wait_work`)."""
    if backend == "nccl":
        return timedelta(seconds=deadline.check(what) + NCCL_WATCHDOG_MARGIN_S)
    return deadline.timedelta(what)


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
