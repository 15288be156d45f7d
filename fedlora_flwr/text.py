"""Text classification data: AG_NEWS, tokenised once per process.

``load_dataset("agnews", data_dir)`` (``fedlora_flwr.data``) returns a :class:`TextDataset`: the raw
texts and int64 labels of both splits (label order 0 World, 1 Sports, 2 Business, 3 Sci/Tech). The
partitions are the images' (``fedlora_flwr.data.partition``: the paper's Dirichlet protocol with a
fixed number of samples per client, the test split drawn with the client's q), computed from the
labels alone.

Where the texts come from:

- ``data-dir`` is ``agnews.jsonl.gz`` or a folder holding it (``../shared/data/agnews``, format in its
  README: JSON lines ``{"split", "label", "text"}``): the offline copy (4,000 train rows, the full
  7,600-row official test split);
- otherwise Hugging Face ``ag_news`` through ``datasets`` (120,000 / 7,600 rows, cached under
  ``data-dir``); offline that is a one-line :class:`DatasetError`.

A client's samples are a LongTensor of token ids (N, L) padded with the tokenizer's pad id, so the
one training loop batches them like images; the text model derives its attention mask as
``ids != pad_id`` (``fedlora_flwr.text_models``). :func:`tokenized` tokenises a whole dataset once per
process, keyed by (tokenizer, max length, data source): every later client of the process only
indexes the cached tensors.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlora_flwr.data import DatasetError, TaskSpec

AGNEWS_FILE = "agnews.jsonl.gz"
AGNEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
TEXT_DATASETS: tuple[str, ...] = ("agnews",)


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Raw texts and labels of a text classification dataset (read-only arrays).

    Has the attributes the partition code reads from an image dataset (``y_train``, ``y_test``,
    ``num_classes``, ``test_with_replacement``); ``source`` names where the texts came from (the
    cache key of the tokenised tensors)."""

    texts_train: tuple[str, ...]
    y_train: np.ndarray
    texts_test: tuple[str, ...]
    y_test: np.ndarray
    num_classes: int
    source: str
    test_with_replacement: bool = False

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(num_classes=self.num_classes, modality="text")


@dataclass(frozen=True, eq=False)
class TokenizedText:
    """A :class:`TextDataset` tokenised by one tokenizer: (N, L) int64 token ids padded with
    ``pad_id``, shared by every client of the process (:meth:`tensors` hands out copies)."""

    ids_train: torch.Tensor
    ids_test: torch.Tensor
    y_train: torch.Tensor
    y_test: torch.Tensor
    pad_id: int
    num_classes: int

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(num_classes=self.num_classes, modality="text")

    def augmentation(self, backend: str = "per-sample") -> None:
        """Text samples are not augmented (whatever the backend)."""
        return None

    def tensors(self, indices: np.ndarray, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and labels of samples ``indices`` of the train or test split (copies)."""
        idx = torch.from_numpy(np.array(indices, dtype=np.int64))
        ids, y = (self.ids_train, self.y_train) if train else (self.ids_test, self.y_test)
        return ids[idx], y[idx]


def load_text_dataset(name: str, path: str) -> TextDataset:
    """``name`` from ``path`` (the resolved ``data-dir``); see the module docstring."""
    if name != "agnews":
        raise DatasetError(f"dataset: unknown text dataset {name!r}; choose one of {', '.join(TEXT_DATASETS)}")
    location = Path(path)
    file = location if location.is_file() else location / AGNEWS_FILE
    if file.is_file():
        return _agnews_from_file(file)
    return _agnews_from_hub(location)


def _agnews_from_file(file: Path) -> TextDataset:
    texts: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    try:
        with gzip.open(file, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                row = json.loads(line)
                split, label, text = row.get("split"), row.get("label"), row.get("text")
                if split not in texts or label not in range(len(AGNEWS_CLASSES)) or not isinstance(text, str):
                    raise DatasetError(
                        f"data-dir: {file} line {number}: expected {{'split': 'train'|'test', 'label': 0..3, "
                        f"'text': str}}, got {line[:80]!r}"
                    )
                texts[split].append(text)
                labels[split].append(label)
    except DatasetError:
        raise
    except Exception as exc:  # a truncated gzip, a line that is not JSON
        raise DatasetError(f"data-dir: cannot read {file} as gzipped JSON lines ({type(exc).__name__}: {exc})") from exc
    if not labels["train"] or not labels["test"]:
        raise DatasetError(f"data-dir: {file} has an empty split (train {len(labels['train'])}, test {len(labels['test'])})")
    return _build(texts, labels, source=str(file))


def _agnews_from_hub(cache_dir: Path) -> TextDataset:
    try:
        import datasets

        hub = datasets.load_dataset("ag_news", cache_dir=str(cache_dir))
    except Exception as exc:  # offline: ConnectionError / OfflineModeIsEnabled / DatasetNotFoundError
        raise DatasetError(
            f"data-dir: no {AGNEWS_FILE} at {cache_dir} and Hugging Face 'ag_news' could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); point data-dir at "
            f"../shared/data/agnews or run once online"
        ) from exc
    texts = {split: list(hub[split]["text"]) for split in ("train", "test")}
    labels = {split: list(hub[split]["label"]) for split in ("train", "test")}
    return _build(texts, labels, source="hf:ag_news")


def _build(texts: dict[str, list[str]], labels: dict[str, list[int]], source: str) -> TextDataset:
    def readonly(values: list[int]) -> np.ndarray:
        array = np.asarray(values, dtype=np.int64)
        array.setflags(write=False)
        return array

    return TextDataset(
        texts_train=tuple(texts["train"]),
        y_train=readonly(labels["train"]),
        texts_test=tuple(texts["test"]),
        y_test=readonly(labels["test"]),
        num_classes=len(AGNEWS_CLASSES),
        source=source,
    )


def tokenized(dataset: TextDataset, tokenizer_path: str, max_length: int) -> TokenizedText:
    """``dataset`` tokenised by the tokenizer at ``tokenizer_path`` (truncated and padded to
    ``max_length``); computed once per process per (tokenizer, max length, data source)."""
    return _tokenize_cached(tokenizer_path, int(max_length), dataset.source, dataset)


@functools.lru_cache(maxsize=4)
def _tokenize_cached(tokenizer_path: str, max_length: int, source: str, dataset: TextDataset) -> TokenizedText:
    from fedlora_flwr.text_models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)

    def encode(texts: tuple[str, ...]) -> torch.Tensor:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                            return_tensors="pt", return_attention_mask=False)
        return encoded["input_ids"].to(torch.int64)

    return TokenizedText(
        ids_train=encode(dataset.texts_train),
        ids_test=encode(dataset.texts_test),
        y_train=torch.from_numpy(dataset.y_train.copy()),
        y_test=torch.from_numpy(dataset.y_test.copy()),
        pad_id=int(tokenizer.pad_token_id),
        num_classes=dataset.num_classes,
    )
