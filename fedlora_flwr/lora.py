"""Low-rank parameter decomposition θ = σ + τ, τ = B·A (FedLoRA, eqs. 2-5).

Every decomposed layer keeps its full-rank weight σ (``weight``/``bias``) at the *same*
state-dict key as the undecomposed layer and adds the personal low-rank factors
``<layer>.lora_A`` and ``<layer>.lora_B`` (names as in PEFT; layout as in the reference code
FedDecomp ``loralib/layers.py``). Hence a decomposed model's state dict is the plain model's
keys plus the ``lora_`` keys: every personal (τ) key contains ``lora_``, no shared (σ) key does.

Code semantics (FedDecomp's ``loralib/layers.py``: what produced the paper's numbers), which
deviate from the paper text where noted:

* Linear ``out×in``: ``lora_A`` (r × in), ``lora_B`` (out × r), ``scaling = 1/r``;
  output ``x Wᵀ + b + scaling · x Aᵀ Bᵀ`` (paper eq. 3).
* Conv ``(O, I, K, K)``: ``lora_A`` (R·K × I·K), ``lora_B`` (O·K × R·K), ``scaling = 1/R``;
  ``ΔW = scaling · (B @ A).view(O, I, K, K)`` — a row-major reinterpretation of the
  contiguous product, no permutation (paper eqs. 4-5 write the transposed layout).
* Ranks: conv R = int(R_c · O) (the paper says R_c·min(I, O)·K), linear
  r = round(R_l · min(in, out)) (the code takes an absolute rank; this is the paper's rule,
  which reproduces the code's runs, e.g. fc 256→10 at 60 % → 6).
* Init: A Kaiming-uniform(a=√5) (the paper says Gaussian), B zeros, so τ = 0 at init and a
  freshly decomposed model computes exactly what the plain model computes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LORA_MODES",
    "LoRAConv2d",
    "LoRALinear",
    "conv_rank",
    "decompose",
    "is_lora_key",
    "linear_rank",
    "lora_layers",
    "lora_mode",
]

LORA_MODES = ("full", "sigma", "tau")


def _check_ratio(ratio: float, what: str = "rank ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"{what} must be a number with 0 < ratio <= 1, got {ratio!r}")
    if not (0.0 < float(ratio) <= 1.0):  # also rejects NaN
        raise ValueError(f"{what} must satisfy 0 < ratio <= 1, got {ratio!r}")
    return float(ratio)


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    return rank


def conv_rank(ratio: float, out_channels: int) -> int:
    """Conv rank R = max(1, int(ratio · out_channels)) (FedDecomp's rule)."""
    ratio = _check_ratio(ratio, "conv rank ratio")
    return max(1, int(ratio * out_channels))


def linear_rank(ratio: float, in_features: int, out_features: int) -> int:
    """Linear rank r = max(1, round(ratio · min(in, out))) (paper eq. 3; Python round)."""
    ratio = _check_ratio(ratio, "linear rank ratio")
    return max(1, round(ratio * min(in_features, out_features)))


def is_lora_key(name: str) -> bool:
    """True iff ``name`` is a personal (τ) parameter key, i.e. contains ``lora_``."""
    return "lora_" in name


class _LoRAMixin:
    """Mode handling shared by the LoRA layers: "full" = σ+τ, "sigma" = σ only, "tau" = τ only."""

    @property
    def lora_mode(self) -> str:
        return self._lora_mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        if mode not in LORA_MODES:
            raise ValueError(f"unknown lora mode {mode!r}; choose one of {LORA_MODES}")
        self._lora_mode = mode

    def _init_lora(self, a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int) -> None:
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.r = rank
        self.scaling = 1.0 / rank  # lora_alpha = 1
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # global RNG, as in loralib
        self._lora_mode = "full"

    def merged_weight(self) -> torch.Tensor:
        """θ = σ + τ (differentiable w.r.t. weight, lora_A and lora_B)."""
        return self.weight + self.delta_weight()


def _copy_param(p: torch.Tensor | None) -> nn.Parameter | None:
    if p is None:
        return None
    return nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


class LoRALinear(_LoRAMixin, nn.Linear):
    """nn.Linear with a personal low-rank delta τ = scaling · B A (FedLoRA eq. 3, FedDecomp's layout)."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        r = _check_rank(r)
        # Build on the meta device (no RNG use, no allocation), then copy σ from ``base``.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta", dtype=base.weight.dtype)
        self.weight = _copy_param(base.weight)
        self.bias = _copy_param(base.bias)
        self.train(base.training)
        self._init_lora((r, self.in_features), (self.out_features, r), r)

    def delta_weight(self) -> torch.Tensor:
        """τ = scaling · B @ A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _tau(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._lora_mode
        if mode == "tau":
            return self._tau(x)
        out = F.linear(x, self.weight, self.bias)
        return out if mode == "sigma" else out + self._tau(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:.4g}, mode={self._lora_mode}"


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    """nn.Conv2d with a personal low-rank delta (FedLoRA eqs. 4-5 in FedDecomp's code layout).

    ``ΔW = scaling · (lora_B @ lora_A).view(O, I, K, K)`` with lora_A (R·K × I·K),
    lora_B (O·K × R·K), scaling = 1/R; forward ``conv(x, W + ΔW, bias)`` (FedDecomp's ``ConvLoRA``).
    """

    def __init__(self, base: nn.Conv2d, r: int) -> None:
        r = _check_rank(r)
        kh, kw = base.kernel_size
        if base.groups != 1 or kh != kw:
            raise ValueError(
                f"LoRAConv2d needs groups=1 and a square kernel; got conv with weight shape "
                f"{tuple(base.weight.shape)}, groups={base.groups}, kernel_size={base.kernel_size}")
        super().__init__(base.in_channels, base.out_channels, base.kernel_size,
                         stride=base.stride, padding=base.padding, dilation=base.dilation,
                         groups=1, bias=base.bias is not None, padding_mode=base.padding_mode,
                         device="meta", dtype=base.weight.dtype)
        self.weight = _copy_param(base.weight)
        self.bias = _copy_param(base.bias)
        self.train(base.training)
        k = kh
        self._init_lora((r * k, self.in_channels * k), (self.out_channels * k, r * k), r)

    def delta_weight(self) -> torch.Tensor:
        """τ = scaling · (B @ A).view(O, I, K, K) (row-major, no permutation)."""
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._lora_mode
        if mode == "sigma":
            return self._conv_forward(x, self.weight, self.bias)
        if mode == "tau":
            return self._conv_forward(x, self.delta_weight(), None)
        return self._conv_forward(x, self.merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:.4g}, mode={self._lora_mode}"


_LORA_TYPES = (LoRALinear, LoRAConv2d)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every LoRA layer of ``model`` (in named_modules order)."""
    for name, module in model.named_modules():
        if isinstance(module, _LORA_TYPES):
            yield name, module


@contextlib.contextmanager
def lora_mode(model: nn.Module, mode: str):
    """Set ``mode`` ("full", "sigma" or "tau") on every LoRA layer; restore the old modes on exit."""
    if mode not in LORA_MODES:
        raise ValueError(f"unknown lora mode {mode!r}; choose one of {LORA_MODES}")
    layers = [m for _, m in lora_layers(model)]
    previous = [m.lora_mode for m in layers]
    try:
        for m in layers:
            m.lora_mode = mode
        yield model
    finally:
        for m, old in zip(layers, previous):
            m.lora_mode = old


def _to_lora(module: nn.Module, rank_conv: float, rank_linear: float) -> nn.Module | None:
    # Exact types only: subclasses (e.g. MultiheadAttention's out_proj) may not call forward().
    if type(module) is nn.Conv2d:
        return LoRAConv2d(module, conv_rank(rank_conv, module.out_channels))
    if type(module) is nn.Linear:
        return LoRALinear(module, linear_rank(rank_linear, module.in_features, module.out_features))
    return None


def decomposable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every nn.Conv2d / nn.Linear that :func:`decompose` replaces (exact types,
    outside any module whose class sets ``decomposable = False``), in ``named_modules`` order, each
    shared layer once."""
    full_rank = [f"{path}." if path else "" for path, module in model.named_modules()
                 if not getattr(module, "decomposable", True)]
    return [(path, module) for path, module in model.named_modules()
            if type(module) in (nn.Conv2d, nn.Linear) and not any(f"{path}.".startswith(p) for p in full_rank)]


def decompose(model: nn.Module, rank_conv: float, rank_linear: float) -> nn.Module:
    """Replace, in place, every nn.Conv2d / nn.Linear (any depth) by its LoRA version, except inside
    a module whose class sets ``decomposable = False`` (the Transformer's feed-forward blocks: FedLoRA
    decomposes its self-attention and classifier only, paper App. E); those layers stay full-rank σ.

    Ratios follow FedDecomp's code (conv R = int(rank_conv·O), linear r = round(rank_linear·min(in,out))).
    σ is copied, B = 0, so outputs are unchanged; ``lora_A`` is drawn from the global torch RNG in
    ``named_modules`` order (seed before calling for reproducible A). Module names are unchanged;
    layers that are already LoRA are left alone. Returns ``model`` (or, if ``model`` itself is a
    bare Conv2d/Linear, its LoRA replacement).
    """
    _check_ratio(rank_conv, "conv rank ratio")
    _check_ratio(rank_linear, "linear rank ratio")
    top = _to_lora(model, rank_conv, rank_linear)
    if top is not None:
        return top
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # every (parent, name) holding a module
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, name))
    for _, module in decomposable_layers(model):
        new = _to_lora(module, rank_conv, rank_linear)
        for parent, name in slots[id(module)]:
            setattr(parent, name, new)
    return model
