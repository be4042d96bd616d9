"""What a sync moves and in which buckets: a pure function of the parameters' metadata (design §6).

* `plan_layout` orders parameters by dtype (dtype groups in order of first appearance, names
  stable inside a group) and cuts each group greedily into buckets of at most `bucket_bytes`; a
  parameter larger than a bucket, or of at least `solo_bytes`, gets a bucket of its own (the
  publisher then broadcasts it straight from its own memory, no flatten copy; the receiver
  cannot tell). A bucket is the triple ``[first, end, numel]`` over the announced
  (layout-ordered) name list, as `common.wire.WeightAnnounce.buckets` carries it.
* `check_layout` lets a receiver validate any announced layout without knowing the bucket size
  (`WeightSyncError('invalid_announce')` naming the fault).
* `flatten_into` / `unflatten`: one bucket's tensors into and out of one flat buffer.
* Dtypes travel by name (`DTYPE_NAMES`: torch's names without `torch.`); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsync.errors import WeightSyncError

DTYPE_NAMES: tuple[str, ...] = (
    "float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
)
"""Parameter dtypes a sync may carry (wire names are torch's names without the `torch.` prefix)."""


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (the wire spelling)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be synced; supported: {DTYPE_NAMES}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} cannot be synced; supported: {DTYPE_NAMES}")
    return getattr(torch, name)


def itemsize(dtype: str) -> int:
    return torch_dtype(dtype).itemsize


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class SyncPlan:
    """What a sync moves, in layout order; converts 1:1 to WeightAnnounce's tensor fields."""

    version: int
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    buckets: list[list[int]]  # [first, end, numel] over names
    index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(b[2] * itemsize(self.dtypes[b[0]]) for b in self.buckets)

    def bucket_of(self) -> list[int]:
        """For each parameter index, the index of its bucket."""
        out = [0] * len(self.names)
        for b, (first, end, _) in enumerate(self.buckets):
            for i in range(first, end):
                out[i] = b
        return out

    def offsets(self) -> list[int]:
        """For each parameter index, its element offset inside its bucket."""
        out = [0] * len(self.names)
        for first, end, _ in self.buckets:
            off = 0
            for i in range(first, end):
                out[i] = off
                off += numel(self.shapes[i])
        return out


def plan_layout(meta: Iterable[tuple[str, Sequence[int], Any]], bucket_bytes: int, version: int,
                solo_bytes: int | None = None) -> SyncPlan:
    """Group (name, shape, dtype) by dtype and cut each group into buckets of <= bucket_bytes.

    Order: dtype groups in order of first appearance; inside a group, the given order.
    A bucket closes when the next parameter would push it past bucket_bytes or the dtype changes;
    a parameter larger than bucket_bytes, or of at least solo_bytes (None: no such rule), gets a
    bucket of its own.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    if solo_bytes is not None and solo_bytes < 1:
        raise ValueError(f"solo_bytes must be >= 1 or None, got {solo_bytes}")
    groups: dict[str, list[tuple[str, list[int]]]] = {}
    seen: set[str] = set()
    for name, shape, dtype in meta:
        if name in seen:
            raise ValueError(f"parameter {name!r} appears twice; names must be unique")
        seen.add(name)
        groups.setdefault(dtype_name(dtype), []).append((name, [int(s) for s in shape]))
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[str] = []
    buckets: list[list[int]] = []
    for dtype, params in groups.items():
        size = itemsize(dtype)
        first, count = len(names), 0  # open bucket: [first, len(names)), `count` elements
        for name, shape in params:
            n = numel(shape)
            solo = solo_bytes is not None and n * size >= solo_bytes
            if len(names) > first and (solo or (count + n) * size > bucket_bytes):
                buckets.append([first, len(names), count])
                first, count = len(names), 0
            names.append(name)
            shapes.append(shape)
            dtypes.append(dtype)
            count += n
            if solo:
                buckets.append([first, len(names), count])
                first, count = len(names), 0
        if len(names) > first:
            buckets.append([first, len(names), count])
    return SyncPlan(version, names, shapes, dtypes, buckets, {n: i for i, n in enumerate(names)})


def check_layout(names: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
                 buckets: Sequence[Sequence[int]], version: int = 0) -> SyncPlan:
    """Validate an announced layout (buckets tile [0, len(names)) in order, one dtype each,
    numel adds up, names unique, dtypes known) and return it as a SyncPlan; else
    WeightSyncError('invalid_announce')."""

    def bad(msg: str) -> WeightSyncError:
        return WeightSyncError("invalid_announce", f"announced layout is inconsistent: {msg}")

    if not (len(names) == len(shapes) == len(dtypes)):
        raise bad(f"{len(names)} names, {len(shapes)} shapes, {len(dtypes)} dtypes")
    if len(set(names)) != len(names):
        raise bad("duplicate parameter names")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise bad(f"dtype {d!r} not in {DTYPE_NAMES}")
    if any(int(s) < 0 for shape in shapes for s in shape):
        raise bad("negative dimension")
    expect_first = 0
    for b, bucket in enumerate(buckets):
        if len(bucket) != 3:
            raise bad(f"bucket {b} = {list(bucket)} is not [first, end, numel]")
        first, end, count = (int(x) for x in bucket)
        if first != expect_first or end <= first or end > len(names):
            raise bad(f"bucket {b} = {list(bucket)} does not continue at {expect_first} within {len(names)} names")
        if len(set(dtypes[first:end])) != 1:
            raise bad(f"bucket {b} mixes dtypes {sorted(set(dtypes[first:end]))}")
        if sum(numel(s) for s in shapes[first:end]) != count:
            raise bad(f"bucket {b} claims {count} elements, its shapes hold {sum(numel(s) for s in shapes[first:end])}")
        expect_first = end
    if expect_first != len(names):
        raise bad(f"buckets cover {expect_first} of {len(names)} parameters")
    return SyncPlan(int(version), list(names), [list(map(int, s)) for s in shapes], list(dtypes),
                    [list(map(int, b)) for b in buckets], {n: i for i, n in enumerate(names)})


# --------------------------------------------------------------------------------------------
# Flatten / unflatten
# --------------------------------------------------------------------------------------------
def flatten_into(buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Copy tensors one after another into the 1-D buffer buf (same dtype); returns buf."""
    total = sum(t.numel() for t in tensors)
    if total != buf.numel():
        raise ValueError(f"flatten_into: tensors hold {total} elements, the buffer {buf.numel()}")
    off = 0
    for t in tensors:
        n = t.numel()
        buf[off:off + n].copy_(t.reshape(-1))
        off += n
    return buf


def unflatten(buf: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views of the 1-D buffer buf, one per shape, in order (no copy)."""
    out, off = [], 0
    for shape in shapes:
        n = numel(shape)
        out.append(buf[off:off + n].view(tuple(shape)))
        off += n
    if off != buf.numel():
        raise ValueError(f"unflatten: shapes hold {off} elements, the buffer {buf.numel()}")
    return out


# --------------------------------------------------------------------------------------------
