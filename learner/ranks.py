"""The learner's ranks: joining the world, and the command protocol rank 0 drives the others with.

Under torchrun / the deepspeed launcher every rank runs a `Trainer`; only rank 0 owns trees,
the network and the checkpoints. The others sit in `RankGroup.follow()` and execute rank 0's
commands until told to stop. This module is that protocol; the training step is learner/trainer.py.

Guarantees
* One command at a time, in rank 0's order: a broadcast header `[cmd, arg, len_0 .. len_{W-1}]`,
  then (when any length is non-zero) one scatter of each rank's payload, padded to the longest.
  Every rank therefore enters the same collectives in the same order; an unknown command stops
  the follower with an error instead of desynchronising it.
* Payloads are bytes: trees travel wire-encoded (`common.wire`, validated on decode, never
  pickle) in a length-prefixed frame (`pack_blobs`); paths travel as UTF-8.
* All protocol traffic runs on its own gloo group of CPU tensors, created with
  `learner.follower_timeout_s` as its deadline (followers may wait for data a long time), so it
  never shares a communicator with DeepSpeed's gradient collectives.
* `split_by_tokens` gives every tree to exactly one rank, longest first to the least-loaded rank;
  it is deterministic (ties go to the lower index / rank).
* `MetricSum` combines per-micro-batch metrics over micro-batches and ranks exactly as if one
  rank had seen every micro-batch: token-weighted means, and max / min for `_max` / `_min` keys.
* With one rank every operation is local: no group is created and nothing is sent.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from common.tree import ReasoningTree
from common.wire import decode_tree, encode_tree

# commands rank 0 sends to the followers (header[0])
CMD_STOP, CMD_TRAIN, CMD_SAVE, CMD_LOAD, CMD_GATHER = 0, 1, 2, 3, 4

# a follower's handler: (header arg, this rank's payload) -> None
Handler = Callable[[int, bytes], None]


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str) -> None:
    """Join the launcher's world (RANK/WORLD_SIZE/MASTER_* in the environment) or make a 1-rank one."""
    import deepspeed  # noqa: PLC0415 - heavy, needed only by a training process

    if not dist.is_initialized() and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


# ----------------------------------------------------------------------------------------------
# Trees between ranks
# ----------------------------------------------------------------------------------------------
def tree_cost(tree: ReasoningTree, mode: str) -> int:
    """Tokens the forward processes for this tree: once per node (tree) or once per path (flat)."""
    if mode == "flat":
        return int(len(tree.prompt_token_ids) * len(tree.leaves()) + tree.path_lengths().sum())
    return int(len(tree.prompt_token_ids) + tree.num_tokens())


def split_by_tokens(trees: Sequence[ReasoningTree], world_size: int, mode: str = "tree") -> list[list[int]]:
    """Tree indices per rank: longest first, each to the least-loaded rank (ties: lowest rank)."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(trees)), key=lambda i: (-tree_cost(trees[i], mode), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += tree_cost(trees[i], mode)
    return [sorted(s) for s in shares]


def pack_blobs(blobs: Sequence[bytes]) -> bytes:
    """[u64 count][u64 length]*count then the blobs, little-endian."""
    head = struct.pack(f"<{1 + len(blobs)}Q", len(blobs), *(len(b) for b in blobs))
    return head + b"".join(blobs)


def unpack_blobs(buf: bytes) -> list[memoryview]:
    view = memoryview(buf)
    if len(view) < 8:
        raise ValueError("blob frame shorter than its count")
    (count,) = struct.unpack_from("<Q", view, 0)
    lengths = struct.unpack_from(f"<{count}Q", view, 8)
    pos, out = 8 + 8 * count, []
    for n in lengths:
        out.append(view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise ValueError(f"blob frame holds {len(view)} bytes, its lengths say {pos}")
    return out


def encode_share(trees: Sequence[ReasoningTree]) -> bytes:
    """One rank's trees as one payload (wire-encoded trees in a blob frame)."""
    return pack_blobs([encode_tree(t) for t in trees])


def decode_share(payload: bytes, vocab_size: int) -> list[ReasoningTree]:
    """The trees of `encode_share`, each validated against `vocab_size`."""
    return [decode_tree(b, vocab_size=vocab_size) for b in unpack_blobs(payload)]


# ----------------------------------------------------------------------------------------------
# Metrics over micro-batches and ranks
# ----------------------------------------------------------------------------------------------
class MetricSum:
    """Combines treerpo_loss metrics over micro-batches and ranks, weighted by trainable tokens.

    Keys ending in _max / _min combine by max / min (over calls with trainable tokens); the others
    (std included: a mean of per-micro-batch stds) by the token-weighted mean. The per-call token
    counts (`SKIPPED`) are left out: the trainer reports the step's global counts instead.
    """

    SKIPPED = ("trainable_tokens", "trainable_token_fraction")

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}  # key -> [weighted sum or extreme, weight]

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            if key in self.SKIPPED:
                continue
            if key.endswith(("_max", "_min")):
                if weight <= 0:
                    continue
                pick = max if key.endswith("_max") else min
                old = self.sums.get(key)
                self.sums[key] = [value if old is None else pick(old[0], value), 1.0]
            else:
                acc = self.sums.setdefault(key, [0.0, 0.0])
                acc[0] += value * weight
                acc[1] += weight

    def merge(self, other: dict[str, list[float]]) -> None:
        for key, (value, weight) in other.items():
            if key.endswith(("_max", "_min")):
                pick = max if key.endswith("_max") else min
                old = self.sums.get(key)
                self.sums[key] = [value if old is None else pick(old[0], value), 1.0]
            else:
                acc = self.sums.setdefault(key, [0.0, 0.0])
                acc[0] += value
                acc[1] += weight

    def result(self) -> dict[str, float]:
        out = {}
        for key, (value, weight) in self.sums.items():
            out[key] = value if key.endswith(("_max", "_min")) else (value / weight if weight > 0 else 0.0)
        return out


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------
class RankGroup:
    """This process's rank in the learner's world, and the control group commands travel on."""

    def __init__(self, follower_timeout_s: float) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._group = None
        if self.world_size > 1:  # CPU tensors with a long deadline: followers may wait for data a long time
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=follower_timeout_s))

    def require_rank0(self, what: str) -> None:
        if self.rank != 0:
            raise RuntimeError(f"{what} runs on rank 0; ranks > 0 call follow()")

    def same_for_all(self, payload: bytes) -> list[bytes]:
        return [payload] * self.world_size

    # -- rank 0 -> followers ---------------------------------------------------------------
    def send(self, cmd: int, arg: int, payloads: list[bytes] | None = None) -> None:
        """Rank 0: header broadcast, then each rank's payload (scatter, padded to the longest)."""
        if self.world_size == 1:
            return
        lengths = [len(p) for p in payloads] if payloads else [0] * self.world_size
        header = torch.tensor([cmd, int(arg), *lengths], dtype=torch.int64)
        dist.broadcast(header, src=0, group=self._group)
        width = max(lengths)
        if width:
            chunks = [torch.frombuffer(bytearray(p.ljust(width, b"\0")), dtype=torch.uint8) for p in payloads]
            out = torch.empty(width, dtype=torch.uint8)
            dist.scatter(out, scatter_list=chunks, src=0, group=self._group)

    def recv(self) -> tuple[int, int, bytes]:
        """Ranks > 0: the next (cmd, arg, this rank's payload) from rank 0."""
        header = torch.empty(2 + self.world_size, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self._group)
        cmd, arg, lengths = int(header[0]), int(header[1]), header[2:].tolist()
        width = max(lengths)
        payload = b""
        if width:
            out = torch.empty(width, dtype=torch.uint8)
            dist.scatter(out, scatter_list=None, src=0, group=self._group)
            payload = out[: lengths[self.rank]].numpy().tobytes()
        return cmd, arg, payload

    def follow(self, handlers: dict[int, Handler]) -> None:
        """Ranks > 0: run rank 0's commands through `handlers` until CMD_STOP."""
        if self.rank == 0:
            raise RuntimeError("follow() is for ranks > 0; rank 0 drives with train_step/save/load")
        while True:
            cmd, arg, payload = self.recv()
            if cmd == CMD_STOP:
                return
            handler = handlers.get(cmd)
            if handler is None:
                raise RuntimeError(f"rank {self.rank}: unknown command {cmd} from rank 0")
            handler(arg, payload)

    # -- collectives every rank enters --------------------------------------------------------
    def all_gather_ints(self, values: list[int]) -> np.ndarray:
        """(W, len(values)) int64: every rank's values."""
        mine = torch.tensor(values, dtype=torch.int64)
        if self.world_size == 1:
            return mine[None].numpy()
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self._group)
        return torch.stack(out).numpy()

    def all_reduce_sum(self, value: torch.Tensor) -> float:
        value = value.detach().double().cpu().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self._group)
        return float(value[0])

    def gather_metrics(self, stats: MetricSum) -> MetricSum:
        """Rank 0 gets every rank's sums (JSON bytes: ranks may hold different keys)."""
        if self.world_size == 1:
            return stats
        mine = json.dumps(stats.sums).encode()
        lengths = self.all_gather_ints([len(mine)])[:, 0]
        width = int(lengths.max())
        buf = torch.frombuffer(bytearray(mine.ljust(width, b"\0")), dtype=torch.uint8)
        gathered = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(buf, gather_list=gathered, dst=0, group=self._group)
        if self.rank != 0:
            return stats
        total = MetricSum()
        for r, t in enumerate(gathered):
            total.merge(json.loads(t[: int(lengths[r])].numpy().tobytes()))
        return total

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group)
