"""Tests for fedlora_flwr.data: datasets, partitions (FedDecomp's sampling.py), tensors and batches."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora_flwr import data as D
from fedlora_flwr.data import ClientSplit, DatasetError, ImageDataset, PartitionConfig

REAL_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz"


def _labels(per_class_train: int, per_class_test: int, num_classes: int = 10, seed: int = 0):
    """Shuffled, class-balanced label arrays (like the CIFAR-10 npz)."""
    rng = np.random.default_rng(seed)
    y_tr = rng.permutation(np.repeat(np.arange(num_classes), per_class_train)).astype(np.int64)
    y_te = rng.permutation(np.repeat(np.arange(num_classes), per_class_test)).astype(np.int64)
    return y_tr, y_te


def _counts(y: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y[idx], minlength=num_classes)


def _same(a: list[ClientSplit], b: list[ClientSplit]) -> bool:
    return all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))


# --------------------------------------------------------------------------- dirichlet


def _feddecomp_dirichlet_noniid(train_targets, test_targets, num_users, alpha, seed, train_num, test_num,
                                test_replace=False):
    """The reference loop (FedDecomp utils/sampling.py ``dirichlet_noniid``), transcribed
    with Python lists and per-sample loops exactly as there (``test_replace``: its Tiny ImageNet
    variant: test indices drawn with replacement)."""
    num_class = len(np.unique(train_targets))
    train_idxs_classes = [[] for _ in range(num_class)]
    test_idxs_classes = [[] for _ in range(num_class)]
    for i in range(len(train_targets)):
        train_idxs_classes[train_targets[i]].append(i)
    for i in range(len(test_targets)):
        test_idxs_classes[test_targets[i]].append(i)
    train_dict_users = {i: [] for i in range(num_users)}
    test_dict_users = {i: [] for i in range(num_users)}
    random_state = np.random.RandomState(seed)
    q = random_state.dirichlet(np.repeat(alpha, num_class), num_users)
    for i in range(num_users):
        temp_train_sample, temp_test_sample = train_num, test_num
        for j in range(num_class):
            num_train = int(train_num * q[i][j] + 0.5)
            num_test = int(test_num * q[i][j] + 0.5)
            num_train = num_train if temp_train_sample - num_train >= 0 else temp_train_sample
            num_test = num_test if temp_test_sample - num_test >= 0 else temp_test_sample
            temp_train_sample -= num_train
            temp_test_sample -= num_test
            train_dict_users[i] += random_state.choice(train_idxs_classes[j], num_train, replace=False).tolist()
            test_dict_users[i] += random_state.choice(test_idxs_classes[j], num_test, replace=test_replace).tolist()
    return train_dict_users, test_dict_users


@pytest.mark.parametrize("alpha,seed", [(0.1, 1), (0.5, 3), (5.0, 7)])
def test_dirichlet_is_bit_exact_with_feddecomp(alpha, seed):
    y_tr, y_te = _labels(60, 20, num_classes=5, seed=seed)
    ref_tr, ref_te = _feddecomp_dirichlet_noniid(y_tr.tolist(), y_te.tolist(), 7, alpha, seed, 40, 10)
    got = D.partition(y_tr, y_te, 7, "dirichlet", alpha=alpha, train_per_client=40, test_per_client=10, seed=seed)
    assert len(got) == 7
    for i, split in enumerate(got):
        assert split.train.dtype == np.int64 and split.test.dtype == np.int64
        assert split.train.tolist() == ref_tr[i]
        assert split.test.tolist() == ref_te[i]


def test_dirichlet_test_with_replacement_is_bit_exact_with_feddecomp():
    """Tiny ImageNet's variant: 5 test images per class, 100 drawn per client, with replacement."""
    y_tr, y_te = _labels(500, 5)
    ref_train, ref_test = _feddecomp_dirichlet_noniid(y_tr, y_te, 6, 0.1, 2, 500, 100, test_replace=True)
    ours = D.dirichlet_noniid(y_tr, y_te, 6, 0.1, train_per_client=500, test_per_client=100, seed=2,
                              test_with_replacement=True)
    for i, split in enumerate(ours):
        assert split.train.tolist() == ref_train[i] and split.test.tolist() == ref_test[i]
    assert max(len(split.test) for split in ours) > 5
    with pytest.raises(ValueError, match="without replacement"):
        D.dirichlet_noniid(y_tr, y_te, 6, 0.1, train_per_client=500, test_per_client=100, seed=2)


def test_dirichlet_seed_determinism():
    y_tr, y_te = _labels(300, 100)
    kw = dict(alpha=0.5, train_per_client=100, test_per_client=20)
    a = D.partition(y_tr, y_te, 8, "dirichlet", seed=1, **kw)
    b = D.partition(y_tr, y_te, 8, "dirichlet", seed=1, **kw)
    c = D.partition(y_tr, y_te, 8, "dirichlet", seed=2, **kw)
    assert _same(a, b)
    assert not _same(a, c)


def test_dirichlet_budgets_and_test_follows_train():
    num_classes, n_tr, n_te = 10, 500, 100
    y_tr, y_te = _labels(1000, 400)
    splits = D.partition(y_tr, y_te, 30, "dirichlet", alpha=0.5, train_per_client=n_tr, test_per_client=n_te, seed=4)
    for s in splits:
        assert n_tr - num_classes <= len(s.train) <= n_tr
        assert n_te - num_classes <= len(s.test) <= n_te
        # without replacement within a client and a split
        assert len(np.unique(s.train)) == len(s.train) and len(np.unique(s.test)) == len(s.test)
        p_tr = _counts(y_tr, s.train, num_classes) / len(s.train)
        p_te = _counts(y_te, s.test, num_classes) / len(s.test)
        # the test split is drawn with the same q: per-class shares agree up to rounding
        assert np.abs(p_tr - p_te).sum() < 0.15, (p_tr, p_te)
        # classes that matter in train are present in test, and vice versa
        assert set(np.flatnonzero(p_tr >= 0.1)) <= set(np.flatnonzero(p_te > 0))
        assert set(np.flatnonzero(p_te >= 0.1)) <= set(np.flatnonzero(p_tr > 0))


def test_dirichlet_clients_may_share_images():
    y_tr, y_te = _labels(60, 20)
    splits = D.partition(y_tr, y_te, 20, "dirichlet", alpha=0.1, train_per_client=50, test_per_client=10, seed=1)
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) < len(all_train)  # drawn from the full pool, overlap allowed


def test_dirichlet_alpha_controls_skew():
    y_tr, y_te = _labels(1000, 300)

    def mean_max_share(alpha):
        splits = D.partition(y_tr, y_te, 40, "dirichlet", alpha=alpha, train_per_client=200, test_per_client=50, seed=1)
        return np.mean([_counts(y_tr, s.train, 10).max() / len(s.train) for s in splits])

    skewed, flat = mean_max_share(0.1), mean_max_share(100.0)
    # E[max share] is ~0.6 under Dir(0.1 * 1_10) and ~0.13 under Dir(100 * 1_10)
    assert skewed > 0.5, skewed
    assert flat < 0.2, flat
    assert skewed > 3 * flat


def test_dirichlet_too_few_samples_is_a_clear_error():
    y_tr, y_te = _labels(5, 5)
    with pytest.raises(ValueError, match="class"):
        D.partition(y_tr, y_te, 3, "dirichlet", alpha=0.1, train_per_client=100, test_per_client=10, seed=1)


def test_unknown_scheme_names_partition():
    y_tr, y_te = _labels(10, 5)
    with pytest.raises(ValueError, match="partition"):
        D.partition(y_tr, y_te, 2, "shards", seed=1)


# --------------------------------------------------------------------------- flwr-datasets schemes


def test_pathological_classes_per_client():
    k = 2
    y_tr, y_te = _labels(600, 150)
    splits = D.partition(y_tr, y_te, 20, "pathological", classes_per_client=k, train_per_client=100, test_per_client=30, seed=5)
    assert len(splits) == 20
    class_sets = []
    for s in splits:
        c_tr = set(np.unique(y_tr[s.train]).tolist())
        c_te = set(np.unique(y_te[s.test]).tolist())
        assert 1 <= len(c_tr) <= k
        assert c_tr == c_te
        assert len(s.train) <= 100 and len(s.test) <= 30
        class_sets.append(frozenset(c_tr))
    assert len(set(class_sets)) > 1  # clients differ
    # the partitioner splits each class disjointly among its clients
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) == len(all_train)
    again = D.partition(y_tr, y_te, 20, "pathological", classes_per_client=k, train_per_client=100, test_per_client=30, seed=5)
    assert _same(splits, again)
    other = D.partition(y_tr, y_te, 20, "pathological", classes_per_client=k, train_per_client=100, test_per_client=30, seed=6)
    assert [set(y_tr[s.train].tolist()) for s in other] != [set(c) for c in class_sets]  # seeded class draw


@pytest.mark.filterwarnings("ignore:Classes")  # 6 partitions x 3 random classes may leave one unused
def test_pathological_fast_path_matches_public_load_partition():
    """data._partition_indices reads the partitioner's assignment table; it must give
    exactly what the public load_partition() gives (guards against flwr-datasets changes)."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    y_tr, _ = _labels(40, 1)

    def make():
        p = PathologicalPartitioner(
            num_partitions=6, partition_by="label", num_classes_per_partition=3, class_assignment_mode="random", seed=9
        )
        p.dataset, perm = D._labels_dataset(y_tr, 11)
        return p, perm

    p1, perm = make()
    fast = D._partition_indices(p1, perm, 6)
    p2, _ = make()
    public = [np.asarray(p2.load_partition(i)["idx"], dtype=np.int64) for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(fast, public))
    for i, idx in enumerate(fast):
        assert len(np.unique(y_tr[idx])) == 3


def test_iid_roughly_balanced_and_capped():
    y_tr, y_te = _labels(2000, 400)
    splits = D.partition(y_tr, y_te, 10, "iid", train_per_client=500, test_per_client=100, seed=3)
    for s in splits:
        assert len(s.train) == 500 and len(s.test) == 100
        c = _counts(y_tr, s.train, 10)
        assert c.min() >= 25 and c.max() <= 80, c
        assert (_counts(y_te, s.test, 10) > 0).sum() >= 8
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) == len(all_train)  # disjoint shards


# --------------------------------------------------------------------------- npz


def _write_npz(path: Path, n_tr=20, n_te=8, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_tr, 32, 32, 3), dtype=np.uint8),
        "y_train": (np.arange(n_tr) % 4).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_te, 32, 32, 3), dtype=np.uint8),
        "y_test": (np.arange(n_te) % 5).astype(np.uint8),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_valid(tmp_path):
    path = _write_npz(tmp_path / "tiny.npz")
    ds = D.load_dataset("npz", path)
    assert isinstance(ds, ImageDataset)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.num_classes == 5  # max label + 1 over both splits
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.5, 0.5, 0.5) and not ds.train_augment
    assert not ds.x_train.flags.writeable  # shared across clients: read-only
    assert D.load_dataset("npz", str(path)) is ds  # cached on the resolved path


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"y_test": None}, "y_test"),
        ({"extra": np.zeros(3)}, "extra"),
        ({"x_train": np.zeros((20, 32, 32, 3), dtype=np.float32)}, "x_train"),
        ({"x_test": np.zeros((8, 32, 32), dtype=np.uint8)}, "x_test"),
        ({"y_train": np.zeros(19, dtype=np.uint8)}, "y_train"),
    ],
)
def test_npz_invalid(tmp_path, override, needle):
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DatasetError, match="data-dir") as err:
        D.load_dataset("npz", path)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_npz_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DatasetError, match="data-dir") as err:
        D.load_dataset("npz", missing)
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetError, match="data-dir"):
        D.load_dataset("npz", garbage)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DatasetError) as err:
        D.load_dataset("mnist", "x")
    for name in D.DATASETS:
        assert name in str(err.value)


def test_real_cifar10_npz():
    if not REAL_NPZ.is_file():
        pytest.skip("../shared/data/cifar10/cifar10.npz absent: the real-CIFAR-10 checks need it")
    ds = D.load_dataset("npz", REAL_NPZ)
    assert ds.x_train.shape == (30000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.num_classes == 10
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 3000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    cfg = PartitionConfig(num_clients=40, scheme="dirichlet", alpha=0.1, train_per_client=500, test_per_client=100, seed=1)
    splits = D.partition_dataset("npz", REAL_NPZ, cfg)
    assert len(splits) == 40
    assert all(490 <= len(s.train) <= 500 and 90 <= len(s.test) <= 100 for s in splits)
    assert D.client_split("npz", REAL_NPZ, 7, cfg) is splits[7]  # cached
    with pytest.raises(ValueError, match="partition-id"):
        D.client_split("npz", REAL_NPZ, 40, cfg)
    x, y = D.client_tensors(ds, splits[0].test, train=False)
    assert x.shape == (len(splits[0].test), 3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0


# --------------------------------------------------------------------------- torchvision


def test_cifar10_offline_raises_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("offline (test)")

    # never touch the network from the tests, whatever the machine
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetError, match="data-dir") as err:
        D.load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "\n" not in msg
    assert calls


# --------------------------------------------------------------------------- tiny imagenet


TINY_WNIDS = ["n0300", "n0100", "n0200"]  # wnids.txt order; labels follow the sorted order


def _tiny_folder(root: Path, per_class: int = 3, val_per_class: int = 2) -> Path:
    """A miniature of the official tiny-imagenet-200 layout: one flat grey level per class
    (class k of the sorted wnids is 40 + 80 k), one grayscale JPEG, val via val_annotations.txt."""
    from PIL import Image

    folder = root / D.TINY_FOLDER
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    level = {wnid: 40 + 80 * k for k, wnid in enumerate(sorted(TINY_WNIDS))}
    for wnid in TINY_WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(per_class):
            mode = "L" if (wnid, k) == ("n0200", 0) else "RGB"
            Image.new(mode, (64, 64), level[wnid] if mode == "L" else (level[wnid],) * 3).save(images / f"{wnid}_{k}.JPEG")
    lines = []
    for k in range(val_per_class * len(TINY_WNIDS)):
        wnid = TINY_WNIDS[k % len(TINY_WNIDS)]
        Image.new("RGB", (64, 64), (level[wnid],) * 3).save(folder / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
    folder = _tiny_folder(tmp_path)
    ds = D.load_dataset("tiny-imagenet", tmp_path)
    assert D.load_dataset("tiny-imagenet", folder).num_classes == 3  # the folder itself works too
    assert ds.x_train.shape == (9, 64, 64, 3) and ds.x_test.shape == (6, 64, 64, 3) and ds.num_classes == 3
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted wnids, files in order
    assert ds.y_test.tolist() == [2, 0, 1, 2, 0, 1]  # from val_annotations.txt
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert np.abs(x.astype(int) - (40 + 80 * y)[:, None, None, None]).max() <= 2  # JPEG rounding only
    assert (ds.mean, ds.std) == (D.CIFAR100_MEAN, D.CIFAR100_STD)
    assert ds.train_augment == "flip-rotate" and ds.test_with_replacement
    xb, _ = D.client_tensors(ds, np.arange(9), train=True)
    assert ds.augmentation()(xb, torch.Generator().manual_seed(0)).shape == (9, 3, 64, 64)
    # the partition draws test samples with replacement: 2 val images per class, 10 per client asked
    cfg = D.PartitionConfig(num_clients=4, alpha=0.1, train_per_client=3, test_per_client=10, seed=1)
    splits = D.partition_dataset("tiny-imagenet", tmp_path, cfg)
    assert max(len(split.test) for split in splits) > 2


def test_tiny_imagenet_errors_are_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)  # never the network
    with pytest.raises(DatasetError, match="tiny-imagenet-200") as err:
        D.load_dataset("tiny-imagenet", tmp_path / "empty")
    assert "\n" not in str(err.value)

    bad = _tiny_folder(tmp_path / "bad")
    (bad / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn9999\n")
    with pytest.raises(DatasetError, match="line 1") as err:
        D.load_dataset("tiny-imagenet", tmp_path / "bad")
    assert "\n" not in str(err.value)

    from PIL import Image

    small = _tiny_folder(tmp_path / "small")
    Image.new("RGB", (32, 32)).save(small / "train" / "n0100" / "images" / "n0100_0.JPEG")
    with pytest.raises(DatasetError, match="32x32, expected 64x64"):
        D.load_dataset("tiny-imagenet", tmp_path / "small")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_dataset():
    ds = D.load_dataset("synthetic", "ignored")
    assert D.load_dataset("synthetic", "") is ds
    assert ds.x_train.shape == (5000, 32, 32, 3) and ds.x_test.shape == (1000, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.num_classes == 10
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 500))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 100))
    fresh = D._make_synthetic()
    assert np.array_equal(fresh.x_train, ds.x_train) and np.array_equal(fresh.y_test, ds.y_test)
    # learnable: a nearest-class-mean classifier is far above chance (10%)
    xtr = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float32)
    xte = ds.x_test[:300].reshape(300, -1).astype(np.float32)
    mu = np.stack([xtr[ds.y_train == c].mean(0) for c in range(10)])
    pred = ((xte[:, None, :] - mu[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.y_test[:300]).mean() > 0.5
    # the paper's protocol runs on it
    splits = D.partition(ds.y_train, ds.y_test, 5, "dirichlet", alpha=0.1, seed=1)
    assert all(len(s.train) <= 500 for s in splits)


# --------------------------------------------------------------------------- tensors


def _toy_dataset() -> ImageDataset:
    x = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    x[1] = 255
    x[2, :, :, 0] = 255  # red only
    y = np.array([0, 1, 2, 3], dtype=np.int64)
    return ImageDataset(x, y, x.copy(), y.copy(), 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)


def test_client_tensors_normalisation():
    ds = _toy_dataset()
    x, y = D.client_tensors(ds, np.array([0, 1, 2]), train=True)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (3, 3, 2, 2)  # NCHW
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)
    assert torch.all(x[2, 0] == 1.0) and torch.all(x[2, 1:] == -1.0)  # channel order kept
    assert y.tolist() == [0, 1, 2]
    x2, y2 = D.client_tensors(ds, np.array([3]), train=False)
    assert y2.tolist() == [3] and torch.all(x2 == -1.0)


def test_batches_cover_every_index_once():
    n = 23
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    seen_orders = []
    for _ in range(2):
        got = list(D.batches(x, y, 5, shuffle=True, generator=g))
        assert [len(yb) for _, yb in got] == [5, 5, 5, 5, 3]  # last partial batch kept
        order = torch.cat([yb for _, yb in got])
        assert sorted(order.tolist()) == list(range(n))
        assert all(torch.equal(xb.view(-1).long(), yb) for xb, yb in got)  # x and y stay paired
        seen_orders.append(order.tolist())
    assert seen_orders[0] != seen_orders[1] and seen_orders[0] != list(range(n))
    plain = torch.cat([yb for _, yb in D.batches(x, y, 10)])
    assert plain.tolist() == list(range(n))
    again = torch.cat([yb for _, yb in D.batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert again.tolist() == seen_orders[0]


def test_batches_drop_last_leaves_out_the_partial_batch_of_the_same_permutation():
    n = 23
    x, y = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n)
    kept = list(D.batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    dropped = list(D.batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(yb) for _, yb in dropped] == [5, 5, 5, 5]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(kept, dropped))  # the same draw, minus the tail
    # one partial batch only (no more samples than batch_size): kept, as the official loaders do
    assert [len(yb) for _, yb in D.batches(x, y, 30, drop_last=True)] == [23]


@pytest.mark.parametrize("name", D.AUGMENTATIONS)
def test_batches_augment_per_sample_and_reproducible(name):
    augment = D.make_augment(name, D.CIFAR100_MEAN, D.CIFAR100_STD, size=32)
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    y = torch.arange(16)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(D.batches(x, y, 8, shuffle=False, generator=g, augment=augment))

    a, b = run(1), run(1)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    xa = torch.cat([xb for xb, _ in a])
    assert xa.shape == x.shape and xa.dtype == x.dtype
    changed = [not torch.equal(xa[i], x[i]) for i in range(16)]
    assert sum(changed) >= 12
    # per-sample parameters: the same image twice in a batch gets different transforms
    same = x[:1].repeat(8, 1, 1, 1)
    out = next(D.batches(same, y[:8], 8, augment=augment))[0]
    assert len({tuple(o.flatten()[:200].tolist()) for o in out}) > 1


# --------------------------------------------------------------------------- metadata without data


def test_every_dataset_has_metadata():
    assert set(D.TASK_SPECS) == set(D.DATASETS)


SHARED_DATA = REAL_NPZ.parents[1]


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("synthetic", Path("")),
        ("npz", REAL_NPZ),
        ("cifar10", SHARED_DATA / "cifar10" / "cifar-10-batches-py"),
        ("cifar100", SHARED_DATA / "cifar100" / "cifar-100-python"),
        ("tiny-imagenet", SHARED_DATA / "tiny-imagenet" / D.TINY_FOLDER),
        ("agnews", SHARED_DATA / "agnews" / "agnews.jsonl.gz"),
    ],
)
def test_metadata_matches_the_loaded_dataset(name, path):
    """The ServerApp's model comes from task_spec (no data read); the clients' from the loaded data."""
    if name != "synthetic" and not path.exists():
        pytest.skip(f"{path} absent: only datasets available offline are compared")
    data_dir = path if name in ("npz", "synthetic", "agnews") else path.parent
    assert D.task_spec(name, data_dir) == D.load_dataset(name, data_dir).spec


def test_npz_metadata_reads_labels_and_header_only(tmp_path):
    path = _write_npz(tmp_path / "tiny.npz")
    assert D.task_spec("npz", path) == D.load_dataset("npz", path).spec == D.TaskSpec(5, (3, 32, 32))
    with pytest.raises(DatasetError, match="data-dir") as err:
        D.task_spec("npz", tmp_path / "absent.npz")
    assert "\n" not in str(err.value)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        D.task_spec("npz", tmp_path / "garbage.npz")
