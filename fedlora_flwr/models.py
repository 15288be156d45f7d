"""Models: ResNet-8 / ResNet-10 exactly as FedDecomp / Fling (``LoraResnet1.py``, ``resnet.py``), a
small CNN, and pFedLoRA's heterogeneous CNN-1..5 (FedGH's ``CNNs.py``), grouped in the model family
``cnn-hetero``.

All models take NCHW float input of shape (N, 3, 32, 32); the ResNets and the CNN also accept
64×64 (Tiny ImageNet, fed unresized), CNN-1..5 only 32×32. Each is a
:class:`fedlora_flwr.structure.Classifier` whose declared head is ``fc`` (the "head" of FedPer,
FedRep and FedRoD), on top of ``features(x)`` (the "body"). Decompose them with
:func:`fedlora_flwr.lora.decompose`.

A *model family* (:data:`MODEL_FAMILIES`) gives clients different architectures: client k builds
member ``k mod len(family)`` (run-config key ``model-family``). Register one by adding an entry
whose members are :data:`MODELS` names; for pFedLoRA their heads must share ``in_features``
(the adapter acts on that representation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import functools
from pathlib import Path

import torch
import torch.nn as nn

from fedlora_flwr.structure import Classifier, head
from fedlora_flwr.text_models import HF_PREFIX, MINILM, TRANSFORMER_SMALL, ModelError, text_classifier, transformer_small

__all__ = ["MODELS", "MODEL_FAMILIES", "BasicBlock", "HeteroCNN", "ResNet", "SmallCNN", "build_model",
           "family_member", "image_backbone", "image_lora_targets", "resnet8", "resnet10", "small_cnn"]


def _init_weights(model: nn.Module) -> None:
    """Conv: Kaiming-normal(fan_out, relu); BN: weight 1, bias 0; Linear: PyTorch default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3×3(s)→BN→ReLU→conv3×3→BN, + shortcut (identity or conv1×1(s)→BN), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(Classifier):
    """ImageNet-style stem (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) + one BasicBlock per stage.

    Module names (FedDecomp's): ``conv1``, ``bn1``, ``layers.{s}.0.{conv1,bn1,conv2,bn2}``,
    ``layers.{s}.0.downsample.{0,1}``, ``fc``.
    """

    HEAD = "fc"

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(widths) != len(strides) or not widths:
            raise ValueError("widths and strides must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, in_planes = [], 64
        for width, stride in zip(widths, strides):
            stages.append(nn.Sequential(BasicBlock(in_planes, width, stride)))
            in_planes = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation ``fc`` classifies (the body's output: FedPer, FedRep and FedRoD share it)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return torch.flatten(self.avgpool(x), 1)



def resnet8(num_classes: int) -> ResNet:
    """ResNet-8: widths 64/128/256, strides 1/2/2 (FedLoRA's CIFAR-10 model)."""
    return ResNet((64, 128, 256), (1, 2, 2), num_classes)


def resnet10(num_classes: int) -> ResNet:
    """ResNet-10: widths 64/128/256/512, strides 1/2/2/2 (FedLoRA's CIFAR-100 / Tiny model)."""
    return ResNet((64, 128, 256, 512), (1, 2, 2, 2), num_classes)


class SmallCNN(Classifier):
    """A small fast CNN for tests and CPU experiments (ours, not from the FedLoRA paper).

    Three conv3×3 → BN → ReLU stages (32, 64, 128 channels; max-pool 2 after the first two),
    global average pooling, ``fc`` (128 → C): ≈10 M MACs and ≈95 k parameters per 32×32 sample.
    Built like the paper's ResNets (BatchNorm after every conv, global pooling, one linear layer)
    so that the paper's SGD lr 0.1 / momentum 0.9 stays stable on one- or two-class clients: an
    earlier variant with a 4096→128 hidden linear layer diverged there (losses above 100 on the
    α = 0.1 CIFAR-10 partition) and collapsed a 40-client FedLoRA run. Runs in channels_last.
    """

    HEAD = "fc"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        _init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation ``fc`` classifies (the body's output: FedPer, FedRep and FedRoD share it)."""
        # channels_last: ~2x faster on CPU (max-pool NCHW is slow); the math is unchanged.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        return torch.flatten(self.avgpool(x), 1)



def small_cnn(num_classes: int) -> SmallCNN:
    return SmallCNN(num_classes)


class HeteroCNN(Classifier):
    """One of pFedLoRA's CNN-1..5 (from the authors' group's FedGH ``CNNs.py``).

    conv 5×5 3→16 (no padding) → ReLU → max-pool 2 → conv 5×5 16→``conv2_channels`` → ReLU →
    max-pool 2 → flatten → ``fc1`` (→ ``fc1_width``) → ReLU → ``fc2`` (→ 500) → ReLU: the 500-d
    representation h every member shares; ``fc`` (FedGH's FC3, 500 → C) classifies it. No
    BatchNorm; PyTorch's default init (as FedGH's code).
    """

    HEAD = "fc"
    REPRESENTATION = 500

    def __init__(self, conv2_channels: int, fc1_width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.conv2 = nn.Conv2d(16, conv2_channels, 5)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(conv2_channels * 5 * 5, fc1_width)
        self.fc2 = nn.Linear(fc1_width, self.REPRESENTATION)
        self.fc = nn.Linear(self.REPRESENTATION, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h: the 500-d representation ``fc`` classifies (pFedLoRA's adapter reads it too)."""
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.relu(self.fc2(x))



#: (conv2 filters, FC1 width) of CNN-1..5 (FedGH's ``CNNs.py``; all else is common).
HETERO_CNNS = {"cnn-1": (32, 2000), "cnn-2": (16, 2000), "cnn-3": (32, 1000), "cnn-4": (32, 800), "cnn-5": (32, 500)}

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet10": resnet10,
    "cnn": small_cnn,
    # Text (token-id input; fedlora_flwr.text_models): the pretrained MiniLM-L6 ("hf:<name>" also
    # builds) and FedLoRA's Table 6 Transformer, trained from scratch.
    MINILM: functools.partial(text_classifier, MINILM),
    TRANSFORMER_SMALL: transformer_small,
    **{name: (lambda num_classes, c=conv2, w=fc1: HeteroCNN(c, w, num_classes)) for name, (conv2, fc1) in HETERO_CNNS.items()},
}

MODEL_FAMILIES: dict[str, tuple[str, ...]] = {
    # pFedLoRA / FedGH: client k gets CNN-((k mod 5) + 1), as FedGH's code assigns them.
    "cnn-hetero": tuple(HETERO_CNNS),
}


def family_member(family: str, partition_id: int) -> str:
    """The model client ``partition_id`` builds in ``family``: member ``partition_id mod size``."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(MODEL_FAMILIES)}")
    members = MODEL_FAMILIES[family]
    return members[int(partition_id) % len(members)]


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a registered model (``MODELS``, or ``hf:<name>``) for ``num_classes`` classes."""
    if name not in MODELS and not name.startswith(HF_PREFIX):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name.startswith(HF_PREFIX):
        return text_classifier(name, num_classes)
    return MODELS[name](num_classes)


def image_backbone(name: str, num_classes: int, path: str) -> nn.Module:
    """Image model ``name`` with every tensor but its declared head read from the safetensors file
    ``path`` (e.g. a fedavg run's ``shared.safetensors``, whose keys are the model's state-dict
    keys); the head comes from the torch RNG as the text track's ``classifier`` (seed first), so
    the file's own head is not read and a backbone serves any class count. A missing file or
    tensor, or a tensor of another shape, is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = build_model(name, num_classes)
    if not Path(path).is_file():
        raise ModelError(f"backbone={path!r}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ModelError(f"backbone={path!r}: not a safetensors file ({type(err).__name__}: {err})") from None
    declared = head(model)
    wanted = {key: value for key, value in model.state_dict().items() if not declared.owns(key)}
    for key, value in wanted.items():
        if key not in tensors:
            raise ModelError(f"backbone={path!r}: no tensor {key!r} for model={name}")
        if tensors[key].shape != value.shape:
            raise ModelError(f"backbone={path!r}: {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"model={name} needs {tuple(value.shape)}")
    model.load_state_dict({key: tensors[key] for key in wanted}, strict=False)
    return model


def image_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The layers LoRA adapts on an image backbone: every Conv2d and Linear but its declared head."""
    declared = head(model).name
    return tuple(name for name, module in model.named_modules()
                 if isinstance(module, nn.Conv2d | nn.Linear) and name != declared)
