"""The vLLM worker side of treerpo's weight sync: a weight-transfer engine and a worker extension.

This module runs inside vLLM's worker process (it imports vLLM at the top; nothing in the actor
process imports it). vLLM finds it twice:

* `register`, named by treerpo's `vllm.general_plugins` entry point (pyproject.toml), which vLLM
  calls in every process it starts, registers `TreeRPOTransferEngine` as the weight-transfer
  backend "treerpo" (`WeightTransferEngineFactory`); the actor's `AsyncLLM` is built with
  `weight_transfer_config={"backend": "treerpo"}`, so the worker creates one at model load;
* `TreeRPOWorkerExtension` is the `worker_extension_cls`: a few RPCs around the engine.

Guarantees of one sync (design §6.6):

* Receive while generating: `init_weight_transfer_engine` names the actor's private channel (a
  ZeroMQ PAIR over ipc://) and a thread of this process (`Stager`) listens there; each
  announcement is received at once, while generation goes on, and answered there when it ended.
  The channel bypasses vLLM's engine core: the actor makes no RPC while the worker generates. The
  thread joins the learner's announced sync group (gloo, or NCCL straight onto the worker's GPU)
  with `weightsync.receiver.WeightReceiver`: the announcement's deadline bounds the rendezvous and every
  bucket, a dead learner fails it, a failure is reported to the learner's store ("alive, but
  failed"), and the checksum is that of what arrived (`weights.checksum`). The announcement's
  secret admits only the learner: the group forms on store values MAC'd with it, and what arrived
  must match the learner's seal before it is staged (design §6.1). Buckets are staged in host
  memory; on a GPU only a bounded ring of buckets lives on the device (no whole-model copy beside
  vLLM's `gpu_memory_utilization`). The model is not touched: a failed receive leaves it as it was.
* Install in the pause (`start_weight_update` -> `update_weights` -> `finish_weight_update`, the
  actor having paused generation): `update_weights` takes the staged sync (receiving it then and
  there if nobody staged it first); `finish_weight_update` installs it with vLLM's layerwise reload
  (`initialize_layerwise_reload`, the model's own `load_weights`, `finalize_layerwise_reload`), so
  vLLM's fused (q/k/v -> qkv_proj), repacked (on CPU a packed GEMM handle; the parameter reads back
  with shape [0]) and quantized layouts are rebuilt by vLLM's own post-load processing; a tied LM
  head, which receives no weights of its own, has its post-load processing re-run so it follows
  the new embedding (layerwise reload skips tied parameters).
* Installed, not only arrived: `finish_weight_update` fails (`WeightSyncError('load')`, the actor
  then keeps its version) when a layer with parameters received none of the sent tensors (vLLM's
  finalize would silently put its old weights back), or when a parameter that holds a sent tensor
  1:1 (norms, embeddings; not fused or repacked ones) does not hash, read back, to what arrived.
* a new `init_weight_transfer_engine` (after a learner restart or a re-registration) starts
  from a fresh receiver: no store connection or group survives it (a receive still running on
  the old one finishes by its own deadline and is discarded).

LoRA (`model.lora`, design §6.7): a sync then carries the adapter only, received and staged the
same way; `treerpo_install_adapter` takes it and registers it with vLLM's LoRA manager as a NEW
adapter id (`install_adapter`), between engine steps, with no pause and no weight reload:
* all or nothing: the adapter is built from copies of what arrived (the stager reuses its
  buffers), and a module vLLM cannot adapt, a rank above `max_lora_rank` or a full registry
  fails it (`WeightSyncError('load')`) with nothing registered;
* never an eviction: vLLM's registry would silently drop its least recently used adapter, and a
  request of a dropped in-memory adapter kills the engine; an install that would need a place
  fails instead (the actor waits for room first and removes each version once no request uses it).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import set_current_vllm_config
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.layers.attention import is_deferred_attention_layer
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

from common.errors import one_line
from common.wire import WeightAnnounce, WireError, decode_message
from weightsync.errors import WeightSyncError
from weightsync.layout import torch_dtype
from weightsync.receiver import Expected, WeightReceiver, expected_installed, installed_mismatches

BACKEND = "treerpo"  # actor/vllm_engine.py TRANSFER_BACKEND
JOIN_GRACE_S = 5.0  # beyond the announcement's deadline: the receive's own waits end by it
LISTEN_POLL_MS = 200  # how often a listening stager checks whether it was closed


def register() -> None:
    """The `vllm.general_plugins` entry point: register the "treerpo" weight-transfer engine (idempotent)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, TreeRPOTransferEngine)


def refresh_tied_lm_head(model: torch.nn.Module) -> bool:
    """Re-run the tied LM head's post-load processing (on CPU it packs its own copy of the embedding
    for the GEMM); layerwise reload only puts its kernel tensors back. True if there was one."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if not getattr(config, "tie_word_embeddings", False) or method is None:
        return False
    method.process_weights_after_loading(head)
    return True


def unloaded_layers(model: torch.nn.Module) -> list[str]:
    """Layers with parameters that received none of the weights loaded since
    `initialize_layerwise_reload` (call it before `finalize_layerwise_reload`, which would put their
    old weights back with only a log line). Not counted: attention layers (vLLM finalizes them
    apart; their scales are optional), layers without parameters (a rotary cache is a buffer), and a
    layer whose parameters are all shared with one that did load (a tied LM head)."""
    layers = []
    for name, layer in model.named_modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load() or info.kernel_tensors is None:
            continue
        params = [t for t in info.kernel_tensors[0].values() if t.numel()]
        layers.append((name, layer, info, params))
    loaded = {id(t) for _, _, info, params in layers if info.load_numel > 0 for t in params}
    # a tied LM head that holds a packed copy of the embedding (vLLM's CPU GEMM, at SmolLM2's sizes)
    # shares no tensor with it: it follows the embedding through refresh_tied_lm_head instead
    tied_head = getattr(model, "lm_head", None) if getattr(getattr(model, "config", None), "tie_word_embeddings",
                                                           False) else None
    return [name for name, layer, info, params in layers
            if info.load_numel <= 0 and not is_deferred_attention_layer(layer) and layer is not tied_head
            and any(id(t) not in loaded for t in params)]


@torch.no_grad()
def load_layerwise(model: torch.nn.Module, model_config: Any, named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Install HF-named tensors the way vLLM's own weight-transfer engines do (layerwise reload);
    returns the layers that received none of them (`unloaded_layers`: they keep their old weights)."""
    initialize_layerwise_reload(model)
    try:
        model.load_weights(iter(named))
        unloaded = unloaded_layers(model)
    finally:
        finalize_layerwise_reload(model, model_config)
    refresh_tied_lm_head(model)
    return unloaded


def lora_modules(manager: Any) -> set[str]:
    """The module names (last component, as an HF checkpoint names them: q_proj, not qkv_proj) that
    vLLM's LoRA manager can adapt in this model (`manager`: the worker's `lora_manager`)."""
    adapters = manager._adapter_manager
    out: set[str] = set()
    for module in adapters.supported_lora_modules:
        out.update(adapters.packed_modules_mapping.get(module, [module]))
    return out


def _raw_tensors(items: list[tuple[str, str, list[int], bytes]]) -> list[tuple[str, torch.Tensor]]:
    """(name, dtype, shape, raw bytes) -> tensors: how tensors cross vLLM's RPC (its msgpack would
    turn a tensor into lists)."""
    return [(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch_dtype(dtype)).reshape(shape)
             if raw else torch.empty(shape, dtype=torch_dtype(dtype))) for name, dtype, shape, raw in items]


@torch.no_grad()
def install_adapter(manager: Any, lora_id: int, named: list[tuple[str, torch.Tensor]], rank: int, alpha: float,
                    targets: list[str]) -> int:
    """Register the adapter `named` (PEFT's saved names, common/lora.py) with vLLM's LoRA manager as
    adapter `lora_id` and copy it into a slot, the way vLLM loads one from disk
    (`WorkerLoRAManager._load_adapter`) but from tensors; returns the adapters now registered.

    Raises WeightSyncError('load') with nothing registered when the id is taken, the registry is full
    (one more would evict an adapter that requests may still use), the rank exceeds vLLM's
    `max_lora_rank`, or a tensor names a module vLLM cannot adapt."""
    from vllm.lora.lora_model import LoRAModel  # noqa: PLC0415 -- only LoRA engines load it
    from vllm.lora.peft_helper import PEFTHelper  # noqa: PLC0415

    adapters = manager._adapter_manager  # LRUCacheLoRAModelManager
    if lora_id in adapters.list_adapters():
        raise WeightSyncError("load", f"LoRA id {lora_id} is registered already: an adapter version is never "
                              "replaced in place (running requests and cached KV use it)")
    if len(adapters) >= adapters.capacity:
        raise WeightSyncError("load", f"all {adapters.capacity} places of vLLM's adapter registry (max_cpu_loras) "
                              f"are taken ({sorted(adapters.list_adapters())}): one more would evict one")
    try:
        peft = PEFTHelper.from_dict({"r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                                     "vllm_max_position_embeddings": manager.max_position_embeddings})
        peft.validate_legal(manager.lora_config)
        model = adapters.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            lora_id, {n: t.clone() for n, t in named},  # own copies: the stager receives the next sync into `named`
            peft_helper=peft, device="cpu", dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    except ValueError as e:
        raise WeightSyncError("load", f"vLLM refused the adapter: {one_line(e)}") from e
    known = lora_modules(manager)
    unknown = sorted(n for n in lora.loras if n.rsplit(".", 1)[-1] not in known)
    if unknown:
        raise WeightSyncError("load", f"{len(unknown)} adapted modules are not LoRA modules of vLLM's model "
                              f"(e.g. {unknown[:3]}; it adapts {sorted(known)})")
    try:
        adapters.add_adapter(lora)  # packs q/k/v -> qkv_proj and gate/up -> gate_up_proj as vLLM's layers are
        adapters.activate_adapter(lora_id)  # into a slot now: a bad tensor fails here, not in a step
    except BaseException as e:
        adapters.remove_adapter(lora_id)
        raise WeightSyncError("load", f"vLLM could not install the adapter: {one_line(e)}") from e
    return len(adapters)


class Stager:
    """Receives the syncs of one transfer engine into staging buffers (`WeightReceiver`), and notes
    what the model's 1:1 parameters must hold once they are installed (`expected_installed`).

    With a `channel` (the actor's private ZeroMQ PAIR address) a thread of its own listens there:
    each `WeightAnnounce` (the wire's encoding, validated on decode) is received at once, while
    generation goes on, and answered with a JSON line {"sync_id", "error": "" or the failure's
    text with its `[reason]`}. The thread touches neither vLLM's RPC queues nor the model's
    weights: an RPC while generating competes with the engine's own traffic, and the install is
    `take`n in the pause. Without a channel, or for a sync nobody announced there, `take` receives
    inline. One receive at a time; the thread owns the receiver while it runs."""

    def __init__(self, receiver: WeightReceiver, model: torch.nn.Module, device: torch.device,
                 channel: str = "") -> None:
        self.receiver, self.model, self.device = receiver, model, device
        self._lock = threading.Condition()
        self._busy: int | None = None  # the sync being received
        self._outcome: dict[int, tuple[Any, BaseException | None]] = {}  # sync id -> (staged...) or error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if channel:
            self._thread = threading.Thread(target=self._listen, args=(channel,), name="treerpo-receive", daemon=True)
            self._thread.start()

    def _receive(self, announce: WeightAnnounce) -> tuple[list[tuple[str, torch.Tensor]], Expected, dict[str, Any]]:
        staged: list[tuple[str, torch.Tensor]] = []
        checksum, seconds = self.receiver.receive(announce, staged.extend, checksum_received=True)
        expected = expected_installed(self.model.named_parameters(), staged, self.receiver.last_digests)
        return staged, expected, {"sync_id": int(announce.sync_id), "version": int(announce.version),
                                  "checksum": checksum, "receive_s": seconds}

    def _run(self, announce: WeightAnnounce) -> BaseException | None:
        """Receive `announce` and record the outcome (taken by `take`); returns the error, if any."""
        sync_id = int(announce.sync_id)
        with self._lock:
            self._busy = sync_id
            self._outcome.clear()  # a staged sync nobody took is superseded
        try:
            outcome: tuple[Any, BaseException | None] = (self._receive(announce), None)
        except BaseException as e:  # noqa: BLE001 - recorded for `take`, and answered on the channel
            traceback.clear_frames(e.__traceback__)  # the frames may hold the group
            outcome = (None, e)
        with self._lock:
            self._busy = None
            self._outcome[sync_id] = outcome
            self._lock.notify_all()
        return outcome[1]

    def _listen(self, channel: str) -> None:
        import zmq  # noqa: PLC0415 -- vLLM's own dependency; only a listening stager needs it

        context = zmq.Context()
        sock = context.socket(zmq.PAIR)
        sock.linger = 0
        try:
            sock.connect(channel)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # a new thread starts on device 0
            while not self._stop.is_set():
                if not sock.poll(LISTEN_POLL_MS):
                    continue
                raw = sock.recv()
                try:
                    announce = decode_message(raw)
                    if not isinstance(announce, WeightAnnounce):
                        raise WireError("bad_kind", f"expected a WeightAnnounce, got {type(announce).__name__}")
                except (ValueError, TypeError) as e:  # WireError is a ValueError
                    sock.send(json.dumps({"sync_id": -1, "error": f"[invalid_announce] {e}"}).encode())
                    continue
                error = self._run(announce)
                sock.send(json.dumps({"sync_id": int(announce.sync_id), "error": str(error)[:4000] if error else ""})
                          .encode())
        finally:
            sock.close()
            context.term()
            self.receiver.close()

    def take(self, announce: WeightAnnounce) -> tuple[list[tuple[str, torch.Tensor]], Expected, dict[str, Any]]:
        """The staged outcome of `announce` (waiting, by its deadline, for a receive in progress),
        received now if nobody began it; raises the receive's error. A channel's driver takes a sync
        only once the channel answered for it."""
        sync_id = int(announce.sync_id)
        with self._lock:
            ended = self._lock.wait_for(lambda: self._busy != sync_id,
                                        float(announce.timeout_s) + JOIN_GRACE_S)
            outcome = self._outcome.pop(sync_id, None)
            if not ended:
                raise WeightSyncError("timeout", f"sync {sync_id}: the receive did not end by its deadline")
        if outcome is None:  # not announced on the channel: receive here, inline
            self._run(announce)
            with self._lock:
                outcome = self._outcome.pop(sync_id)
        result, error = outcome
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Stop listening; the receiver (store connection, kept group, buffers) is closed now, or by
        the listening thread once a receive in progress ended (by its deadline)."""
        self._stop.set()
        if self._thread is None or not self._thread.is_alive():
            self.receiver.close()


@dataclass
class TreeRPOInitInfo(WeightTransferInitInfo):
    host: str  # the learner's rendezvous store
    port: int
    timeout_s: float = 60.0
    checksum: bool = True  # weights.checksum
    channel: str = ""  # the actor's private ZeroMQ PAIR address for announcements (`Stager`); "": none


@dataclass
class TreeRPOUpdateInfo(WeightTransferUpdateInfo):
    announce: dict[str, Any] = field(default_factory=dict)  # common.wire.WeightAnnounce's fields


class TreeRPOTransferEngine(WeightTransferEngine[TreeRPOInitInfo, TreeRPOUpdateInfo]):
    """treerpo's sync protocol (design §6) as a vLLM weight-transfer engine; see the module docstring."""

    init_info_cls = TreeRPOInitInfo
    update_info_cls = TreeRPOUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.stager: Stager | None = None
        self.staged: list[tuple[str, torch.Tensor]] | None = None  # taken by update_weights, for finish
        self.expected: Expected = {}
        self.report: dict[str, Any] = {}

    def init_transfer_engine(self, init_info: TreeRPOInitInfo) -> None:
        self.shutdown()
        receiver = WeightReceiver(checksum=init_info.checksum, stage_on_host=self.device.type != "cpu")
        self.stager = Stager(receiver, self.model, self.device, init_info.channel)

    def start_weight_update(self) -> None:
        self.staged, self.expected, self.report = None, {}, {}

    def receive_weights(self, update_info: TreeRPOUpdateInfo) -> None:
        """Take the announced sync, staged before the pause (received now if it was not)."""
        if self.stager is None:
            raise RuntimeError("init_weight_transfer_engine must come before update_weights")
        self.staged, self.expected, self.report = self.stager.take(WeightAnnounce(**update_info.announce))

    def finish_weight_update(self) -> None:
        if self.staged is None:
            raise RuntimeError("finish_weight_update without a complete update_weights")
        t0 = time.perf_counter()
        staged, self.staged = self.staged, None
        version = self.report.get("version")
        unloaded = load_layerwise(self.model, self.model_config, staged)
        if unloaded:
            raise WeightSyncError("load", f"version {version}: {len(unloaded)} layers received none of the tensors "
                                  f"sent (e.g. {unloaded[:3]}); vLLM kept their old weights, so the version was "
                                  "not switched")
        self.report["load_s"] = time.perf_counter() - t0
        wrong = installed_mismatches(self.model.named_parameters(), self.expected)
        if wrong:
            raise WeightSyncError("load", f"version {version}: {len(wrong)} of the {len(self.expected)} parameters "
                                  f"checked do not hold what arrived after the install (e.g. {wrong[:3]}), so the "
                                  "version was not switched")
        self.report["installed_checked"] = len(self.expected)
        self.report["install_s"] = time.perf_counter() - t0

    def abort(self) -> None:
        self.staged = None

    def shutdown(self) -> None:
        if self.stager is not None:
            self.stager.close()
        self.stager, self.staged = None, None


class TreeRPOWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); `self` is the worker."""

    def treerpo_sync_report(self) -> dict[str, Any]:
        """What the latest update did: sync_id, version, checksum, receive_s, load_s, installed_checked."""
        return dict(self.weight_transfer_engine.report)

    def treerpo_abort_update(self) -> bool:
        """End a started update without installing anything (the driver gave up on it)."""
        if self.weight_transfer_engine is not None:
            self.weight_transfer_engine.abort()
            self.weight_transfer_engine.reset_weight_update_target()
        self._weight_update_active = False
        return True

    def treerpo_load_tensors(self, items: list[tuple[str, str, list[int], bytes]]) -> int:
        """Install (name, dtype, shape, raw bytes) tensors with layerwise reload (`VLLMEngine.load_weights`;
        a subset may be loaded: the layers it leaves out keep their weights)."""
        named = _raw_tensors(items)
        with set_current_vllm_config(self.vllm_config):
            load_layerwise(self.model_runner.get_model(), self.model_config, named)
        return len(named)

    def treerpo_parameter_specs(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, dtype) of the worker's parameters in vLLM's layout (diagnostics, tests)."""
        return [(n, list(p.shape), str(p.dtype).removeprefix("torch."))
                for n, p in self.model_runner.get_model().named_parameters()]

    # -- LoRA (model.lora) -----------------------------------------------------------------------
    def treerpo_install_adapter(self, announce: dict[str, Any], lora_id: int, rank: int, alpha: float,
                                targets: list[str]) -> dict[str, Any]:
        """Take the staged adapter sync `announce` (received now if nobody staged it) and register it as
        LoRA `lora_id` (`install_adapter`); returns the sync's report (checksum of what arrived, ...)."""
        engine = self.weight_transfer_engine
        if engine is None or engine.stager is None:
            raise RuntimeError("init_weight_transfer_engine must come before treerpo_install_adapter")
        staged, _, report = engine.stager.take(WeightAnnounce(**announce))
        t0 = time.perf_counter()
        report["registered"] = install_adapter(self.model_runner.lora_manager, lora_id, staged, rank, alpha, targets)
        report["install_s"] = time.perf_counter() - t0
        engine.report = report
        return dict(report)

    def treerpo_load_adapter(self, items: list[tuple[str, str, list[int], bytes]], lora_id: int, rank: int,
                             alpha: float, targets: list[str]) -> int:
        """Register (name, dtype, shape, raw bytes) adapter tensors as LoRA `lora_id` (`VLLMEngine.load_adapter`)."""
        return install_adapter(self.model_runner.lora_manager, lora_id, _raw_tensors(items), rank, alpha, targets)

    def treerpo_lora_modules(self) -> list[str]:
        """The module names vLLM can adapt in this model (`lora_modules`), sorted."""
        return sorted(lora_modules(self.model_runner.lora_manager))

    def treerpo_lora_state(self) -> dict[str, list[int]]:
        """The adapter ids registered with vLLM's LoRA manager, and those in its slots (diagnostics, tests)."""
        adapters = self.model_runner.lora_manager._adapter_manager
        return {"registered": sorted(adapters.list_adapters()),
                "slots": sorted(i for i in adapters.lora_index_to_id if i is not None)}
