"""Datasets, client partitions and training tensors.

Three layers, each cached per process (simulated clients run in reused Ray
actors, and loading the CIFAR-10 npz alone takes ~1.7 s):

1. ``load_dataset(name, data_dir)`` -> :class:`ImageDataset` (uint8 HWC images,
   int64 labels, normalisation statistics, whether training uses augmentation);
   ``task_spec(name, data_dir)`` -> :class:`TaskSpec` (class count, image shape)
   without loading the data, for the ServerApp (a SuperLink holds no data).
2. ``partition(y_train, y_test, num_clients, scheme, ...)`` -> one
   :class:`ClientSplit` (train/test index arrays) per client;
   ``client_split(name, data_dir, partition_id, cfg)`` loads, partitions and
   caches the whole federation and returns one client's split.
3. ``client_tensors`` (float32 NCHW, normalised, on the training device) and ``batches``
   (a DataLoader replacement without worker overhead, for ~500-sample clients), with the
   training augmentation per sample (torchvision, ``make_augment``) or batched on the
   device (``make_batched_augment``; run config ``augment-backend``).

The cached arrays are made read-only: they are shared by every client of the
process, so a client that modified them in place would corrupt the others.

Paths: ``data_dir`` is resolved against the current working directory of the
process that calls :func:`load_dataset` (``Path(data_dir).expanduser().resolve()``).
Under ``flwr run`` that is the SuperLink's working directory, so pass absolute
paths there.

Protocol reference: the FedLoRA paper's official code, FedDecomp (``utils/sampling.py``
``dirichlet_noniid`` and ``utils/get_dataset.py``).
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fedlora_flwr.text import TextDataset

__all__ = [
    "AUGMENT_BACKENDS",
    "DATASETS",
    "SCHEMES",
    "AugmentParams",
    "ClientSplit",
    "DatasetError",
    "ImageDataset",
    "PartitionConfig",
    "TaskSpec",
    "apply_augment",
    "augment_backend",
    "batches",
    "client_split",
    "client_tensors",
    "dirichlet_noniid",
    "draw_augment_params",
    "load_dataset",
    "make_augment",
    "make_batched_augment",
    "partition",
    "partition_dataset",
    "task_spec",
]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet", "npz", "synthetic", "agnews")
SCHEMES: tuple[str, ...] = ("dirichlet", "pathological", "iid")

HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
CIFAR100_MEAN = (0.507, 0.487, 0.441)
CIFAR100_STD = (0.267, 0.256, 0.276)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

#: The paper's training augmentations (FedDecomp's ``get_dataset.py``), by the name an :class:`ImageDataset` gives:
#: CIFAR-100 RandomCrop(32, pad 4) + HFlip + RandomRotation(15); Tiny ImageNet HFlip + RandomRotation(15).
AUGMENTATIONS: tuple[str, ...] = ("crop-flip-rotate", "flip-rotate")


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says which setting to fix."""


# --------------------------------------------------------------------------- #
# 1. Datasets
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TaskSpec:
    """What a model builder needs to know of the data: class count and one image's (C, H, W),
    or ``modality="text"`` (samples are token ids; their length is the run's ``max-seq-length``)."""

    num_classes: int
    image_shape: tuple[int, int, int] = (3, 32, 32)
    modality: str = "image"


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A train/test image classification dataset held in memory.

    Images are uint8 ``N x H x W x C``, labels int64; both read-only.
    ``mean``/``std`` are the per-channel normalisation on the [0, 1] scale;
    ``train_augment`` names the paper's training augmentation (one of
    :data:`AUGMENTATIONS`; ``""`` for none: CIFAR-10, npz, synthetic).
    ``test_with_replacement``: the Dirichlet protocol draws each client's test
    samples with replacement (Tiny ImageNet: its val split, 50 per class, is the
    test split, as in FedDecomp's ``get_dataset.py``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_augment: str = ""
    test_with_replacement: bool = False

    @property
    def spec(self) -> TaskSpec:
        height, width, channels = self.x_train.shape[1:]
        return TaskSpec(num_classes=self.num_classes, image_shape=(int(channels), int(height), int(width)))

    def augmentation(
        self, backend: str = "per-sample"
    ) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None:
        """The training augmentation as a batch function for :func:`batches` (None for none), by
        ``backend`` (``per-sample`` or ``batched``, see :func:`augment_backend`)."""
        if not self.train_augment:
            return None
        if backend == "batched":
            return make_batched_augment(self.train_augment, self.mean, self.std)
        if backend == "per-sample":
            return make_augment(self.train_augment, self.mean, self.std, size=int(self.x_train.shape[1]))
        raise ValueError(f"augmentation backend: {backend!r} is neither 'per-sample' nor 'batched'")


def load_dataset(name: str, data_dir: str | Path = "") -> ImageDataset | TextDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`), cached per process.

    ``data_dir`` is the torchvision root for ``cifar10``/``cifar100`` (the
    extracted ``cifar-*-python`` folder or its ``.tar.gz`` must already be
    there when offline), the folder holding ``tiny-imagenet-200/`` (or that
    folder itself) for ``tiny-imagenet``, the ``.npz`` file for ``npz``, and
    ignored for ``synthetic``; text datasets: see ``fedlora_flwr.text``. The cache is keyed on
    (name, resolved path).
    """
    if name not in DATASETS:
        raise DatasetError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _load_cached(name, _path_key(name, data_dir))


def _npz_spec(path: Path) -> TaskSpec:
    """The class count (max label + 1, as :func:`_load_npz`) from the label arrays and the image
    shape from ``x_train``'s .npy header: the images themselves are not read."""
    if not path.is_file():
        raise DatasetError(f"data-dir: {path} is not a file; dataset=npz needs the .npz file (only its labels are read)")
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x_train.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, _ = read_header[version](member)
        with np.load(path, allow_pickle=False) as arrays:
            num_classes = 1 + max(int(arrays[key].astype(np.int64).max(initial=-1)) for key in ("y_train", "y_test"))
    except Exception as exc:  # BadZipFile, KeyError (a missing array or header version), ValueError
        raise DatasetError(f"data-dir: cannot read {path} as .npz ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 4:
        raise DatasetError(f"data-dir: {path}: x_train must be N x H x W x C images, got shape {shape}")
    return TaskSpec(num_classes=num_classes, image_shape=(int(shape[3]), int(shape[1]), int(shape[2])))


#: What each dataset is, known without its data: ``name -> function(resolved data path) -> TaskSpec``.
#: The ServerApp builds the initial model from it (a SuperLink holds no data); a client checks its
#: loaded data against it. A new dataset adds one entry here (a test compares each with the loaded data).
TASK_SPECS: dict[str, Callable[[Path], TaskSpec]] = {
    "cifar10": lambda _: TaskSpec(num_classes=10, image_shape=(3, 32, 32)),
    "cifar100": lambda _: TaskSpec(num_classes=100, image_shape=(3, 32, 32)),
    "tiny-imagenet": lambda _: TaskSpec(num_classes=200, image_shape=(3, 64, 64)),
    "npz": _npz_spec,
    "synthetic": lambda _: TaskSpec(num_classes=SYNTHETIC_CLASSES, image_shape=(3, SYNTHETIC_SIZE, SYNTHETIC_SIZE)),
    "agnews": lambda _: TaskSpec(num_classes=4, modality="text"),  # fedlora_flwr.text.AGNEWS_CLASSES
}


def task_spec(name: str, data_dir: str | Path = "") -> TaskSpec:
    """Dataset ``name``'s class count and image shape without loading it (see :data:`TASK_SPECS`);
    ``npz`` reads only its labels and an array header. Cached per process like :func:`load_dataset`."""
    if name not in DATASETS:
        raise DatasetError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _task_spec_cached(name, _path_key(name, data_dir))


@functools.lru_cache(maxsize=4)
def _task_spec_cached(name: str, path: str) -> TaskSpec:
    return TASK_SPECS[name](Path(path))


def _path_key(name: str, data_dir: str | Path) -> str:
    if name == "synthetic":
        return ""
    if data_dir is None or str(data_dir) == "":
        raise DatasetError(f"data-dir: dataset {name!r} needs data-dir (got an empty path)")
    return str(Path(data_dir).expanduser().resolve())


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, path: str) -> ImageDataset | TextDataset:
    if name == "agnews":
        from fedlora_flwr.text import load_text_dataset  # text data lives in its own module

        return load_text_dataset(name, path)
    if name == "cifar10":
        return _load_torchvision("CIFAR10", Path(path), HALF_MEAN, HALF_STD, augment="")
    if name == "cifar100":
        return _load_torchvision("CIFAR100", Path(path), CIFAR100_MEAN, CIFAR100_STD, augment="crop-flip-rotate")
    if name == "tiny-imagenet":
        return _load_tiny_imagenet(Path(path))
    if name == "npz":
        return _load_npz(Path(path))
    if name == "synthetic":
        return _make_synthetic()
    raise DatasetError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _build(x_tr, y_tr, x_te, y_te, mean, std, augment, num_classes=None, test_with_replacement=False) -> ImageDataset:
    y_tr = np.asarray(y_tr).astype(np.int64)
    y_te = np.asarray(y_te).astype(np.int64)
    if num_classes is None:
        num_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1))) + 1
    return ImageDataset(
        x_train=_readonly(x_tr),
        y_train=_readonly(y_tr),
        x_test=_readonly(x_te),
        y_test=_readonly(y_te),
        num_classes=int(num_classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        train_augment=augment,
        test_with_replacement=test_with_replacement,
    )


def _load_torchvision(cls_name: str, root: Path, mean, std, *, augment: str) -> ImageDataset:
    import torchvision.datasets as tvd  # lazy: ~3 s import, only needed here

    cls = getattr(tvd, cls_name)
    try:
        train = cls(root=str(root), train=True, download=True)
        test = cls(root=str(root), train=False, download=True)
    except Exception as exc:  # URLError offline, RuntimeError on corrupt files, ...
        folder = cls.base_folder
        raise DatasetError(
            f"data-dir: could not load {cls_name} from {root} "
            f"({type(exc).__name__}: {exc}); put the extracted {folder!r} folder "
            f"(or {cls.filename}) under data-dir, or run once with internet access"
            + (", or use dataset=npz with data-dir=<path to cifar10.npz>" if cls_name == "CIFAR10" else "")
        ) from exc
    num_classes = len(train.classes)
    return _build(train.data, train.targets, test.data, test.targets, mean, std, augment, num_classes)


def _load_npz(path: Path) -> ImageDataset:
    if not path.is_file():
        raise DatasetError(
            f"data-dir: {path} is not a file; for dataset=npz set data-dir to an .npz "
            f"file with arrays {', '.join(NPZ_KEYS)} (e.g. ../shared/data/cifar10/cifar10.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in NPZ_KEYS if k not in keys]
            extra = sorted(keys - set(NPZ_KEYS))
            if missing or extra:
                raise DatasetError(
                    f"data-dir: {path} must hold exactly the arrays {', '.join(NPZ_KEYS)}; "
                    f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
                )
            arrays = {k: z[k] for k in NPZ_KEYS}
    except DatasetError:
        raise
    except Exception as exc:  # BadZipFile, ValueError (pickled objects), OSError
        raise DatasetError(f"data-dir: cannot read {path} as .npz ({type(exc).__name__}: {exc})") from exc

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise DatasetError(
                f"data-dir: {path}: x_{split} must be uint8 N x H x W x 3 images, "
                f"got dtype {x.dtype} shape {x.shape}"
            )
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DatasetError(
                f"data-dir: {path}: y_{split} must be a 1-D integer label array, got dtype {y.dtype} shape {y.shape}"
            )
        if len(x) != len(y):
            raise DatasetError(f"data-dir: {path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if len(y) == 0:
            raise DatasetError(f"data-dir: {path}: the {split} split is empty")
        if y.min() < 0:
            raise DatasetError(f"data-dir: {path}: y_{split} has negative labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DatasetError(
            f"data-dir: {path}: train images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in size"
        )
    return _build(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], HALF_MEAN, HALF_STD, ""
    )


def _load_tiny_imagenet(root: Path) -> ImageDataset:
    """Tiny ImageNet (Le & Yang, 2015) from its official zip's layout, as FedDecomp uses it
    (``utils/get_dataset.py``): the 100,000 train images, and the 10,000 labelled val images as the test
    split (the official test images have no labels). 64x64 RGB (the few grayscale JPEGs are
    converted), labels = the index of the wnid in sorted order (torchvision ``ImageFolder``'s
    rule), CIFAR-100 normalisation, train augmentation HFlip + RandomRotation(15).

    ``root`` holds ``tiny-imagenet-200/`` (downloaded and extracted there when missing and
    online) or is that folder. Decoding is done once per process and cached like every dataset:
    about 3,300 images/s on one busy core here (3,500 generated 64x64 JPEGs), so ≈ 35 s and
    1.3 GB of arrays for the whole set.
    """
    from PIL import Image

    folder = root if (root / "wnids.txt").is_file() else root / TINY_FOLDER
    if not folder.is_dir():
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINY_URL, download_root=str(root), md5=TINY_MD5)
        except Exception as exc:  # URLError offline, a corrupt archive, ...
            raise DatasetError(
                f"data-dir: no {TINY_FOLDER}/ under {root} and the download failed "
                f"({type(exc).__name__}: {exc}); extract {TINY_FOLDER}.zip there"
            ) from exc

    def read(paths: list[Path]) -> np.ndarray:
        images = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                if image.size != (64, 64):
                    raise DatasetError(f"data-dir: {path} is {image.size[0]}x{image.size[1]}, expected 64x64")
                images[i] = np.asarray(image.convert("RGB"))
        return images

    try:
        wnids = sorted((folder / "wnids.txt").read_text().split())
        label = {wnid: i for i, wnid in enumerate(wnids)}
        train_paths, train_labels = [], []
        for wnid in wnids:
            paths = sorted((folder / "train" / wnid / "images").glob("*.JPEG"))
            if not paths:
                raise DatasetError(f"data-dir: {folder / 'train' / wnid / 'images'} holds no .JPEG images")
            train_paths += paths
            train_labels += [label[wnid]] * len(paths)
        test_paths, test_labels = [], []
        for number, line in enumerate((folder / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in label:
                raise DatasetError(
                    f"data-dir: {folder / 'val' / 'val_annotations.txt'} line {number}: expected "
                    f"'<file>\\t<wnid from wnids.txt>\\t...', got {line[:80]!r}"
                )
            test_paths.append(folder / "val" / "images" / fields[0])
            test_labels.append(label[fields[1]])
        x_train, x_test = read(train_paths), read(test_paths)
    except DatasetError:
        raise
    except Exception as exc:  # a missing file or folder, an undecodable image
        raise DatasetError(f"data-dir: cannot read Tiny ImageNet from {folder} ({type(exc).__name__}: {exc})") from exc
    return _build(
        x_train, train_labels, x_test, test_labels, CIFAR100_MEAN, CIFAR100_STD, "flip-rotate",
        num_classes=len(wnids), test_with_replacement=True,
    )


SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32
SYNTHETIC_TRAIN_PER_CLASS = 500  # enough for the paper's 500/100 protocol at any alpha
SYNTHETIC_TEST_PER_CLASS = 100


def _make_synthetic(seed: int = 0) -> ImageDataset:
    """10 classes of 32x32x3 uint8 images: a fixed smooth template per class + noise.

    Each template is a sum of three low-frequency 2-D cosines per channel around
    mid-grey; each sample adds i.i.d. Gaussian pixel noise (std 60) and a
    per-sample brightness offset, then is clipped to 0..255. It is an easy
    fixture for fast tests (a nearest-class-mean classifier is ~100% accurate;
    a small CNN is far above chance within an epoch or two), not a benchmark.
    500 train / 100 test per class, so the paper's 500/100 Dirichlet protocol
    works at any alpha. Stored in shuffled order (like the CIFAR-10 npz).
    """
    rng = np.random.default_rng(seed)
    c, hw = SYNTHETIC_CLASSES, SYNTHETIC_SIZE
    yy, xx = np.meshgrid(np.arange(hw), np.arange(hw), indexing="ij")
    templates = np.full((c, hw, hw, 3), 128.0, dtype=np.float32)
    for k in range(c):
        for ch in range(3):
            for _ in range(3):
                fy, fx = rng.integers(0, 4, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                amp = rng.uniform(20, 45)
                templates[k, :, :, ch] += amp * np.cos(2 * np.pi * (fy * yy + fx * xx) / hw + phase)

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(c, dtype=np.int64), per_class)
        y = y[rng.permutation(len(y))]
        noise = rng.standard_normal((len(y), hw, hw, 3), dtype=np.float32) * 60.0
        shift = rng.uniform(-20, 20, size=(len(y), 1, 1, 1)).astype(np.float32)
        x = np.clip(np.rint(templates[y] + noise + shift), 0, 255).astype(np.uint8)
        return x, y

    x_tr, y_tr = draw(SYNTHETIC_TRAIN_PER_CLASS)
    x_te, y_te = draw(SYNTHETIC_TEST_PER_CLASS)
    return _build(x_tr, y_tr, x_te, y_te, HALF_MEAN, HALF_STD, False, c)


# --------------------------------------------------------------------------- #
# 2. Partitions
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """One client's data: int64 indices into the dataset's train and test arrays; ``validation``:
    indices into the train arrays held out of training (:func:`hold_out_validation`; none by default)."""

    train: np.ndarray
    test: np.ndarray
    validation: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


#: The third word of a validation split's seed (seed, partition id, word): apart from the partition's draws.
VALIDATION_STREAM = 2


def hold_out_validation(split: ClientSplit, fraction: float, seed: int, partition_id: int) -> ClientSplit:
    """``split`` with round(``fraction`` · its training size) training samples held out as its
    validation split, drawn without replacement by ``numpy.random.default_rng([seed, partition_id,
    VALIDATION_STREAM])``; both keep the partition's order. Raises :class:`DatasetError` when that
    leaves no validation or no training sample."""
    size = len(split.train)
    held = round(fraction * size)
    if not 0 < held < size:
        raise DatasetError(f"validation-fraction={fraction}: client {partition_id} holds {size} training samples, "
                           f"so {held} would be held out; it needs at least one for validation and one for training")
    chosen = np.zeros(size, dtype=bool)
    chosen[np.random.default_rng([seed, partition_id, VALIDATION_STREAM]).choice(size, size=held, replace=False)] = True
    return ClientSplit(train=split.train[~chosen], test=split.test, validation=split.train[chosen])


@dataclass(frozen=True)
class PartitionConfig:
    """Hashable description of a partition (the cache key, with the dataset).

    Defaults follow the paper (N = 40, 500 train / 100 test per client, seed 1).
    """

    num_clients: int = 40
    scheme: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    train_per_client: int = 500
    test_per_client: int = 100
    seed: int = 1


def partition(
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    train_per_client: int = 500,
    test_per_client: int = 100,
    seed: int = 1,
    test_with_replacement: bool = False,
) -> list[ClientSplit]:
    """Split a dataset's labels into ``num_clients`` client train/test index sets.

    ``scheme``:

    - ``"dirichlet"`` (the paper's, FedDecomp's sampler): see :func:`dirichlet_noniid`.
      Uses ``alpha`` and ``test_with_replacement``; clients may share images.
    - ``"pathological"``: ``classes_per_client`` classes per client, the same
      classes in its train and test split (flwr-datasets
      ``PathologicalPartitioner``); disjoint across clients.
    - ``"iid"``: flwr-datasets ``IidPartitioner``; disjoint across clients.

    Every client gets at most ``train_per_client`` / ``test_per_client``
    samples (the flwr-datasets schemes are capped with a seeded subsample that
    keeps at least one sample of every class the client holds).
    """
    y_train = _check_labels(y_train, "y_train")
    y_test = _check_labels(y_test, "y_test")
    if int(num_clients) < 1:
        raise ValueError(f"num-clients must be >= 1, got {num_clients}")
    if train_per_client < 1 or test_per_client < 1:
        raise ValueError(
            f"train/test samples per client must be >= 1, got {train_per_client}/{test_per_client}"
        )
    if scheme == "dirichlet":
        return dirichlet_noniid(
            y_train, y_test, num_clients, alpha,
            train_per_client=train_per_client, test_per_client=test_per_client, seed=seed,
            test_with_replacement=test_with_replacement,
        )
    if scheme == "pathological":
        return _pathological(y_train, y_test, num_clients, classes_per_client, train_per_client, test_per_client, seed)
    if scheme == "iid":
        return _iid(y_train, y_test, num_clients, train_per_client, test_per_client, seed)
    raise ValueError(f"partition: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) == 0:
        raise ValueError(f"{what} must be a non-empty 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if y.min() < 0:
        raise ValueError(f"{what} has negative labels")
    return y.astype(np.int64, copy=False)


def dirichlet_noniid(
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    train_per_client: int = 500,
    test_per_client: int = 100,
    seed: int = 1,
    test_with_replacement: bool = False,
) -> list[ClientSplit]:
    """FedDecomp's ``dirichlet_noniid`` (``utils/sampling.py``), reproduced bit for bit.

    ``rs = RandomState(seed)``; ``q = rs.dirichlet(alpha * 1_C, size=N)``; for
    client i and class j in order: ``n_tr = int(train_per_client * q_ij + 0.5)``
    and ``n_te = int(test_per_client * q_ij + 0.5)``, each truncated to what is
    left of the client's budget (so totals are <= the budget, possibly a few
    short: not renormalised); then ``rs.choice`` draws n_tr indices of class j
    from the FULL train split and n_te from the FULL test split, both without
    replacement, interleaved on the one ``rs`` and called even for a count of 0
    (it still consumes randomness). Clients draw independently, so different
    clients may share images; each client's test set follows its train
    distribution (same q).

    Why not flwr-datasets' ``DirichletPartitioner``: it splits ONE dataset into
    DISJOINT partitions whose sizes vary with the draw (class-wise proportions
    over clients, ``q ~ Dir(alpha)`` per class, plus a min-size resampling loop),
    and it would partition the test split with an independent draw. The paper's
    protocol instead gives every client a FIXED budget drawn from the whole
    pool with overlap allowed, and uses the SAME q for its test split, so its
    numbers can only be reproduced with this loop.

    ``test_with_replacement`` draws the test indices with replacement, as
    FedDecomp does for Tiny ImageNet (50 val images per class).

    C = max label + 1 over both splits. If a class holds fewer samples than a
    client asks for, a ValueError says which (no silent replacement).
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    train_by_class = [np.flatnonzero(y_train == j) for j in range(num_classes)]
    test_by_class = [np.flatnonzero(y_test == j) for j in range(num_classes)]

    rs = np.random.RandomState(seed)
    q = rs.dirichlet(np.repeat(alpha, num_classes), num_clients)
    splits = []
    for i in range(num_clients):
        left_tr, left_te = train_per_client, test_per_client
        tr_parts, te_parts = [], []
        for j in range(num_classes):
            n_tr = int(train_per_client * q[i][j] + 0.5)
            n_te = int(test_per_client * q[i][j] + 0.5)
            n_tr = n_tr if left_tr - n_tr >= 0 else left_tr
            n_te = n_te if left_te - n_te >= 0 else left_te
            left_tr -= n_tr
            left_te -= n_te
            for n, pool, split, replace in (
                (n_tr, train_by_class[j], "train", False),
                (n_te, test_by_class[j], "test", test_with_replacement),
            ):
                if (n > 0 and len(pool) == 0) if replace else n > len(pool):
                    raise ValueError(
                        f"partition: dirichlet client {i} needs {n} {split} samples of class {j} "
                        f"but the {split} split has only {len(pool)} (drawn {'with' if replace else 'without'} "
                        f"replacement); lower the samples per client or use a larger dataset"
                    )
            tr_parts.append(rs.choice(train_by_class[j], n_tr, replace=False))
            te_parts.append(rs.choice(test_by_class[j], n_te, replace=test_with_replacement))
        splits.append(
            ClientSplit(
                train=_readonly(np.concatenate(tr_parts).astype(np.int64)),
                test=_readonly(np.concatenate(te_parts).astype(np.int64)),
            )
        )
    return splits


def _labels_dataset(y: np.ndarray, seed: int):
    """(HF Dataset with a ``label`` column, the permutation it was built with).

    Row r of the dataset is sample ``perm[r]`` of ``y``: the rows are in a
    seeded random order because IidPartitioner shards contiguously and does not
    shuffle by itself (FederatedDataset would shuffle first; a bare partitioner
    does not), and PathologicalPartitioner splits each class into contiguous
    chunks.
    """
    import datasets  # lazy: ~2 s import

    perm = np.random.default_rng(seed).permutation(len(y)).astype(np.int64)
    return datasets.Dataset.from_dict({"label": y[perm], "idx": perm}), perm


def _partition_indices(partitioner, perm: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Each partition's rows, as indices into the original (unpermuted) labels.

    Public route: ``load_partition(i)["idx"]``. For PathologicalPartitioner that
    costs ~0.1 s per partition (``Dataset.select`` dill-hashes the Python list
    of np.int64 row ids to fingerprint the new dataset: ~7 s for 40 clients x 2
    splits on CIFAR-10), paid in every Ray actor. So when the partitioner
    exposes the assignment it computed for all partitions (its
    ``_partition_id_to_indices`` dict, filled by the public ``num_partitions``
    property), read the rows from there; otherwise use the public route.
    tests/test_data.py checks that both routes agree.
    """
    _ = partitioner.num_partitions  # public; PathologicalPartitioner assigns all partitions here
    table = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(table, dict) and sorted(table) == list(range(num_clients)):
        return [perm[np.asarray(table[i], dtype=np.int64)] for i in range(num_clients)]
    return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]


def _cap(idx: np.ndarray, y: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``idx``: a uniform random subsample, except that one
    sample of every class present is kept first (so capping never drops a class)."""
    if len(idx) <= cap:
        return np.sort(idx)
    shuffled = idx[rng.permutation(len(idx))]
    _, first = np.unique(y[shuffled], return_index=True)
    if len(first) > cap:
        raise ValueError(f"partition: cannot keep {len(first)} classes within {cap} samples per client")
    keep = np.zeros(len(shuffled), dtype=bool)
    keep[first] = True
    keep[np.flatnonzero(~keep)[: cap - len(first)]] = True
    return np.sort(shuffled[keep])


def _capped_splits(trains, tests, y_train, y_test, n_tr, n_te, seed) -> list[ClientSplit]:
    out = []
    for i, (tr, te) in enumerate(zip(trains, tests)):
        out.append(
            ClientSplit(
                train=_readonly(_cap(tr, y_train, n_tr, np.random.default_rng([seed, i, 0]))),
                test=_readonly(_cap(te, y_test, n_te, np.random.default_rng([seed, i, 1]))),
            )
        )
    return out


def _pathological(y_train, y_test, num_clients, k, n_tr, n_te, seed) -> list[ClientSplit]:
    """k classes per client via flwr-datasets' PathologicalPartitioner.

    ``class_assignment_mode="random"`` with the seed: the partitioner draws each
    partition's classes from ``default_rng(seed)`` over the SORTED unique labels
    before touching the samples (the sample shuffle comes after), so two
    partitioners with the same seed give the same class sets on the train and the
    test labels whenever both splits contain the same classes; checked below.
    ("deterministic" would also match, but gives clients i and i + C the same
    classes and ignores the seed.) Within a class, its samples are split evenly
    and disjointly among the clients holding it, so a client may get fewer than
    n_tr / n_te samples when a class is popular.
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    if not 1 <= k:
        raise ValueError(f"classes-per-client must be >= 1, got {k}")
    if n_te < k or n_tr < k:
        raise ValueError(f"partition: pathological needs >= {k} train and test samples per client")
    per_split = []
    for y, salt in ((y_train, 0), (y_test, 1)):
        p = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode="random",
            shuffle=True,
            seed=seed,
        )
        p.dataset, perm = _labels_dataset(y, seed + salt)
        per_split.append(_partition_indices(p, perm, num_clients))
    out = _capped_splits(per_split[0], per_split[1], y_train, y_test, n_tr, n_te, seed)
    for i, s in enumerate(out):
        c_tr, c_te = set(np.unique(y_train[s.train]).tolist()), set(np.unique(y_test[s.test]).tolist())
        if c_tr != c_te or len(c_tr) > k:
            raise ValueError(
                f"partition: pathological client {i} got train classes {sorted(c_tr)} but test classes "
                f"{sorted(c_te)} (do both splits contain every class?)"
            )
    return out


def _iid(y_train, y_test, num_clients, n_tr, n_te, seed) -> list[ClientSplit]:
    """flwr-datasets' IidPartitioner (contiguous equal shards of a seeded shuffle), capped."""
    from flwr_datasets.partitioner import IidPartitioner

    per_split = []
    for y, salt in ((y_train, 0), (y_test, 1)):
        if num_clients > len(y):
            raise ValueError(f"partition: iid needs at least {num_clients} samples per split, got {len(y)}")
        p = IidPartitioner(num_partitions=num_clients)
        p.dataset, perm = _labels_dataset(y, seed + salt)
        per_split.append(_partition_indices(p, perm, num_clients))
    return _capped_splits(per_split[0], per_split[1], y_train, y_test, n_tr, n_te, seed)


def partition_dataset(name: str, data_dir: str | Path, cfg: PartitionConfig) -> tuple[ClientSplit, ...]:
    """All client splits of dataset ``name`` under ``cfg``; cached per process."""
    if name not in DATASETS:
        raise DatasetError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _partition_cached(name, _path_key(name, data_dir), cfg)


@functools.lru_cache(maxsize=8)
def _partition_cached(name: str, path: str, cfg: PartitionConfig) -> tuple[ClientSplit, ...]:
    ds = _load_cached(name, path)
    return tuple(
        partition(
            ds.y_train, ds.y_test, cfg.num_clients, cfg.scheme,
            alpha=cfg.alpha, classes_per_client=cfg.classes_per_client,
            train_per_client=cfg.train_per_client, test_per_client=cfg.test_per_client, seed=cfg.seed,
            test_with_replacement=ds.test_with_replacement,
        )
    )


def client_split(name: str, data_dir: str | Path, partition_id: int, cfg: PartitionConfig) -> ClientSplit:
    """Client ``partition_id``'s split of dataset ``name`` under ``cfg`` (cached)."""
    if not 0 <= int(partition_id) < cfg.num_clients:
        raise ValueError(f"partition-id must be in [0, {cfg.num_clients}), got {partition_id}")
    return partition_dataset(name, data_dir, cfg)[int(partition_id)]


# --------------------------------------------------------------------------- #
# 3. Tensors for training
# --------------------------------------------------------------------------- #


def client_tensors(
    ds: ImageDataset, indices: np.ndarray, train: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``indices`` of the train (``train=True``) or test split as
    (float32 N x C x H x W normalised with ``ds.mean``/``ds.std``, int64 labels) on ``device``.
    The uint8 images cross to the device (a quarter of the float32 bytes) and are converted there."""
    x_all, y_all = (ds.x_train, ds.y_train) if train else (ds.x_test, ds.y_test)
    idx = np.asarray(indices, dtype=np.int64)
    x = torch.from_numpy(x_all[idx]).to(device).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(ds.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = x.sub_(mean).div_(std).contiguous()
    y = torch.from_numpy(y_all[idx].astype(np.int64)).to(device)
    return x, y


@functools.lru_cache(maxsize=4)
def make_augment(
    name: str, mean: Sequence[float], std: Sequence[float], size: int = 32
) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """The training augmentation ``name`` (one of :data:`AUGMENTATIONS`) for a NORMALISED batch
    of ``size`` x ``size`` images: ``crop-flip-rotate`` = RandomCrop(size, padding 4),
    RandomHorizontalFlip, RandomRotation(15) (CIFAR-100); ``flip-rotate`` = the last two
    (Tiny ImageNet), as in FedDecomp's ``get_dataset.py``.

    Each sample gets its own random parameters (a v2 transform applied to a
    whole batch tensor would use one set for all). Padding/rotation fill is the
    normalised value of a black pixel, as in the reference (PIL, fill 0, before
    Normalize). Randomness comes from ``generator`` when given (the global torch
    RNG is left untouched), so an epoch is reproducible from the generator.

    This is the ``per-sample`` backend (run config ``augment-backend``; ``auto`` picks it on CPU,
    so CPU runs keep these draws); :func:`make_batched_augment` is the ``batched`` one (CUDA).
    """
    from torchvision.transforms import v2  # lazy: ~3 s import

    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    fill = [float(-m / s) for m, s in zip(mean, std)]
    steps = [v2.RandomCrop(size, padding=4, fill=fill)] if name == "crop-flip-rotate" else []
    tf = v2.Compose([*steps, v2.RandomHorizontalFlip(), v2.RandomRotation(15, fill=fill)])

    def apply(xb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return torch.stack([tf(img) for img in xb])
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([tf(img) for img in xb])

    return apply


#: How the training augmentation is applied (run config ``augment-backend``): ``per-sample``
#: (torchvision v2, one image at a time: the reference path), ``batched`` (:func:`make_batched_augment`,
#: tensor ops on the batch's device) or ``auto`` (batched on CUDA, per-sample elsewhere).
AUGMENT_BACKENDS: tuple[str, ...] = ("auto", "per-sample", "batched")


def augment_backend(choice: str, device: torch.device) -> str:
    """The backend ``choice`` (one of :data:`AUGMENT_BACKENDS`) stands for on ``device``: ``auto``
    is ``batched`` on CUDA and ``per-sample`` on CPU, so CPU runs keep torchvision's random draws."""
    if choice not in AUGMENT_BACKENDS:
        raise ValueError(f"augment-backend: unknown {choice!r}; choose one of {', '.join(AUGMENT_BACKENDS)}")
    if choice == "auto":
        return "batched" if device.type == "cuda" else "per-sample"
    return choice


CROP_PADDING = 4  # RandomCrop(size, padding=4)
ROTATION_DEGREES = 15.0  # RandomRotation(15): an angle uniform in [-15, 15]


@dataclass(frozen=True)
class AugmentParams:
    """One batch's per-sample augmentation parameters, each of length N: the crop window's corner
    (``top``, ``left``, int64 in [0, 2 * CROP_PADDING]) in the image padded by CROP_PADDING
    (CROP_PADDING, CROP_PADDING: no shift), a horizontal ``flip`` (bool) and the rotation ``angle``
    in degrees (float32, counter-clockwise as torchvision's ``rotate``)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    angle: torch.Tensor


def draw_augment_params(
    name: str, n: int, generator: torch.Generator | None, device: torch.device | str
) -> AugmentParams:
    """Random parameters of augmentation ``name`` for ``n`` samples, drawn with ``generator`` (the
    global RNG of ``device`` when None) on the generator's device and returned on ``device``.
    Distributions as torchvision's: uniform crop corner, flip with probability 0.5, angle uniform in
    [-15, 15); ``flip-rotate`` does not crop."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    on = generator.device if generator is not None else torch.device(device)
    if name == "crop-flip-rotate":
        top = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=on)
        left = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=on)
    else:
        top = left = torch.full((n,), CROP_PADDING, dtype=torch.int64, device=on)
    flip = torch.rand(n, generator=generator, device=on) < 0.5
    angle = torch.rand(n, generator=generator, device=on) * (2 * ROTATION_DEGREES) - ROTATION_DEGREES
    return AugmentParams(*(t.to(device, non_blocking=True) for t in (top, left, flip, angle)))


def apply_augment(xb: torch.Tensor, params: AugmentParams, fill: Sequence[float]) -> torch.Tensor:
    """Crop, flip and rotate every image of the N x C x H x W batch ``xb`` with its own parameters,
    in three batched tensor ops (no loop over samples): the crop window of the image padded with
    ``fill`` (one value per channel) is gathered with the flip folded into its column index, then
    the rotation about the image centre samples it with nearest interpolation (``grid_sample`` on
    the per-sample grid torchvision's ``rotate`` builds), ``fill`` outside. For the same parameters
    this equals torchvision's ``pad`` + ``crop`` + ``horizontal_flip`` + ``rotate`` per image."""
    n, c, h, w = xb.shape
    device = xb.device
    fill_img = torch.tensor(list(fill), dtype=xb.dtype, device=device).view(1, c, 1, 1)
    pad = CROP_PADDING
    padded = fill_img.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = xb
    rows = params.top[:, None] + torch.arange(h, device=device)
    cols = params.left[:, None] + torch.arange(w, device=device)
    cols = torch.where(params.flip[:, None], cols.flip(-1), cols)
    cropped = padded[torch.arange(n, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    cropped = cropped.permute(0, 3, 1, 2)  # the gather puts the channel last

    # torchvision's rotate: inverse affine matrix for -angle about the centre, grid over pixel centres.
    rot = torch.deg2rad(-params.angle.to(torch.float64))
    cos, sin = torch.cos(rot), torch.sin(rot)
    zero = torch.zeros_like(cos)
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], dim=1).to(xb.dtype).view(n, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=xb.dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=xb.dtype, device=device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2).div(scale)).view(n, h, w, 2)
    with_mask = torch.cat([cropped, torch.ones(n, 1, h, w, dtype=xb.dtype, device=device)], dim=1)
    sampled = torch.nn.functional.grid_sample(with_mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    image, mask = sampled[:, :c], sampled[:, c:]
    return torch.where(mask < 0.5, fill_img, image)


def make_batched_augment(
    name: str, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """Augmentation ``name`` as :func:`make_augment` (same operations, distributions and fill), for
    the ``batched`` backend: parameters drawn per sample on the generator's device
    (:func:`draw_augment_params`) and applied with tensor ops on the batch's device
    (:func:`apply_augment`). Its random draws differ from the per-sample path's, so a run's
    batches differ between backends; each is reproducible from its generator."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    fill = tuple(float(-m / s) for m, s in zip(mean, std))

    def apply(xb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return apply_augment(xb, draw_augment_params(name, len(xb), generator, xb.device), fill)

    return apply


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) mini-batches covering every sample once (last partial batch
    kept, like ``DataLoader(drop_last=False)``); order from ``torch.randperm``
    with ``generator`` when ``shuffle``. ``augment(xb, generator)`` transforms
    each batch (e.g. ``ds.augmentation()``, see :func:`make_augment`).
    ``drop_last``: leave out the last partial batch when there are more samples
    than ``batch_size`` (the same permutation is drawn either way).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(y)
    if len(x) != n:
        raise ValueError(f"x has {len(x)} samples but y has {n}")
    order = None
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).to(x.device)
    end = n - n % batch_size if drop_last and n > batch_size else n
    for start in range(0, end, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx.to(y.device)]
        if augment is not None:
            xb = augment(xb, generator)
        yield xb, yb
