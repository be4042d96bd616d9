"""The HF engine's LoRA (model.lora; common/lora.py, design §6.7): adapter versions merged into the
engine's copy of the model.

Guarantees:
* a sync must hold exactly the model's adapter: every A and B of every adapted layer
  (`common.lora.find_targets` of the base model, shapes from `model.lora.rank`) and nothing else;
  anything else is refused (EngineError) before a weight changes;
* each version is merged from the base weights kept aside at start (W = W0 + scale * B @ A), never
  from the previous version, so rounding never accumulates over versions;
* `read_back()` returns the adapter tensors in force (copies of what was installed), so the sync's
  checksum proves what the engine holds, as a full sync's read-back does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.config import LoraConfig
from common.errors import EngineError
from common.lora import adapter_mismatch, adapter_specs, find_targets, merged


class MergedAdapter:
    """LoRA for an HF model held in memory: the base weights of the adapted layers, and the version in force."""

    def __init__(self, model: torch.nn.Module, lora: LoraConfig) -> None:
        params = dict(model.named_parameters())
        try:
            self.targets = find_targets(((n, p.shape) for n, p in params.items()), lora.target_modules)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.specs = dict(adapter_specs(self.targets, lora.rank))
        self.scale = lora.scale
        self._params = {t.weight: params[t.weight] for t in self.targets}
        self._base = {w: p.detach().clone() for w, p in self._params.items()}
        self._installed: list[tuple[str, torch.Tensor]] = []

    def check(self, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors by name, if they are exactly this model's adapter (EngineError otherwise)."""
        named = list(named)
        wrong = adapter_mismatch(self.specs, ((n, t.shape) for n, t in named))
        if wrong:
            raise EngineError(f"LoRA sync: not this model's adapter (model.lora): {wrong}")
        return dict(named)

    def install(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Merge this adapter into the model's weights (call under the engine's lock); the number of layers."""
        adapter = self.check(named)
        with torch.no_grad():
            for t in self.targets:
                param, base, a, b = self._params[t.weight], self._base[t.weight], adapter[t.a], adapter[t.b]
                if param.dtype == a.dtype == b.dtype == torch.float32:  # one pass, no temporaries
                    torch.addmm(base, b, a, alpha=self.scale, out=param.data)
                else:  # in fp32, rounded once to the weight's dtype
                    param.data.copy_(merged({t.weight: base}, {t.a: a, t.b: b}, self.scale)[t.weight])
        self._installed = [(n, adapter[n].detach().clone()) for n in self.specs]
        return len(self.targets)

    def read_back(self) -> list[tuple[str, torch.Tensor]]:
        """The adapter tensors in force (empty before the first install)."""
        return list(self._installed)
