"""What a method needs from the run's model and data, declared once per method and checked before
anything is written: an incompatible method × model pair is refused in one line naming both and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedlora_flwr.lora import decomposable_layers
from fedlora_flwr.structure import head

if TYPE_CHECKING:
    from fedlora_flwr.config import RunConfig

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class Requirements:
    """What a method needs from the run's model and data; :meth:`check_config` before any model is
    built (data modality, pretrained weights, a model family, bf16), :meth:`check_model` on the
    plain model of the run (a head, BatchNorm, decomposable layers)."""

    modalities: tuple[Modality, ...] = ("image", "text")
    #: ``never``: trains from scratch (no pretrained encoder, no ``backbone``); ``required``:
    #: fine-tunes a pretrained encoder (``minilm``, ``hf:``) or an image ``backbone``.
    pretrained: Literal["never", "optional", "required"] = "optional"
    #: A body ``features(x)`` and a declared classification head (FedPer, FedRep, FedRoD, pFedLoRA).
    head: bool = False
    #: BatchNorm layers (FedBN keeps them personal).
    batchnorm: bool = False
    #: Conv/linear layers that FedLoRA's σ + B·A decomposition applies to.
    decomposable: bool = False
    #: Reads an image ``backbone`` (the adapter methods); every other method refuses one.
    image_backbone: bool = False
    #: Federates a ``model-family`` (what it uploads does not depend on the architecture).
    model_family: bool = False
    #: Runs under ``precision = "bf16"``.
    bf16: bool = True

    def check_config(self, config: RunConfig, method: str) -> None:
        """Raise ``ValueError`` (one line naming the method, the key and why) for a config it cannot honour."""
        modality = "text" if config.text else "image"
        if modality not in self.modalities:
            raise ValueError(f"method={method!r} needs {' or '.join(self.modalities)} data; "
                             f"dataset={config.dataset!r} is {modality}")
        model = config.model_family or config.model
        if config.backbone and not self.image_backbone:
            raise ValueError(f"method={method!r} does not fine-tune an image backbone; backbone={config.backbone!r} "
                             "is for the adapter methods (fedsa-lora, lora, local-lora, ...)")
        if self.pretrained == "never" and config.pretrained:
            what = f"backbone={config.backbone!r}" if config.backbone else f"model={model!r} (a pretrained encoder)"
            raise ValueError(f"method={method!r} trains from scratch; {what} is pretrained")
        if self.pretrained == "required" and not config.pretrained:
            raise ValueError(f"method={method!r} fine-tunes a pretrained model; model={model!r} is trained from "
                             "scratch: set model=minilm or hf:<name>, or backbone=<safetensors> for an image model")
        if config.model_family and not self.model_family:
            raise ValueError(f"method={method!r} shares architecture-dependent tensors; "
                             f"model-family={config.model_family!r} gives clients different architectures")
        if config.precision == "bf16" and not self.bf16:
            raise ValueError(f"method={method!r} runs in float32 only; precision='bf16' is refused, use fp32")

    def check_model(self, model: nn.Module, config: RunConfig, method: str) -> None:
        """Raise ``ValueError`` (one line naming the method, the model and why) when the plain model
        of the run lacks what the method needs."""
        name = config.model_family or config.model
        if self.head:
            try:
                head(model)
            except ValueError:
                raise ValueError(f"method={method!r} needs a model with a body features() and a declared "
                                 f"classification head; model={name!r} ({type(model).__name__}) declares none") from None
        if self.batchnorm and not any(isinstance(module, _BatchNorm) for module in model.modules()):
            raise ValueError(f"method={method!r} keeps the BatchNorm layers personal; model={name!r} has no "
                             "BatchNorm layer, so it would silently be FedAvg")
        if self.decomposable and not decomposable_layers(model):
            raise ValueError(f"method={method!r} decomposes conv/linear layers into σ + B·A; model={name!r} has none")
