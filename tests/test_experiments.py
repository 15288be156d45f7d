"""Every shipped run-config file validates against the app's config (keys and values)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import REAL_NPZ, REPO, app_defaults

from fedlora_flwr.config import load_config

EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


def test_experiments_exist():
    assert {path.name for path in EXPERIMENTS} >= {"quickstart.toml", "fedlora-cifar10-paper.toml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: path.name)
def test_experiment_validates(path: Path):
    overrides = tomllib.loads(path.read_text())
    unknown = set(overrides) - set(app_defaults())
    assert not unknown, f"{path.name}: keys not in [tool.flwr.app.config]: {unknown}"
    if overrides.get("dataset") == "npz" and not REAL_NPZ.is_file():
        pytest.skip(f"{REAL_NPZ} absent: {path.name} reads the real CIFAR-10 subset from ../shared/data")
    config = load_config({**app_defaults(), **overrides}, base=REPO)
    if config.dataset == "npz":
        assert Path(config.data_dir) == REAL_NPZ.resolve()
