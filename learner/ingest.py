"""The learner's data plane (design §5.5): frames off the PULL socket, decoded, into the buffer.

Guarantees: every frame ends one way, and is counted:
* it does not decode: `WireError`, counted by reason and dropped as `invalid` (its actor and
  credit are unknown: the actor's next tree or heartbeat settles the credit, design §5.6);
* it is refused: `incarnation` (its actor is not a confirmed member: it has not loaded this
  learner's weights) or `invalid` (a path longer than `learner.micro_batch_tokens`);
* it goes to `ReplayBuffer.add`, accepted or dropped there with its reason.
Every decoded tree, refused or not, is charged to its actor's credits, so a refusal never leaks one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from common.wire import WireError, decode_tree

log = logging.getLogger("treerpo.learner.ingest")


class Ingest:
    """One learner's ingest: `run` is the thread's loop, `receive` what it does with one frame."""

    def __init__(self, endpoints, buffer, control, metrics, *, vocab_size: int, longest_allowed: int,
                 version: Callable[[], int], on_tree: Callable[[object, str], None] | None = None) -> None:
        self.endpoints, self.buffer, self.control, self.metrics = endpoints, buffer, control, metrics
        self.vocab_size = vocab_size
        self.longest_allowed = longest_allowed  # tokens on one root-to-leaf path (prompt included)
        self.version = version  # the learner's weight version now
        self.on_tree = on_tree  # (tree, verdict): learner.log_trees

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        while not stop.is_set():
            try:
                buf = self.endpoints.recv_tree(poll_s, copy=False)
            except WireError as e:  # e.g. a multi-part frame
                self._wire_error(e)
                continue
            if buf is not None:
                self.receive(buf)

    def receive(self, buf) -> str | None:
        """Decode one frame and place its tree; returns None (accepted) or the drop reason."""
        try:
            tree = decode_tree(buf, vocab_size=self.vocab_size)
        except WireError as e:
            self._wire_error(e)
            return "invalid"
        self.metrics.trees_received.inc()
        if not self.control.is_member(tree.actor_id):
            verdict = "incarnation"  # made before its actor confirmed our weights (or by a stranger)
            self.buffer.refuse(tree, verdict)
        elif (longest := int(tree.prompt_token_ids.shape[0] + tree.path_lengths().max())) > self.longest_allowed:
            log.warning("tree %s: %d tokens on its longest path > learner.micro_batch_tokens=%d: dropped",
                        tree.tree_id, longest, self.longest_allowed)
            verdict = "invalid"
            self.buffer.refuse(tree, verdict)
        else:
            verdict = self.buffer.add(tree, self.version()).reason
            self.metrics.buffer_trees.set(len(self.buffer))
        if self.on_tree is not None:
            self.on_tree(tree, verdict or "accepted")
        return verdict

    def _wire_error(self, e: WireError) -> None:
        self.metrics.wire_error(e.reason)
        self.buffer.record_drop("invalid")
