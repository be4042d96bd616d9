"""The vLLM worker side of treerpo's weight sync: a weight-transfer engine and a worker extension.

This module runs inside vLLM's worker process (it imports vLLM at the top; nothing in the actor
process imports it). vLLM finds it twice:

* `register`, named by treerpo's `vllm.general_plugins` entry point (pyproject.toml), which vLLM
  calls in every process it starts, registers `TreeRPOTransferEngine` as the weight-transfer
  backend "treerpo" (`WeightTransferEngineFactory`); the actor's `AsyncLLM` is built with
  `weight_transfer_config={"backend": "treerpo"}`, so the worker creates one at model load;
* `TreeRPOWorkerExtension` is the `worker_extension_cls`: a few RPCs around the engine.

Guarantees of one update (`start_weight_update` -> `update_weights` -> `finish_weight_update`):

* `update_weights` joins the learner's announced sync group from this process (gloo, or NCCL
  straight onto the worker's GPU) with `actor.weights.WeightReceiver`: the announcement's
  deadline bounds the rendezvous and every bucket, a dead learner fails it, a failure is
  reported to the learner's store ("alive, but failed"), and the checksum is that of what
  arrived (`weights.checksum`). The announcement's secret (passed through with its other
  fields) admits only the learner: the group forms on store values MAC'd with it, and what
  arrived must match the learner's seal before it is staged (design §6.1). Buckets are staged
  in host memory; on a GPU only a bounded ring of buckets lives on the device (no whole-model
  copy beside vLLM's `gpu_memory_utilization`).
  The model is not touched: a failed receive leaves the weights as they were;
* `finish_weight_update` installs the staged tensors with vLLM's layerwise reload
  (`initialize_layerwise_reload`, the model's own `load_weights`, `finalize_layerwise_reload`),
  so vLLM's fused (q/k/v -> qkv_proj), repacked (on CPU a packed GEMM handle; the parameter reads
  back with shape [0]) and quantized layouts are rebuilt by vLLM's own post-load processing; a
  tied LM head, which receives no weights of its own, has its post-load processing re-run so it
  follows the new embedding (layerwise reload skips tied parameters);
* a new `init_weight_transfer_engine` (after a learner restart or a re-registration) starts
  from a fresh receiver: no store connection or group survives it.
"""

from __future__ import annotations

import time
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
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from actor.weights import WeightReceiver
from common.weightsync import torch_dtype
from common.wire import WeightAnnounce

BACKEND = "treerpo"  # actor/vllm_engine.py TRANSFER_BACKEND


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


@torch.no_grad()
def load_layerwise(model: torch.nn.Module, model_config: Any, named: list[tuple[str, torch.Tensor]]) -> None:
    """Install HF-named tensors the way vLLM's own weight-transfer engines do (layerwise reload)."""
    initialize_layerwise_reload(model)
    try:
        model.load_weights(iter(named))
    finally:
        finalize_layerwise_reload(model, model_config)
    refresh_tied_lm_head(model)


@dataclass
class TreeRPOInitInfo(WeightTransferInitInfo):
    host: str  # the learner's rendezvous store
    port: int
    timeout_s: float = 60.0
    checksum: bool = True  # weights.checksum


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
        self.receiver: WeightReceiver | None = None
        self.staged: list[tuple[str, torch.Tensor]] | None = None
        self.report: dict[str, Any] = {}

    def init_transfer_engine(self, init_info: TreeRPOInitInfo) -> None:
        self.shutdown()
        self.receiver = WeightReceiver(checksum=init_info.checksum, stage_on_host=self.device.type != "cpu")

    def start_weight_update(self) -> None:
        self.staged, self.report = None, {}

    def receive_weights(self, update_info: TreeRPOUpdateInfo) -> None:
        if self.receiver is None:
            raise RuntimeError("init_weight_transfer_engine must come before update_weights")
        announce = WeightAnnounce(**update_info.announce)
        staged: list = []
        checksum, seconds = self.receiver.receive(announce, staged.extend, checksum_received=True)
        self.staged = staged
        self.report = {"sync_id": announce.sync_id, "version": announce.version, "checksum": checksum,
                       "receive_s": seconds}

    def finish_weight_update(self) -> None:
        if self.staged is None:
            raise RuntimeError("finish_weight_update without a complete update_weights")
        t0 = time.perf_counter()
        staged, self.staged = self.staged, None
        load_layerwise(self.model, self.model_config, staged)
        self.report["load_s"] = time.perf_counter() - t0

    def abort(self) -> None:
        self.staged = None

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        self.receiver, self.staged = None, None


class TreeRPOWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); `self` is the worker."""

    def treerpo_sync_report(self) -> dict[str, Any]:
        """What the latest update received: sync_id, version, checksum, receive_s, load_s."""
        return dict(self.weight_transfer_engine.report)

    def treerpo_abort_update(self) -> bool:
        """End a started update without installing anything (the driver gave up on it)."""
        if self.weight_transfer_engine is not None:
            self.weight_transfer_engine.abort()
            self.weight_transfer_engine.reset_weight_update_target()
        self._weight_update_active = False
        return True

    def treerpo_load_tensors(self, items: list[tuple[str, str, list[int], bytes]]) -> int:
        """Install (name, dtype, shape, raw bytes) tensors with layerwise reload (`VLLMEngine.load_weights`)."""
        named = [(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch_dtype(dtype)).reshape(shape)
                  if raw else torch.empty(shape, dtype=torch_dtype(dtype))) for name, dtype, shape, raw in items]
        with set_current_vllm_config(self.vllm_config):
            load_layerwise(self.model_runner.get_model(), self.model_config, named)
        return len(named)

    def treerpo_parameter_specs(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, dtype) of the worker's parameters in vLLM's layout (diagnostics, tests)."""
        return [(n, list(p.shape), str(p.dtype).removeprefix("torch."))
                for n, p in self.model_runner.get_model().named_parameters()]
