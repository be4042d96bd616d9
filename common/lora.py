"""LoRA adapters: which tensors an adapter has, what they are called, and what they add (design §6.7).

`model.lora.rank > 0` trains adapters instead of full weights: for every linear layer whose
module name ends with one of `model.lora.target_modules` (PEFT's matching), W x becomes

    W x + scale * B (A x),     scale = alpha / rank,   A: [rank, in],  B: [out, rank]

and a weight sync sends only the A and B tensors. Both sides name them as PEFT saves them
(`get_peft_model_state_dict`), so a sync, a checkpoint's adapter and `PeftModel.from_pretrained`
agree:

    base_model.model.<module path>.lora_A.weight     base_model.model.<module path>.lora_B.weight

for the base weight `<module path>.weight`. PEFT's live parameter names carry the adapter's name
(`lora_A.default.weight`); `wire_name` drops it. This module is pure: names, shapes and the
delta, with no PEFT import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

PREFIX = "base_model.model."
_LIVE = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")  # lora_A.<adapter name>.weight
_WIRE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Target:
    """One adapted linear layer."""

    module: str  # its module path in the base model, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def a(self) -> str:
        return f"{PREFIX}{self.module}.lora_A.weight"

    @property
    def b(self) -> str:
        return f"{PREFIX}{self.module}.lora_B.weight"


def matches(module: str, targets: Sequence[str]) -> bool:
    """PEFT's target match for a list: the module's name is a target, or ends with '.' + a target."""
    return any(module == t or module.endswith("." + t) for t in targets)


def find_targets(named_weights: Iterable[tuple[str, Sequence[int]]], targets: Sequence[str]) -> list[Target]:
    """The adapted layers of a base model, from its (parameter name, shape) pairs: 2-D `.weight`
    parameters of modules matching `targets`, in parameter order. ValueError if none match."""
    out = []
    for name, shape in named_weights:
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if matches(module, targets):
            out.append(Target(module, int(shape[1]), int(shape[0])))
    if not out:
        raise ValueError(f"model.lora.target_modules={list(targets)} matches no linear layer of the model")
    return out


def adapter_specs(found: Sequence[Target], rank: int) -> list[tuple[str, tuple[int, int]]]:
    """(wire name, shape) of every adapter tensor, A then B per layer, in layer order."""
    out: list[tuple[str, tuple[int, int]]] = []
    for t in found:
        out += [(t.a, (rank, t.in_features)), (t.b, (t.out_features, rank))]
    return out


def wire_name(live: str) -> str:
    """PEFT's live parameter name -> the saved (wire) name: drop the adapter name before `.weight`."""
    return _LIVE.sub(r".lora_\1.weight", live)


def base_weight(wire: str) -> tuple[str, str]:
    """A wire name -> (the base weight it adapts, 'A' or 'B'); ValueError for any other name."""
    m = _WIRE.match(wire)
    if m is None:
        raise ValueError(f"{wire!r} is not a LoRA adapter tensor name (base_model.model.<module>.lora_A/B.weight)")
    return m.group(1) + ".weight", m.group(2)


def delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What the adapter adds to the base weight: scale * B @ A (in fp32 at least, cast back)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return (scale * (b.to(dtype) @ a.to(dtype))).to(b.dtype)


def merged(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
           scale: float) -> dict[str, torch.Tensor]:
    """Base weight name -> base + delta, for every layer `adapter` (wire names) holds both tensors of."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.items():
        weight, which = base_weight(name)
        pairs.setdefault(weight, {})[which] = tensor
    out = {}
    for weight, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter of {weight!r} has only lora_{next(iter(ab))}")
        w = base[weight]
        out[weight] = (w.to(torch.float32) + delta(ab["A"], ab["B"], scale).to(torch.float32)).to(w.dtype)
    return out


def adapter_mismatch(specs: dict[str, tuple[int, int]], named_shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """How (name, shape) pairs differ from exactly the adapter `specs`; "" when they are it."""
    got: dict[str, tuple[int, ...]] = {}
    twice = []
    for name, shape in named_shapes:
        if name in got:
            twice.append(name)
        got[name] = tuple(int(d) for d in shape)
    missing = [n for n in specs if n not in got]
    extra = [n for n in got if n not in specs]
    shaped = [f"{n} {got[n]}, expected {specs[n]}" for n in got if n in specs and got[n] != specs[n]]
    wrong = []
    if missing:
        wrong.append(f"{len(missing)} adapter tensors not sent (e.g. {missing[:3]})")
    if extra:
        wrong.append(f"{len(extra)} tensors not of this model's adapter (e.g. {extra[:3]})")
    if shaped:
        wrong.append(f"{len(shaped)} of another shape (e.g. {shaped[:2]}; the same model.lora.rank on learner and "
                     "actors?)")
    if twice:
        wrong.append(f"{len(twice)} sent twice (e.g. {twice[:3]})")
    return "; ".join(wrong)
