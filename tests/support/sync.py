"""One learner -> engine weight sync in this process, for tests of any engine (HF or vLLM)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any


def sync_weights(engine, pub, named: Iterable[tuple[str, Any]], version: int, *, epoch: Any = ("test",),
                 before_broadcast: Callable[[], None] | None = None) -> tuple[Any, Any, Any]:
    """One learner -> engine sync through a real `WeightPublisher` (gloo, this process: the engine
    receives in a thread): (prepared sync, the publisher's result, `Installed` or the engine's
    WeightSyncError). `before_broadcast()` runs once the engine has the announcement, before the
    learner sends anything. A failed sync drops the engine's group: give the next one a new `epoch`."""
    from weightsync.errors import WeightSyncError  # noqa: PLC0415 -- torch loads with it

    named = list(named)
    prepared = pub.prepare(pub.plan(named, version), ["vllm-0"], engine.device.type == "cuda", epoch=epoch)
    got: dict[str, Any] = {}

    def actor() -> None:
        try:
            got["ack"] = engine.receive_weights(prepared.announcements[0])
        except WeightSyncError as e:
            got["error"] = e

    thread = threading.Thread(target=actor, daemon=True)
    thread.start()
    if before_broadcast is not None:
        before_broadcast()
    result = pub.broadcast(prepared, named)
    thread.join(120)
    assert not thread.is_alive(), "the engine's receive_weights did not return"
    return prepared, result, got.get("ack", got.get("error"))
