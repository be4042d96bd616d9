"""The sync's process group: its store, backend, formation within the deadline, and lifetime (design §6).

* **Separate from any DeepSpeed world.** `make_group` builds a gloo (or NCCL) process group on a
  `PrefixStore` named by the learner (`new_group_name`) over the rendezvous TCPStore
  (`connect_store`: a master listens on its host only), sealed with the sync's secret
  (weightsync.seal). `resolve_backend` picks NCCL only when every process has CUDA and no two of
  them compute on one GPU (`shared_gpus`, by GPU UUID): NCCL refuses two ranks on one device.
* **Formed within the deadline.** A gloo group's construction is abandoned at the deadline
  (`_formed_within`): gloo's own rendezvous, retrying, can wait 5x its timeout for a peer that
  wrote its address and left. Before an NCCL group is built every member meets at the store
  within the deadline (`meet`); then its communicator is formed at once by a one-element
  broadcast posted in a thread abandoned (and the group aborted) at the deadline
  (`_connected_within`): NCCL forms a communicator lazily inside the first collective's posting,
  which blocks for TORCH_NCCL_NONBLOCKING_TIMEOUT when a peer met and died. That wait itself is
  bounded per process by `bound_nccl_setup` (the sync timeout plus `NCCL_WATCHDOG_MARGIN_S`), so
  an abandoned formation ends too. The communicator is non-blocking and NCCL's own timeout is the
  deadline plus the margin (`nccl_options`), so Python always aborts first.
* **A group lives while its membership does.** A side may keep it after a successful sync for
  the next sync of the same members (`keep_group` / `take_group`); it drops it when the
  membership changes and at once after a failure (dropping a gloo group closes its sockets, so
  peers blocked on it fail at once). `drop_group_later` drops in a daemon thread (the first side
  to close a gloo group waits ~20 ms for its peer; nobody waits on it), except the exiting
  interpreter: it drops the kept groups and joins pending drops (at exit), since a group still
  alive when the interpreter finalizes aborts the process (std::terminate).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.errors import one_line
from weightsync.buckets import GLOO_THREADS, NCCL_WATCHDOG_MARGIN_S, broadcast_bucket, wait_work
from weightsync.errors import Deadline, WeightSyncError
from weightsync.seal import group_store

log = logging.getLogger(__name__)



_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def new_group_name() -> str:
    """A fresh group's PrefixStore name: unique and unguessable in advance, though not secret once
    used (any store client can list the keys under it)."""
    return f"ws-{secrets.token_hex(16)}"



def shared_gpus(gpus: Sequence[str]) -> list[str]:
    """The GPU UUIDs held by more than one process of `gpus` ("" = none or unknown: never shared)."""
    return sorted(g for g, n in Counter(g for g in gpus if g).items() if n > 1)


def resolve_backend(backend: str, all_have_cuda: bool, gpus: Sequence[str] = ()) -> str:
    """The sync group's backend: 'nccl' when asked (or auto), every process of the group has CUDA
    (`all_have_cuda`, the learner's own included) and no two of them compute on one GPU (`gpus`:
    each process's GPU UUID, "" = none or unknown); else 'gloo'. NCCL refuses two ranks on one
    device ("Duplicate GPU detected"), so a shared GPU means gloo for the whole group (design §6.1)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"weights.backend must be auto, gloo or nccl, got {backend!r}")
    shared = shared_gpus(gpus)
    if backend == "nccl" and not all_have_cuda:
        raise ValueError("weights.backend=nccl but not every sync member has CUDA; use backend=auto or gloo")
    if backend == "nccl" and shared:
        raise ValueError(f"weights.backend=nccl but sync members share GPU {shared[0]}: NCCL refuses two ranks on "
                         "one device; use backend=auto (gloo then) or give each process a GPU of its own")
    return "nccl" if backend == "nccl" or (backend == "auto" and all_have_cuda and not shared) else "gloo"


def bucket_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def connect_store(host: str, port: int, timeout_s: float, *, is_master: bool = False) -> Any:
    """A TCPStore master (is_master: listens on host:port, port 0 = ephemeral, see `.port`) or client.

    The master listens on `host` only (torch's TCPStore would listen on every interface whatever
    host it is given); a wildcard host ("0.0.0.0", "::", "*", "") listens on all of them."""
    listen_fd = None
    try:
        if is_master and host not in _WILDCARD_HOSTS:
            listen_fd, port = _listen(host, int(port))
        return dist.TCPStore(host, int(port), None, is_master, timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=listen_fd)
    except Exception as e:  # noqa: BLE001 - re-raised with the address and a hint
        # (a listening fd handed to a TCPStore that failed is not closed here: it may own it by now)
        role = "bind" if is_master else "reach"
        raise WeightSyncError("rendezvous", f"cannot {role} the weight-sync rendezvous store at {host}:{port} "
                              f"({e}); check weights.rendezvous_port / the learner's endpoints.json") from e


def _listen(host: str, port: int) -> tuple[int, int]:
    """A listening TCP socket on host:port (the first address host resolves to): (fd, port).
    The fd is handed over: the TCPStore that takes it closes it."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        bound = int(sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise
    return sock.detach(), bound


def meet(store: Any, rank: int, world_size: int, timeout_s: float, what: str = "group") -> None:
    """Every rank checks in at `store` (a group's PrefixStore or SealedStore) and waits for all the
    others, within timeout_s; else WeightSyncError('timeout') naming the ranks that never came
    (or, on a SealedStore, 'forged' when a check-in was not written by a member)."""
    store.set(f"meet/{rank}", "1")
    keys = [f"meet/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=max(0.05, timeout_s)))
    except Exception as e:  # noqa: BLE001 - the store raises DistStoreError / RuntimeError on timeout
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise WeightSyncError("timeout", f"{what}: ranks {missing} did not reach the store within "
                              f"{timeout_s:.1f}s ({str(e)[:200]})") from e
    for k in keys:
        store.get(k)  # a SealedStore refuses a check-in a rogue wrote for a missing rank


def nccl_options(timeout_s: float) -> Any:
    """ProcessGroupNCCL options: a non-blocking communicator (abortable while it forms) whose own
    timeout outlasts the sync deadline by NCCL_WATCHDOG_MARGIN_S (Python aborts first)."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=max(0.05, timeout_s) + NCCL_WATCHDOG_MARGIN_S)
    config = getattr(opts, "config", None)
    if config is not None and hasattr(config, "blocking"):
        config.blocking = 0
    return opts


_GROUP_CLASSES: dict[type, type] = {}


def _holding_store(cls: type, store: Any, *args: Any) -> Any:
    """cls(store, *args) as an instance of a subclass of cls that keeps `store` referenced: a
    Python store (SealedStore) whose last Python reference dies is no longer callable from C++
    (NCCL reads the store again when its communicator forms, at the first collective)."""
    sub = _GROUP_CLASSES.get(cls)
    if sub is None:
        sub = _GROUP_CLASSES[cls] = type(f"Sealed{cls.__name__}", (cls,), {})
    group = sub(store, *args)
    group.rendezvous_store = store
    return group


def make_group(host: str, port: int, group_name: str, rank: int, world_size: int, timeout_s: float,
               backend: str = "gloo", *, secret: str | None, store: Any = None) -> Any:
    """A process group of `world_size` ranks on a fresh PrefixStore `group_name` of the TCPStore at
    host:port (or `store`, e.g. the learner's master), seen through a `SealedStore` of the sync's
    `secret` (None: unauthenticated, for benchmarks of the bare transport only). Blocks until every
    rank joined (gloo: its own rendezvous; NCCL: `meet` at the store) or timeout_s passed
    (WeightSyncError('rendezvous'/'timeout'/'forged')). Drop the group to end it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    deadline = Deadline(timeout_s)
    if store is None:
        store = connect_store(host, port, timeout_s)
    prefixed = group_store(store, group_name, secret)
    td = timedelta(seconds=max(0.05, timeout_s))
    try:
        if backend == "nccl":
            what = f"NCCL group {group_name!r} (rank {rank} of {world_size})"
            meet(prefixed, rank, world_size, deadline.remaining(), what)
            pg = _nccl_group(prefixed, rank, world_size, deadline.remaining())
            return _connected_within(pg, deadline, what)
        if backend != "gloo":
            raise ValueError(f"make_group: backend must be gloo or nccl, got {backend!r}")
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td
        opts._threads = GLOO_THREADS
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        opts._devices = [dist.ProcessGroupGloo.create_device(interface=ifname) if ifname
                         else dist.ProcessGroupGloo.create_default_device()]
        return _formed_within(lambda: _holding_store(dist.ProcessGroupGloo, prefixed, rank, world_size, opts),
                              timeout_s, f"gloo group {group_name!r} (rank {rank} of {world_size})")
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, WeightSyncError):
            raise
        text = str(e)
        reason = ("forged" if "[forged]" in text else
                  "timeout" if "timeout" in text.lower() or "timed out" in text.lower() else "rendezvous")
        raise WeightSyncError(reason, f"group {group_name!r} (rank {rank} of {world_size}, {backend}) did not "
                              f"form within {timeout_s:.1f}s: {text[:300]}") from e


def _nccl_group(store: Any, rank: int, world_size: int, timeout_s: float) -> Any:
    """A ProcessGroupNCCL on `store` (non-blocking communicator, `nccl_options`); its communicator
    is not formed yet (`_connected_within` forms it)."""
    return _holding_store(dist.ProcessGroupNCCL, store, rank, world_size, nccl_options(timeout_s))


def _connected_within(pg: Any, deadline: Deadline, what: str) -> Any:
    """pg with its NCCL communicator formed, or WeightSyncError('timeout') at the deadline.

    NCCL forms a communicator lazily, inside the first collective's *posting*, which then blocks
    for TORCH_NCCL_NONBLOCKING_TIMEOUT (30 min by default) while a peer that met at the store and
    died never joins: no deadline polled after posting could end it. So a one-element broadcast
    forms it here, posted in a thread abandoned at the deadline (`_formed_within`), and the group
    is aborted; the thread ends within the bound `bound_nccl_setup` put on that wait."""
    def connect() -> Any:
        buf = torch.zeros(1, device=bucket_device("nccl"))
        wait_work(broadcast_bucket(pg, buf, deadline, f"{what}: connect"), deadline, "nccl", f"{what}: connect", pg)
        return pg

    try:
        return _formed_within(connect, deadline.remaining(), f"{what}: its communicator")
    except WeightSyncError:
        try:
            pg.abort()  # a communicator still forming is abandoned with its group
        except Exception as e:  # noqa: BLE001 - best effort: the sync fails either way
            log.debug("abort of %s failed: %s", what, one_line(e))
        raise


def bound_nccl_setup(timeout_s: float, env: dict[str, str] | None = None) -> None:
    """Bound, for this process, how long an NCCL communicator may take to form: torch waits for a
    non-blocking communicator's setup for TORCH_NCCL_NONBLOCKING_TIMEOUT seconds (30 min unless
    set, read once per process at its first NCCL use: call this at start-up). Sets it to the sync
    timeout plus NCCL_WATCHDOG_MARGIN_S unless the operator set it; and NCCL_CUMEM_ENABLE=0 (as
    vLLM sets for its own process, and OpenRLHF and AReaL for trainer-to-vLLM NCCL groups: cuMem
    buffers break NCCL between a trainer and a vLLM worker) unless set."""
    env = os.environ if env is None else env
    env.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(math.ceil(timeout_s + NCCL_WATCHDOG_MARGIN_S)))
    env.setdefault("NCCL_CUMEM_ENABLE", "0")


def _formed_within(build: Any, timeout_s: float, what: str) -> Any:
    """build() -- a gloo group's construction -- or WeightSyncError('timeout') after timeout_s.

    gloo bounds each connection attempt of its rendezvous by the group's timeout, but retries:
    a peer that wrote its address and left (died, gave up, or had its key deleted by a rogue
    before the other side read it) keeps the side that waits for its connection for 5x the
    timeout. So the construction runs in a thread and is abandoned at the deadline; it ends by
    itself within those 5x (the interpreter joins it at exit, as a pending drop) and drops a
    group that formed too late."""
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def run() -> None:
        try:
            out = ("group", build())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            out = ("error", e)
        with lock:
            if not state.get("abandoned"):
                state[out[0]] = out[1]
        del out  # abandoned: a late group is dropped here, in this thread
        with _DROPS_LOCK:
            _DROPS.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="weightsync-form-group", daemon=True)
    with _DROPS_LOCK:
        _DROPS.add(thread)
        thread.start()
    thread.join(max(0.05, timeout_s))
    with lock:
        if "group" in state:
            return state.pop("group")
        if "error" in state:
            raise state.pop("error")
        state["abandoned"] = True
    raise WeightSyncError("timeout", f"{what} did not form within {timeout_s:.1f}s: a peer never came, or left "
                          "mid-rendezvous (the construction goes on in the background until gloo gives up)")


_DROPS: set[threading.Thread] = set()  # drop_group_later threads and abandoned formations still running
_DROPS_LOCK = threading.Lock()
_KEPT: dict[int, list] = {}  # id(holder) -> [group]: groups kept between syncs (`keep_group`)
DROP_EXIT_WAIT_S = 10.0
"""How long an exiting interpreter waits for pending group teardowns (gloo's take ~20 ms)."""


def drop_group_later(holder: list) -> None:
    """Drop `holder`'s items (a finished sync's group, whose last reference it must hold) in a
    daemon thread, so the group's teardown does not delay the end of the sync. The interpreter
    joins that thread at exit (`wait_group_drops`)."""
    thread = threading.Thread(target=_drop, args=(holder,), name="weightsync-drop-group", daemon=True)
    with _DROPS_LOCK:  # started under the lock: wait_group_drops never sees an unstarted thread
        _DROPS.add(thread)
        thread.start()


def keep_group(group: Any) -> list:
    """Keep a finished sync's group for the next sync of the same members: returns its holder
    (the only reference to keep). `release_group(holder)` drops it; the exiting interpreter
    drops whatever is still kept."""
    holder = [group]
    with _DROPS_LOCK:
        _KEPT[id(holder)] = holder
    return holder


def take_group(holder: list) -> Any:
    """Take a kept group back for a sync (the holder is emptied; keep it again afterwards)."""
    with _DROPS_LOCK:
        _KEPT.pop(id(holder), None)
    return holder.pop()


def release_group(holder: list | None) -> None:
    """Drop a kept group (in a daemon thread, `drop_group_later`); None does nothing."""
    if holder is None:
        return
    with _DROPS_LOCK:
        _KEPT.pop(id(holder), None)
    drop_group_later(holder)


def _drop(holder: list) -> None:
    try:
        holder.clear()
    finally:
        with _DROPS_LOCK:
            _DROPS.discard(threading.current_thread())


def wait_group_drops(timeout_s: float = DROP_EXIT_WAIT_S) -> bool:
    """Join the pending `drop_group_later` teardowns, within timeout_s; True if none is left.

    Run at exit (after the kept groups are dropped): a daemon thread is frozen mid-teardown when the interpreter
    finalizes, and a gloo group destroyed then (its worker threads still joinable) makes the
    C++ runtime call std::terminate -- a clean exit turned into SIGABRT."""
    deadline = time.monotonic() + timeout_s
    while True:
        with _DROPS_LOCK:
            pending = next(iter(_DROPS), None)
        if pending is None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pending.join(left)


def _at_exit() -> None:
    with _DROPS_LOCK:
        kept = list(_KEPT.values())
    for holder in kept:
        release_group(holder)
    wait_group_drops()


atexit.register(_at_exit)

