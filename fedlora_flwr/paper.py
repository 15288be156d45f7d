"""The papers' numbers and the one rule that matches them to runs (the grid and the report).

An *entry* is a few config keys plus ``acc`` and ``std`` (%), e.g. ``{method = "fedlora", dataset =
"cifar10", alpha = 0.1, acc = 85.47, std = 2.06}``: a spec's ``[[paper]]`` table, or a row of the
built-in :data:`PAPER_TABLE1`. It matches a run when every config key it names equals the run's
value (numbers compared as numbers); ``dataset`` also matches the paper's name for the run's data
(:func:`paper_dataset`: ``npz`` with a ``cifar10*.npz`` file is ``cifar10``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["META_KEYS", "PAPER_SOURCE", "PAPER_TABLE1", "entry_problem", "matches", "paper_dataset", "paper_entry"]

PAPER_SOURCE = (
    "FedLoRA paper (../shared/papers/fedlora.txt), Table 1: Dirichlet non-IID, N = 40 clients, "
    "T = 300 rounds, E = 5, ResNet-8 (CIFAR-10) / ResNet-10 (CIFAR-100, Tiny ImageNet), FedLoRA at its best "
    "(R_c, R_l); mean ± std over 3 seeds"
)

#: Table 1 of the FedLoRA paper (best mean client accuracy, %, mean and std over 3 seeds),
#: keyed on (method, dataset, alpha). The extracted text garbles two row labels ("To JA" is the
#: FedAvg row, "Lagal" is "Local"); each row is a line of means followed by a line of "± std".
PAPER_TABLE1: dict[tuple[str, str, float], tuple[float, float]] = {
    ("fedavg", "cifar10", 0.1): (60.39, 1.46),
    ("fedavg", "cifar10", 0.5): (60.41, 1.36),
    ("fedavg", "cifar10", 1.0): (60.91, 0.72),
    ("local", "cifar10", 0.1): (81.91, 3.09),
    ("local", "cifar10", 0.5): (60.15, 0.86),
    ("local", "cifar10", 1.0): (52.24, 0.41),
    ("fedlora", "cifar10", 0.1): (85.47, 2.06),
    ("fedlora", "cifar10", 0.5): (72.78, 1.23),
    ("fedlora", "cifar10", 1.0): (69.09, 1.14),
    ("fedavg", "cifar100", 0.1): (34.91, 0.86),
    ("fedavg", "cifar100", 0.5): (32.78, 0.23),
    ("fedavg", "cifar100", 1.0): (33.94, 0.39),
    ("local", "cifar100", 0.1): (47.61, 0.96),
    ("local", "cifar100", 0.5): (22.65, 0.51),
    ("local", "cifar100", 1.0): (18.76, 0.63),
    ("fedlora", "cifar100", 0.1): (63.65, 0.53),
    ("fedlora", "cifar100", 0.5): (45.96, 1.19),
    ("fedlora", "cifar100", 1.0): (42.98, 0.64),
    ("fedavg", "tiny-imagenet", 0.1): (21.26, 1.28),
    ("fedavg", "tiny-imagenet", 0.5): (20.32, 0.91),
    ("fedavg", "tiny-imagenet", 1.0): (17.20, 0.54),
    ("local", "tiny-imagenet", 0.1): (24.07, 0.62),
    ("local", "tiny-imagenet", 0.5): (8.75, 0.30),
    ("local", "tiny-imagenet", 1.0): (6.87, 0.28),
    ("fedlora", "tiny-imagenet", 0.1): (44.22, 0.55),
    ("fedlora", "tiny-imagenet", 0.5): (28.25, 1.24),
    ("fedlora", "tiny-imagenet", 1.0): (25.55, 0.13),
    ("fedamp", "cifar10", 0.1): (84.99, 1.82),
    ("fedamp", "cifar10", 0.5): (68.26, 0.79),
    ("fedamp", "cifar10", 1.0): (64.87, 0.95),
    ("fedamp", "cifar100", 0.1): (46.68, 1.06),
    ("fedamp", "cifar100", 0.5): (24.74, 0.58),
    ("fedamp", "cifar100", 1.0): (18.22, 0.41),
    ("fedamp", "tiny-imagenet", 0.1): (27.85, 0.71),
    ("fedamp", "tiny-imagenet", 0.5): (10.70, 0.32),
    ("fedamp", "tiny-imagenet", 1.0): (7.13, 0.21),
    ("fedrep", "cifar10", 0.1): (84.59, 1.58),
    ("fedrep", "cifar10", 0.5): (67.69, 0.86),
    ("fedrep", "cifar10", 1.0): (60.52, 0.72),
    ("fedrep", "cifar100", 0.1): (51.25, 1.37),
    ("fedrep", "cifar100", 0.5): (26.97, 0.33),
    ("fedrep", "cifar100", 1.0): (20.63, 0.42),
    ("fedrep", "tiny-imagenet", 0.1): (30.83, 1.05),
    ("fedrep", "tiny-imagenet", 0.5): (12.14, 0.28),
    ("fedrep", "tiny-imagenet", 1.0): (8.37, 0.25),
    ("fedbn", "cifar10", 0.1): (83.55, 2.32),
    ("fedbn", "cifar10", 0.5): (66.79, 1.08),
    ("fedbn", "cifar10", 1.0): (62.20, 0.67),
    ("fedbn", "cifar100", 0.1): (54.35, 0.63),
    ("fedbn", "cifar100", 0.5): (36.94, 0.94),
    ("fedbn", "cifar100", 1.0): (33.67, 0.12),
    ("fedbn", "tiny-imagenet", 0.1): (33.34, 0.71),
    ("fedbn", "tiny-imagenet", 0.5): (19.61, 0.35),
    ("fedbn", "tiny-imagenet", 1.0): (16.57, 0.44),
    ("fedper", "cifar10", 0.1): (84.43, 0.47),
    ("fedper", "cifar10", 0.5): (68.80, 0.49),
    ("fedper", "cifar10", 1.0): (64.92, 0.66),
    ("fedper", "cifar100", 0.1): (51.38, 0.94),
    ("fedper", "cifar100", 0.5): (28.25, 1.03),
    ("fedper", "cifar100", 1.0): (21.53, 0.50),
    ("fedper", "tiny-imagenet", 0.1): (32.33, 0.31),
    ("fedper", "tiny-imagenet", 0.5): (12.69, 0.42),
    ("fedper", "tiny-imagenet", 1.0): (8.67, 0.40),
    ("fedrod", "cifar10", 0.1): (86.23, 2.12),
    ("fedrod", "cifar10", 0.5): (72.34, 1.77),
    ("fedrod", "cifar10", 1.0): (68.45, 1.94),
    ("fedrod", "cifar100", 0.1): (60.19, 0.64),
    ("fedrod", "cifar100", 0.5): (38.54, 1.12),
    ("fedrod", "cifar100", 1.0): (33.67, 0.48),
    ("fedrod", "tiny-imagenet", 0.1): (44.25, 0.40),
    ("fedrod", "tiny-imagenet", 0.5): (27.02, 0.64),
    ("fedrod", "tiny-imagenet", 1.0): (22.07, 0.79),
    ("pfedsd", "cifar10", 0.1): (86.34, 2.61),
    ("pfedsd", "cifar10", 0.5): (71.97, 2.07),
    ("pfedsd", "cifar10", 1.0): (67.21, 1.89),
    ("pfedsd", "cifar100", 0.1): (54.14, 0.77),
    ("pfedsd", "cifar100", 0.5): (41.06, 0.83),
    ("pfedsd", "cifar100", 1.0): (38.27, 0.20),
    ("pfedsd", "tiny-imagenet", 0.1): (39.31, 0.19),
    ("pfedsd", "tiny-imagenet", 0.5): (19.25, 1.80),
    ("pfedsd", "tiny-imagenet", 1.0): (15.91, 0.33),
    ("pfedgate", "cifar10", 0.1): (87.25, 1.91),
    ("pfedgate", "cifar10", 0.5): (71.98, 1.61),
    ("pfedgate", "cifar10", 1.0): (67.85, 0.87),
    ("pfedgate", "cifar100", 0.1): (48.54, 0.39),
    ("pfedgate", "cifar100", 0.5): (27.47, 0.79),
    ("pfedgate", "cifar100", 1.0): (22.98, 0.03),
    ("pfedgate", "tiny-imagenet", 0.1): (37.59, 0.39),
    ("pfedgate", "tiny-imagenet", 0.5): (24.09, 0.67),
    ("pfedgate", "tiny-imagenet", 1.0): (19.69, 0.14),
    ("fedcac", "cifar10", 0.1): (86.82, 1.18),
    ("fedcac", "cifar10", 0.5): (69.83, 0.46),
    ("fedcac", "cifar10", 1.0): (65.39, 0.51),
    ("fedcac", "cifar100", 0.1): (57.22, 1.52),
    ("fedcac", "cifar100", 0.5): (38.64, 0.63),
    ("fedcac", "cifar100", 1.0): (32.59, 0.32),
    ("fedcac", "tiny-imagenet", 0.1): (40.19, 1.20),
    ("fedcac", "tiny-imagenet", 0.5): (23.70, 0.28),
    ("fedcac", "tiny-imagenet", 1.0): (18.58, 0.62),
}

#: Keys of an entry that are not config keys.
META_KEYS = frozenset({"acc", "std", "source", "note", "table"})


def entry_problem(entry: Mapping[str, Any]) -> str | None:
    """Why ``entry`` is not an entry (``acc`` a number, ``std`` a number if given, ``note``,
    ``table`` and ``source`` text, at least one config key), or None."""
    for key in ("acc", "std"):
        value = entry.get(key)
        if (key == "acc" or value is not None) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} must be a number (%), not {value!r}"
    for key in ("note", "table", "source"):
        if not isinstance(entry.get(key, ""), str):
            return f"{key} must be text"
    return None if set(entry) - META_KEYS else "names no config key to match"


def paper_dataset(config: Mapping[str, Any]) -> str:
    """The paper's name for a run's dataset: ``npz`` with a ``cifar10*.npz`` (``cifar100*``) file is
    ``cifar10`` (``cifar100``); any other dataset is its own name."""
    dataset = str(config.get("dataset", ""))
    if dataset == "npz":
        stem = Path(str(config.get("data-dir", ""))).stem.lower().replace("-", "").replace("_", "")
        for name in ("cifar100", "cifar10"):
            if stem.startswith(name):
                return name
    return dataset


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def matches(entry: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether ``entry`` matches a run whose config is ``config`` (the module's rule)."""
    for key, want in entry.items():
        if key in META_KEYS:
            continue
        if key == "dataset" and _same(want, paper_dataset(config)):
            continue
        if key not in config or not _same(want, config[key]):
            return False
    return True


def paper_entry(config: Mapping[str, Any], entries: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any] | None:
    """The paper's number for a run: the most specific of ``entries`` that matches (most config
    keys), else the built-in Table 1 entry of its (method, dataset, alpha), else None."""
    found = [entry for entry in entries if matches(entry, config)]
    if found:
        return dict(max(found, key=lambda entry: len(set(entry) - META_KEYS)))
    for (method, dataset, alpha), (acc, std) in PAPER_TABLE1.items():
        entry = {"method": method, "dataset": dataset, "alpha": alpha}
        if matches(entry, config):
            return {**entry, "acc": acc, "std": std, "source": "paper Table 1"}
    return None
