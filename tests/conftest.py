"""Shared fixtures: the app's default run config, the real CIFAR-10 subset, a private SuperLink;
the ``gpu`` marker's skip where no CUDA GPU is visible. Torch runs on one thread, here and in the
processes the tests start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedlora_flwr import grid
from fedlora_flwr.superlink import LocalSuperLink

REPO = Path(__file__).resolve().parents[1]
REAL_NPZ = REPO.parent / "shared" / "data" / "cifar10" / "cifar10.npz"
# The tests' models and batches are tiny: a second intra-op thread only spins in OpenMP's barriers,
# and where the cores are shared it waits for the other thread to be scheduled (a suite several times
# slower on a loaded machine). The processes the tests start inherit it, so that a result computed in
# one of them equals the same computation here, bit for bit (tests/test_bench.py).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``docker``-marked tests last (the image build that .ci/run starts in the background
    has the rest of the suite to finish); skip the ``gpu``-marked tests, saying why, where torch
    sees no CUDA GPU."""
    items.sort(key=lambda item: item.get_closest_marker("docker") is not None)  # stable: order kept otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def app_defaults() -> dict:
    """``[tool.flwr.app.config]`` of pyproject.toml: what Flower hands the apps with no overrides."""
    return grid.app_defaults(REPO)


@pytest.fixture
def real_npz() -> Path:
    if not REAL_NPZ.is_file():
        pytest.skip(f"{REAL_NPZ} absent: the real CIFAR-10 subset lives in ../shared/data beside the checkout")
    return REAL_NPZ


@pytest.fixture
def fast_config(tmp_path: Path) -> dict:
    """A tiny, fast run on the synthetic dataset (run config keys as Flower passes them)."""
    return {
        **app_defaults(),
        "dataset": "synthetic",
        "model": "cnn",
        "num-server-rounds": 2,
        "local-epochs": 2,
        "lora-epochs": 1,
        "train-per-client": 100,
        "test-per-client": 40,
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "test-run",
    }


@pytest.fixture(scope="session")
def superlink() -> Iterator[LocalSuperLink]:
    """One private SuperLink (free loopback ports, own FLWR_HOME) for the session's e2e runs;
    stopped with its whole process tree, by PID, at the end."""
    with LocalSuperLink() as link:
        yield link
