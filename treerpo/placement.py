"""Where each process of a local job runs: its GPUs and a vLLM actor's share of GPU memory (design §1.5).

One implementation for `treerpo up` (treerpo/supervisor.py) and deploy/scripts/launch_local.sh (through
`treerpo up --plan`). Pure functions of the config and the visible GPUs; no CUDA library is loaded.

* GPUs (`plan_devices`): each child's CUDA_VISIBLE_DEVICES from `up.devices`. A child runs on the
  first GPU it sees (`cuda:0` in its process); 'inherit' puts every child on the first visible one.
* Memory: vLLM takes `gpu_memory_utilization` of the whole GPU at start-up, and refuses to start
  when less is free ("Free memory on device ... is less than desired"). So whatever shares a GPU
  plans for `actor.gpu_memory_utilization` (U) of it together: a learner there keeps
  `up.learner_memory_fraction` (R) of the GPU, and the k vLLM actors there split the rest evenly,
  each `(U - R) / k` (U / k without the learner), rounded down to 0.001. An actor alone on its
  GPU keeps U. A share under `MIN_VLLM_SHARE` is refused (ConfigError), as is
  `weights.backend=nccl` with two GPU processes on one GPU (NCCL refuses "Duplicate GPU").
* HF actors (and the learner) allocate as they go: they take no share, but they count as sharing
  a GPU for the backend check. GPUs are compared by the names `up.devices` gives them; the
  learner compares the GPUs' UUIDs at run time (weightsync.group.resolve_backend).
* Cores, for vLLM on its CPU backend: left alone (VLLM_CPU_OMP_THREADS_BIND=auto), every vLLM CPU
  worker pins itself to the same first cores of the host (vLLM plans for one instance per
  host), so k >= 2 vLLM CPU actors share one core and, since an idle worker spins on it (its
  shared-memory queue's `sched_yield` loop), one can starve another's start-up for minutes. So
  `plan_cpu_binds` gives each of them `VLLM_CPU_OMP_THREADS_BIND` of its own: the host's allowed
  CPUs cut into k equal slices, actor i bound to its slice less its last CPU (left, as vLLM's own
  `auto` leaves one, for its engine-core process); with fewer than 2 CPUs per actor, `nobind`
  (the OS schedules them). Not when `up.cpus` pins the actors (vLLM binds inside each one's set)
  nor when the operator set VLLM_CPU_OMP_THREADS_BIND (`host_cpus` gives None then).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, JobConfig

# Below a tenth of a GPU a vLLM instance holds little KV cache beyond its weights and activations:
# one actor batches its requests itself, so fewer actors (or more GPUs) serve better.
MIN_VLLM_SHARE = 0.1
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU backend: the cores its worker's threads pin to


@dataclass(frozen=True)
class Placement:
    """Where one child runs."""

    name: str  # "learner", "actor-0", ...
    devices: str | None  # its CUDA_VISIBLE_DEVICES; None = `up`'s own (inherit)
    gpu: str | None  # the GPU it computes on (the first it sees); None = none
    overrides: tuple[str, ...] = ()  # dotted config overrides it starts with ("actor.gpu_memory_utilization=0.425")
    env: tuple[tuple[str, str], ...] = ()  # environment it starts with, beyond its GPUs (VLLM_CPU_OMP_THREADS_BIND)


def visible_gpus(env: dict[str, str], proc_root: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """The GPUs `up` may hand out: CUDA_VISIBLE_DEVICES's entries when set, else every GPU the
    NVIDIA driver lists (none without one). No CUDA library is loaded."""
    if "CUDA_VISIBLE_DEVICES" in env:
        entries = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",")]
        out = []
        for d in entries:
            if not d or d == "-1":  # CUDA stops at the first invalid entry
                break
            out.append(d)
        return out
    try:
        return [str(i) for i in range(sum(1 for _ in proc_root.iterdir()))]
    except OSError:
        return []


def host_cpus(env: Mapping[str, str]) -> list[int] | None:
    """The CPUs this process may run on, for `plan_cpu_binds`; None when the operator chose vLLM's
    binding (VLLM_CPU_OMP_THREADS_BIND set): theirs is kept."""
    if CPU_BIND_ENV in env:
        return None
    return sorted(os.sched_getaffinity(0))


def plan_cpu_binds(num: int, cpus: list[int]) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND for each of `num` vLLM CPU actors on a host whose allowed CPUs are
    `cpus` (module docstring): disjoint slices less their last CPU, else 'nobind'."""
    per = len(cpus) // num
    if per < 2:
        return ["nobind"] * num
    return [",".join(str(c) for c in cpus[i * per:(i + 1) * per - 1]) for i in range(num)]


def plan_devices(devices: str | list[str], visible: list[str], num_actors: int) -> tuple[str | None, list[str | None]]:
    """(learner, [actor i]) CUDA_VISIBLE_DEVICES values; None = inherit `up`'s environment.

    'auto': no GPU -> inherit; one GPU -> everyone shares it; G >= 2 -> the learner gets the
    first, actor i the (1 + i mod (G - 1))-th. A list: [learner, actors...], actors cycling."""
    if devices == "inherit" or (devices == "auto" and not visible):
        return None, [None] * num_actors
    if devices == "auto":
        if len(visible) == 1:
            return visible[0], [visible[0]] * num_actors
        return visible[0], [visible[1 + i % (len(visible) - 1)] for i in range(num_actors)]
    learner, actors = devices[0], list(devices[1:])
    return learner, [actors[i % len(actors)] for i in range(num_actors)]


def _gpu_of(devices: str | None, visible: list[str]) -> str | None:
    """The GPU a process with this CUDA_VISIBLE_DEVICES computes on: the first it sees."""
    if devices is None:
        return visible[0] if visible else None
    return devices.split(",")[0] or None


def plan_placement(cfg: JobConfig, visible: list[str], num_actors: int,
                   cpus: list[int] | None = None) -> tuple[Placement, list[Placement]]:
    """(learner, [actor i]): each child's GPUs and, where vLLM actors share a GPU, their memory
    share, and where vLLM actors share the host's CPUs, their cores (`cpus`: the host's allowed
    CPUs, `host_cpus`; None: no binding planned) (module docstring); ConfigError when a share would
    be too small or NCCL would meet a shared GPU."""
    learner_devices, actor_devices = plan_devices(cfg.up.devices, visible, num_actors)
    on_gpu = cfg.model.device != "cpu"  # the learner and HF actors; vLLM runs on the GPU it sees
    learner_gpu = _gpu_of(learner_devices, visible) if on_gpu else None
    vllm = cfg.actor.engine == "vllm"
    actor_gpus = [_gpu_of(d, visible) if (vllm or on_gpu) else None for d in actor_devices]

    holders: dict[str, list[str]] = {}  # GPU -> the processes computing on it
    for name, gpu in [("learner", learner_gpu), *((f"actor-{i}", g) for i, g in enumerate(actor_gpus))]:
        if gpu is not None:
            holders.setdefault(gpu, []).append(name)
    if cfg.weights.backend == "nccl":
        for gpu, names in holders.items():
            if len(names) > 1:
                raise ConfigError(f"weights.backend=nccl but {', '.join(names)} share GPU {gpu!r}: NCCL refuses "
                                  "two ranks on one device; set weights.backend=auto (gloo when a GPU is shared) or "
                                  "give each process a GPU of its own (up.devices)")

    shares: dict[str, float] = {}  # GPU -> each vLLM actor's share, where it differs from U
    if vllm:
        u, r = cfg.actor.gpu_memory_utilization, cfg.up.learner_memory_fraction
        for gpu, names in holders.items():
            k = sum(1 for n in names if n != "learner")
            with_learner = "learner" in names
            if k == 0 or (k == 1 and not with_learner):
                continue
            pool = u - r if with_learner else u
            share = math.floor(pool / k * 1000 + 1e-9) / 1000
            if share < MIN_VLLM_SHARE:
                pool_text = (f"actor.gpu_memory_utilization={u} less the learner's up.learner_memory_fraction={r}"
                             if with_learner else f"actor.gpu_memory_utilization={u}")
                raise ConfigError(
                    f"{k} vLLM actors on GPU {gpu!r} would get {max(share, 0.0):.3f} of it each ({pool_text}, split "
                    f"{k} ways), under the {MIN_VLLM_SHARE} a vLLM instance needs: run fewer actors, give them more "
                    "GPUs (up.devices) or raise actor.gpu_memory_utilization"
                    + (" or lower up.learner_memory_fraction" if with_learner else ""))
            shares[gpu] = share

    binds: dict[int, str] = {}  # actor index -> VLLM_CPU_OMP_THREADS_BIND
    on_cpu = [i for i, g in enumerate(actor_gpus) if vllm and g is None]
    if len(on_cpu) >= 2 and cpus and cfg.up.cpus is None:
        binds = dict(zip(on_cpu, plan_cpu_binds(len(on_cpu), cpus), strict=True))

    learner = Placement("learner", learner_devices, learner_gpu)
    actors = [Placement(f"actor-{i}", d, g,
                        (f"actor.gpu_memory_utilization={shares[g]}",) if g in shares else (),
                        ((CPU_BIND_ENV, binds[i]),) if i in binds else ())
              for i, (d, g) in enumerate(zip(actor_devices, actor_gpus, strict=True))]
    return learner, actors


def plan_for(cfg: JobConfig, env: Mapping[str, str], num_actors: int) -> tuple[Placement, list[Placement]]:
    """`plan_placement` for a launcher whose environment is `env`: its visible GPUs and host CPUs."""
    return plan_placement(cfg, visible_gpus(env), num_actors, host_cpus(env))


def format_plan(learner: Placement, actors: list[Placement]) -> str:
    """One line per child, `NAME [CUDA_VISIBLE_DEVICES=...] [ENV_NAME=VALUE ...] [dotted.key=VALUE ...]`
    (no CUDA_VISIBLE_DEVICES: it inherits; environment names are upper case, config keys lower
    case), read by deploy/scripts/launch_local.sh."""
    lines = []
    for p in (learner, *actors):
        words = ([p.name] + ([] if p.devices is None else [f"CUDA_VISIBLE_DEVICES={p.devices}"])
                 + [f"{k}={v}" for k, v in p.env] + list(p.overrides))
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"
