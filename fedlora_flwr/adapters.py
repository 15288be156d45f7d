"""Named PEFT LoRA adapters on every conv and linear layer of a model (or on named target modules), all active at once.

PF2LoRA (arXiv 2503.03920) adapts each weight as W_k = W0 + B·A + D_k·C_k: a common adapter
("common", rank r) and a client adapter ("client", rank r̃), both PEFT LoRA adapters injected with
``peft.inject_adapter_in_model`` and summed in the forward (PEFT's several active adapters). The
state-dict keys name the adapter: ``<layer>.lora_A.common.weight``, ``<layer>.lora_B.client.weight``;
W0 moves to ``<layer>.base_layer.weight``. For a conv layer PEFT's A is a conv with the layer's
kernel and stride (r output channels) and B a 1×1 conv, i.e. ΔW = B·A on W viewed as
out × (in·k·k).

Our choices where the paper is silent: scaling lora_alpha/r with lora_alpha = 2r (scaling 2 for
every adapter), LoRA init (A and C Kaiming-uniform from the global torch RNG, B = D = 0, so the
adapted model computes what the plain model computes), no LoRA dropout (the finite-difference
checks of ``tests/test_pf2lora.py`` need a deterministic loss). On a pretrained text model the adapters go
only on ``target_modules`` (PEFT's suffix match, e.g. BERT's ``query``/``value``), as for the LoRA methods.

``peft`` is imported when first needed: importing it (and transformers) takes tens of seconds,
which the methods without adapters should not pay.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

COMMON, CLIENT = "common", "client"


def adapter_key(adapter: str) -> str:
    """The substring that marks a state-dict key of ``adapter`` (``.lora_A.<adapter>.``, …)."""
    return f".{adapter}."


def is_adapter_key(key: str, adapter: str) -> bool:
    return ".lora_" in key and adapter_key(adapter) in key


def add_lora_adapters(model: nn.Module, ranks: Mapping[str, int], target_modules: Sequence[str] | None = None) -> nn.Module:
    """Inject one LoRA adapter per ``{name: rank}`` into every nn.Conv2d / nn.Linear of ``model``
    (or into the modules named ``target_modules``; in place, in the mapping's order) and make them
    all active; returns ``model``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if target_modules is None:
        targets = [name for name, module in model.named_modules() if type(module) in (nn.Conv2d, nn.Linear)]
        if not targets:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to adapt")
        pattern = "|".join(re.escape(name) for name in targets)  # a string: PEFT full-matches module names
    else:
        pattern = list(target_modules)  # a list: PEFT matches module-name suffixes
    for adapter, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank of adapter {adapter!r} must be an integer >= 1, got {rank!r}")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern)
        with warnings.catch_warnings():  # several adapters in one model is what we want
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            try:
                model = inject_adapter_in_model(config, model, adapter_name=adapter)
            except ValueError as err:  # e.g. a target module the model does not have
                if target_modules is None:
                    raise
                raise ValueError(f"lora-target-modules={','.join(pattern)!r}: {str(err).splitlines()[0]}") from None
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(ranks))
    return model
