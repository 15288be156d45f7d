"""Models: ResNet-8 / ResNet-10 exactly as FedDecomp / Fling (METHODS.md A.3), and a small CNN.

All models take NCHW float input of shape (N, 3, 32, 32); the ResNets and the CNN also accept
64×64 (Tiny ImageNet, fed unresized). Each has a classifier ``fc`` (the "head" of FedPer, FedRep
and FedRoD) on top of ``features(x)`` (the "body"). Decompose them with :func:`fedlora_flwr.lora.decompose`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import functools

import torch
import torch.nn as nn

from fedlora_flwr.text_models import HF_PREFIX, MINILM, text_classifier

__all__ = ["MODELS", "BasicBlock", "ResNet", "SmallCNN", "build_model", "resnet8", "resnet10",
           "small_cnn"]


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


class ResNet(nn.Module):
    """ImageNet-style stem (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) + one BasicBlock per stage.

    Module names (METHODS A.3): ``conv1``, ``bn1``, ``layers.{s}.0.{conv1,bn1,conv2,bn2}``,
    ``layers.{s}.0.downsample.{0,1}``, ``fc``.
    """

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
        """The representation ``fc`` classifies (the body's output, METHODS.md E.3–E.6)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet8(num_classes: int) -> ResNet:
    """ResNet-8: widths 64/128/256, strides 1/2/2 (FedLoRA's CIFAR-10 model)."""
    return ResNet((64, 128, 256), (1, 2, 2), num_classes)


def resnet10(num_classes: int) -> ResNet:
    """ResNet-10: widths 64/128/256/512, strides 1/2/2/2 (FedLoRA's CIFAR-100 / Tiny model)."""
    return ResNet((64, 128, 256, 512), (1, 2, 2, 2), num_classes)


class SmallCNN(nn.Module):
    """A small fast CNN for tests and CPU experiments (ours, not from the FedLoRA paper).

    Three conv3×3 → BN → ReLU stages (32, 64, 128 channels; max-pool 2 after the first two),
    global average pooling, ``fc`` (128 → C): ≈10 M MACs and ≈95 k parameters per 32×32 sample.
    Built like the paper's ResNets (BatchNorm after every conv, global pooling, one linear layer)
    so that the paper's SGD lr 0.1 / momentum 0.9 stays stable on one- or two-class clients: an
    earlier variant with a 4096→128 hidden linear layer diverged there (losses above 100 on the
    α = 0.1 CIFAR-10 partition) and collapsed a 40-client FedLoRA run. Runs in channels_last.
    """

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
        """The representation ``fc`` classifies (the body's output, METHODS.md E.3–E.6)."""
        # channels_last: ~2x faster on CPU (max-pool NCHW is slow); the math is unchanged.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def small_cnn(num_classes: int) -> SmallCNN:
    return SmallCNN(num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet10": resnet10,
    "cnn": small_cnn,
    # Text (token-id input; fedlora_flwr.text_models): the pretrained MiniLM-L6; "hf:<name>" also builds.
    MINILM: functools.partial(text_classifier, MINILM),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a registered model (``MODELS``, or ``hf:<name>``) for ``num_classes`` classes."""
    if name not in MODELS and not name.startswith(HF_PREFIX):
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name.startswith(HF_PREFIX):
        return text_classifier(name, num_classes)
    return MODELS[name](num_classes)
