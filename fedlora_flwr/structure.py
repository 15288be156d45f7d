"""How a model declares its structure: a body ``features(x)`` and a head, named in one place.

Every model the framework builds is a :class:`Classifier`: ``features(x)`` is the representation
(the body's output) and the class attribute ``HEAD`` names the submodule that maps it to logits
(``fc`` on the image models and ``TransformerSmall``, ``classifier`` on the pretrained
``TextClassifier``). FedPer's personal layer, FedRep's head phase and FedRoD's generic head are
that head (``fc`` in Fling's and PFLlib's versions of them); the adapter methods keep it out of
the frozen backbone (FedSA-LoRA keeps its ``classifier`` personal); pFedLoRA's adapter reads the
representation it classifies.

:func:`head` finds the declaration in any model tree: a method's wrapper (pFedGate's
``GatedModel.base``, pFedLoRA's ``PFedLoRAModel.local``) or PEFT's ``PeftModel``
(``base_model.model``) holds the declaring model as a submodule, and the head's name is qualified
by where it sits. :data:`in_head` is the partition rule "this key belongs to the head", bound to
the model it partitions (:class:`fedlora_flwr.groups.ModelRule`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedlora_flwr.groups import KeyRule, ModelRule


class Classifier(nn.Module, abc.ABC):
    """A model = body :meth:`features` + head ``getattr(self, HEAD)``; ``forward = head(features(x))``."""

    #: The attribute name of the head submodule (set by every subclass).
    HEAD: ClassVar[str]

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head classifies, (N, head input width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.HEAD)(self.features(x))


@dataclass(frozen=True)
class Head:
    """A model's declared head: its module name within the model (``fc``, ``local.fc``,
    ``base_model.model.classifier``), the module, and the :class:`Classifier` declaring it."""

    name: str
    module: nn.Module
    body: Classifier

    def owns(self, key: str) -> bool:
        """Whether the state-dict key ``key`` (of the model :func:`head` was given) is the head's."""
        return key.startswith(f"{self.name}.")


def head(model: nn.Module) -> Head:
    """The head of the outermost :class:`Classifier` in ``model`` (``model`` itself or a submodule);
    a model that declares none is a ValueError naming its type."""
    for name, module in model.named_modules():
        if isinstance(module, Classifier):
            prefix = f"{name}." if name else ""
            return Head(name=prefix + module.HEAD, module=getattr(module, module.HEAD), body=module)
    raise ValueError(f"{type(model).__name__} declares no head: it is not and holds no "
                     f"fedlora_flwr.structure.Classifier (a body features(x) and a head named by HEAD)")


def _bind_head(model: nn.Module) -> KeyRule:
    declared = head(model)

    def owned(key: str, _module: nn.Module | None = None) -> bool:
        return declared.owns(key)

    return owned


#: Partition rule: the key belongs to the model's declared head (weight and bias, and any adapter
#: or wrapper inside it, e.g. PF2LoRA's ``fc.base_layer`` and ``fc.lora_A.*``).
in_head = ModelRule("in_head", _bind_head)
