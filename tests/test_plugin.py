"""Methods from other packages: the ``fedlora_flwr.methods`` entry point, with examples/fedprox.

The example package is pip-installed (``--target``, no network: ``--no-deps --no-build-isolation``)
into a temporary folder beside the project; putting that folder on the path makes its entry point
visible to ``importlib.metadata`` exactly as an installed package's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, app_defaults
from flwr.app import Context, RecordDict
from inprocess import InProcessGrid
from test_federation import _quiet_flower

from fedlora_flwr import client_app, methods, server_app
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.superlink import LocalSuperLink

EXAMPLE = REPO / "examples" / "fedprox"
TINY = {"dataset": "synthetic", "model": "cnn", "num-server-rounds": 2, "local-epochs": 1, "train-per-client": 16,
        "test-per-client": 8, "batch-size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def fedprox_site(tmp_path_factory) -> Path:
    """examples/fedprox installed with pip into a folder of its own (dist-info and entry point included)."""
    site = tmp_path_factory.mktemp("fedprox-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True, timeout=300)
    return site


@pytest.fixture
def with_plugin(fedprox_site, monkeypatch):
    """The plugin's folder on this process's path and on the path of every process it starts."""
    monkeypatch.syspath_prepend(str(fedprox_site))
    monkeypatch.setenv("PYTHONPATH", str(fedprox_site))
    methods.registry.cache_clear()
    yield fedprox_site
    methods.registry.cache_clear()


def test_the_installed_plugin_is_registered_by_its_entry_point_name(with_plugin):
    method = methods.get_method("fedprox")
    assert method.client.__module__ == "fedlora_fedprox" and "proximal" in method.doc
    config = load_config({**app_defaults(), **TINY, "method": "fedprox", "method-params": "fedprox-mu = 0.5"})
    assert config.params.fedprox_mu == 0.5 and config.as_record()["fedprox-mu"] == 0.5
    with pytest.raises(ConfigError, match=r"fedprox-mu=-1.0: Input should be greater than or equal to 0"):
        load_config({**app_defaults(), **TINY, "method": "fedprox", "method-params": "fedprox-mu = -1.0"})


def test_a_method_that_is_not_installed_is_one_line_naming_the_entry_point_group():
    with pytest.raises(ConfigError, match=r"method='fedprox': unknown method; .* 'fedlora_flwr.methods'"):
        load_config({**app_defaults(), "method": "fedprox"})


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedlora_flwr.methods]\nbroken = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    methods.registry.cache_clear()
    try:
        with pytest.raises(methods.PluginError, match=r"entry point 'broken' \(json:dumps\).* not a fedlora_flwr"):
            methods.registry()
    finally:
        methods.registry.cache_clear()


def test_the_plugin_runs_in_process_with_its_key_recorded(with_plugin, tmp_path):
    config = {**app_defaults(), **TINY, "method": "fedprox", "method-params": "fedprox-mu = 0.1",
              "output-dir": str(tmp_path), "run-name": "fedprox"}
    with _quiet_flower():
        server_app.main(InProcessGrid(client_app.app, 2, config),
                        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    recorded = json.loads((tmp_path / "fedprox" / "config.json").read_text())
    assert recorded["method"] == "fedprox" and recorded["fedprox-mu"] == 0.1
    rows = [json.loads(line) for line in (tmp_path / "fedprox" / "metrics.jsonl").read_text().splitlines()]
    assert [row["num_participants"] for row in rows] == [2, 2] and all(row["num_failures"] == 0 for row in rows)


@pytest.mark.e2e
def test_the_plugin_runs_two_rounds_through_flwr_run_by_its_name(with_plugin, tmp_path):
    out = tmp_path / "outputs"
    with LocalSuperLink() as link:  # started with the plugin on PYTHONPATH: its ServerApp and Ray workers see it
        code, log = link.run(REPO, {**TINY, "method": "fedprox", "method-params": "fedprox-mu = 0.1",
                                    "output-dir": str(out), "run-name": "fedprox-e2e"}, num_supernodes=2)
    run_dir = out / "fedprox-e2e"
    assert code == 0 and (run_dir / "summary.json").is_file(), log[-4000:]
    assert "[fedlora-flwr] round 2/2" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["num_participants"] == 2 and row["num_failures"] == 0 for row in rows)
    assert json.loads((run_dir / "config.json").read_text())["fedprox-mu"] == 0.1
