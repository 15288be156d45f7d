"""Run-config keys that several methods read, as reusable :class:`MethodParams` models.

A method's own keys are a model built from these (multiple inheritance) plus its own fields; each
key is documented once, here or in the one method that reads it.
"""

from __future__ import annotations

from pydantic import Field

from fedlora_flwr.config import MethodParams


class Decomposition(MethodParams):
    """FedLoRA's σ + B·A decomposition of every conv/linear weight (FedLoRA paper eqs. 2–5; rank rule
    of its official code: conv R = int(R_c·O), linear r = round(R_l·min(in, out)))."""

    rank_conv: float = Field(0.6, gt=0, le=1, description="R_c: rank ratio of the conv layers' B·A")
    rank_linear: float = Field(0.6, gt=0, le=1, description="R_l: rank ratio of the linear layers' B·A")


class LocalSteps(MethodParams):
    """Methods that count local mini-batch steps (FedSA-LoRA: 10 steps of batch 128; PF2LoRA's I)."""

    local_steps: int = Field(10, ge=0, description="local mini-batch steps per round; 0: local-epochs epochs")


class TargetModules(MethodParams):
    """Where adapters go on a pretrained model."""

    lora_target_modules: str = Field("", description="comma-separated module names adapters go on; \"\": "
                                     "query,value on a text model, every Conv2d and Linear but the head on an "
                                     "image backbone")


class AdapterInput(TargetModules):
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input (FedSA-LoRA)")


class LoRA(LocalSteps, AdapterInput):
    """PEFT LoRA on a frozen pretrained model (FedSA-LoRA paper §3)."""

    lora_r: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA α: scaling α/r, or α/√r with rsLoRA")
