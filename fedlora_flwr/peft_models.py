"""LoRA, rsLoRA and VeRA adapters through PEFT, and the parameter roles methods partition by.

One reusable API for every method that fine-tunes a pretrained model with adapters:

- :class:`AdapterSpec` (kind, rank, α, dropout, target modules) and :func:`wrap`: the model wrapped by
  PEFT's ``get_peft_model`` with a ``LoraConfig`` (``use_rslora`` for rsLoRA: scaling α/√r instead of
  α/r, Kalajdzievski 2023) or a ``VeraConfig`` (Kopiczko et al., ICLR 2024: frozen random A_v, B_v
  shared by all layers, drawn from ``projection_prng_key`` = the same on every client; trainable
  per-layer vectors λ_d ∈ R^r, λ_b ∈ R^out: ΔW x = λ_b ⊙ B_v(λ_d ⊙ A_v x));
- key predicates for :class:`fedlora_flwr.groups.ParameterPartition` rules, on PEFT's parameter
  names: :func:`is_lora_a`, :func:`is_lora_b`, :func:`is_vera_lambda_d`, :func:`is_vera_lambda_b`,
  :func:`is_adapter`, and the rule :data:`is_backbone`: neither adapter nor the model's declared
  head (``fedlora_flwr.structure.in_head``; PEFT's wrapper is looked through), i.e. the pretrained
  weights and VeRA's frozen projections.

LoRA factors start as PEFT initialises them (A Kaiming-uniform from the torch RNG, B zeros): seed
torch before :func:`wrap` and every client starts from the same A (FedSA-LoRA averages A).
PEFT marks only adapter tensors trainable; the training loop overrides that per phase from the
method's partition, so the partition alone decides what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedlora_flwr.groups import none_of
from fedlora_flwr.structure import in_head
from fedlora_flwr.text_models import ModelError

AdapterKind = Literal["lora", "rslora", "vera"]
VERA_PRNG_KEY = 0


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter on ``target_modules`` (PEFT names, e.g. BERT's ``query``/``value``)."""

    kind: AdapterKind
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] = ("query", "value")

    def peft_config(self):
        from peft import LoraConfig, VeraConfig

        targets = list(self.target_modules)
        if self.kind == "vera":
            return VeraConfig(r=self.r, target_modules=targets, vera_dropout=self.dropout,
                              projection_prng_key=VERA_PRNG_KEY, save_projection=True)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_rslora=self.kind == "rslora")


def wrap(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """``model`` with ``spec``'s adapters injected by PEFT (in place: pass a fresh model)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, spec.peft_config())
    except ValueError as err:  # e.g. a target module the model does not have, VeRA on a Conv2d
        raise ModelError(f"lora-target-modules={','.join(spec.target_modules)!r}: {str(err).splitlines()[0]}") from None


def _segment(key: str, name: str) -> bool:
    return f".{name}." in f".{key}."


def is_lora_a(key: str, _module: nn.Module | None = None) -> bool:
    return _segment(key, "lora_A")


def is_lora_b(key: str, _module: nn.Module | None = None) -> bool:
    return _segment(key, "lora_B")


def is_vera_lambda_d(key: str, _module: nn.Module | None = None) -> bool:
    return _segment(key, "vera_lambda_d")


def is_vera_lambda_b(key: str, _module: nn.Module | None = None) -> bool:
    return _segment(key, "vera_lambda_b")


def is_adapter(key: str, _module: nn.Module | None = None) -> bool:
    """A trainable adapter tensor (LoRA factors or VeRA vectors; not VeRA's frozen projections)."""
    return is_lora_a(key) or is_lora_b(key) or is_vera_lambda_d(key) or is_vera_lambda_b(key)


#: The pretrained weights (and VeRA's frozen random projections): neither adapter nor head.
is_backbone = none_of(is_adapter, in_head)


def scaling(model: nn.Module) -> dict[str, float]:
    """The LoRA scaling factor of every adapted layer (α/r, or α/√r with rsLoRA), by module name."""
    return {name: float(module.scaling["default"]) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and isinstance(getattr(module, "scaling", None), dict)}
