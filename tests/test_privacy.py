"""Differential privacy of the shared update (strategies/privacy.py): clipping on the real path,
the noise's standard deviation, ε against an independent accountant, the target-ε stop, and the
refusals of settings DP cannot honour."""

from __future__ import annotations

import logging
import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import app_defaults
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import Array, ArrayRecord, MessageType
from flwr.serverapp.exception import PrivacyBudgetExhausted as FlowerPrivacyBudgetExhausted
from scipy import stats
from test_federation import CapturingGrid, ScriptedGrid, _metrics, _run_config, _start, _summary

from fedlora_flwr import client_app
from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.exits import PrivacyBudgetExhausted, RunConfigError
from fedlora_flwr.methods import get_method
from strategies.fedlora import FedLoRAStrategy
from strategies.privacy import CLIP_NORM_KEY, NORM_BIT_KEY, SharedUpdatePrivacy, clip_upload
from strategies.protocol import ARRAYS, METRICS


def _update_norm(sent: dict[str, np.ndarray], reply: ArrayRecord) -> float:
    """‖reply − sent‖ over the floating-point tensors, in float64 (as the server measures it)."""
    squared = 0.0
    for key, value in sent.items():
        if np.issubdtype(value.dtype, np.floating):
            squared += float(np.sum((reply[key].numpy().astype(np.float64) - value.astype(np.float64)) ** 2))
    return math.sqrt(squared)


@pytest.mark.parametrize("method", ["fedlora", "fedavg"])
def test_every_update_the_server_receives_is_clipped_to_C(tmp_path, method):
    clip = 0.05
    config = _run_config(tmp_path / "outputs", "dp", method=method, num_server_rounds=2, dp_clip_norm=clip,
                         dp_noise_multiplier=0.3)
    grid = CapturingGrid(client_app.app, 3, config)
    _start(grid, config)
    norms, bits = [], []
    for server_round in (1, 2):
        sent, replies = grid.sent[(server_round, MessageType.TRAIN)], grid.replies[(server_round, MessageType.TRAIN)]
        assert len(replies) == 3
        for pid, reply in replies.items():
            norms.append(_update_norm(sent[pid], reply.content[ARRAYS]))
            bits.append(reply.content[METRICS][NORM_BIT_KEY])
    assert max(norms) <= clip, f"an update reached the server with norm {max(norms)} > C = {clip}"
    # the clipping did act: these updates are far longer than 0.05 before clipping
    assert min(norms) > 0.99 * clip and bits == [0] * 6
    rows = _metrics(tmp_path / "outputs" / "dp")
    assert all(row["dp_update_norm_max"] <= clip and row["dp_clip_norm"] == clip for row in rows)
    assert all(row["dp_noise_std"] == pytest.approx(0.3 * clip / 3) for row in rows)


def test_clip_upload_keeps_small_updates_and_integer_tensors():
    received = ArrayRecord({"w": Array(np.zeros(4, np.float32)), "n": Array(np.asarray(3, np.int64))})
    small = {"w": torch.full((4,), 0.1), "n": torch.tensor(5)}
    out, norm = clip_upload(received, small, 1.0)
    assert norm == pytest.approx(0.2) and torch.equal(out["w"], small["w"]) and int(out["n"]) == 5
    large = {"w": torch.full((4,), 10.0), "n": torch.tensor(5)}
    out, norm = clip_upload(received, large, 1.0)
    assert norm == pytest.approx(20.0) and float(out["w"].double().norm()) <= 1.0
    assert float(out["w"].double().norm()) == pytest.approx(1.0, rel=1e-6) and out["w"].dtype == torch.float32


class EchoGrid(ScriptedGrid):
    """ScriptedGrid whose train replies echo σ̄ (a zero update) with a DP norm bit."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids):
            if message.metadata.message_type == MessageType.TRAIN:
                assert message.content["config"][CLIP_NORM_KEY] > 0
                self._replies[message_id].content[METRICS][NORM_BIT_KEY] = 1
        return ids


class MemoryRecorder:
    checkpoint = None

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def elapsed(self) -> float:
        return 0.0

    def record_round(self, record: dict) -> None:
        self.rounds.append(record)

    def save_checkpoint(self, *args, **kwargs) -> None:
        pass


def test_noise_has_the_configured_standard_deviation():
    size, clients, z, clip = 200_000, 4, 1.0, 2.0
    template = ArrayRecord({"w": Array(np.zeros(size, np.float32)), "n": Array(np.asarray(0, np.int64))})
    privacy = SharedUpdatePrivacy(clip, z, 1e-5, seed=7)
    strategy = FedLoRAStrategy(upload_template=template, privacy=privacy, seed=7)
    result = strategy.start(EchoGrid({1: 0.5}, clients, app_defaults()), template, num_rounds=1)
    noise = result.arrays["w"].numpy().astype(np.float64)  # the updates are zero: what is left is noise
    expected = z * clip / clients
    assert noise.std() == pytest.approx(expected, rel=0.01)  # the sample std's sd is ~0.16 % here
    assert abs(noise.mean()) < 5 * expected / math.sqrt(size)
    assert stats.kstest(noise, "norm", args=(0.0, expected)).pvalue > 1e-3
    assert stats.kstest(noise, "norm", args=(0.0, 1.1 * expected)).pvalue < 1e-6  # the test can tell 10 % apart
    assert int(result.arrays["n"].numpy()) == 0, "integer tensors are not released"


def _independent_epsilon(rounds: int, population: int, sampled: int, z: float, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(population, sampled, dp_event.GaussianDpEvent(z / 2))
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_in_metrics_equals_an_independent_accountant_and_grows(tmp_path):
    z, delta = 1.3, 1e-4
    config = _run_config(tmp_path / "outputs", "eps", num_server_rounds=4, fraction_train=0.5, dp_clip_norm=1.0,
                         dp_noise_multiplier=z, dp_delta=delta)
    _start(EchoGrid({r: 0.5 for r in range(1, 5)}, 6, config), config)
    rows = _metrics(tmp_path / "outputs" / "eps")
    epsilons = [row["dp_epsilon"] for row in rows]
    assert [row["num_participants"] for row in rows] == [3] * 4
    for server_round, epsilon in enumerate(epsilons, 1):
        assert epsilon == pytest.approx(_independent_epsilon(server_round, 6, 3, z, delta), rel=1e-9)
    assert all(later > earlier for earlier, later in pairwise(epsilons))
    summary = _summary(tmp_path / "outputs" / "eps")
    assert summary["dp_epsilon"] == epsilons[-1] and summary["dp_delta"] == delta


def test_a_target_epsilon_stops_the_run_with_its_line_and_status_6(tmp_path, caplog):
    z, delta = 1.3, 1e-4
    target = (_independent_epsilon(2, 6, 3, z, delta) + _independent_epsilon(3, 6, 3, z, delta)) / 2
    config = _run_config(tmp_path / "outputs", "budget", num_server_rounds=5, fraction_train=0.5, dp_clip_norm=1.0,
                         dp_noise_multiplier=z, dp_delta=delta, dp_target_epsilon=target)
    grid = EchoGrid({r: 0.5 for r in range(1, 6)}, 6, config)
    with caplog.at_level(logging.ERROR), pytest.raises(PrivacyBudgetExhausted) as raised:
        _start(grid, config)
    assert isinstance(raised.value, FlowerPrivacyBudgetExhausted) and raised.value.exit_code == 906
    assert "round 3 would take ε to" in str(raised.value) and "stops before that round's training" in str(raised.value)
    run_dir = tmp_path / "outputs" / "budget"
    assert [row["round"] for row in _metrics(run_dir)] == [1, 2]
    assert all(row["dp_epsilon"] <= target for row in _metrics(run_dir))
    summary = _summary(run_dir)
    assert (summary["status"], summary["failure"], summary["exit_status"]) == ("failed", "privacy-budget", 6)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("exit 6 (privacy-budget): dp-target-epsilon: round 3" in line for line in errors)


def test_dp_state_survives_a_checkpoint():
    template = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    first = FedLoRAStrategy(upload_template=template, privacy=SharedUpdatePrivacy(1.0, 1.0, 1e-5, adaptive=True,
                                                                                    clipped_count_stddev=2.0))
    first.start(EchoGrid({1: 0.5, 2: 0.5}, 4, app_defaults()), template, num_rounds=2)
    state = first.checkpoint_state()
    second = FedLoRAStrategy(upload_template=template, privacy=SharedUpdatePrivacy(1.0, 1.0, 1e-5, adaptive=True,
                                                                                     clipped_count_stddev=2.0))
    second.restore(state)
    assert second.privacy.clip_norm == first.privacy.clip_norm != 1.0  # every update was unclipped: C shrank
    assert second.privacy.epsilon() == first.privacy.epsilon() > 0


@pytest.mark.parametrize(("overrides", "words"), [
    ({"method": "fedamp", "dp-clip-norm": 1.0}, "sends each client its own arrays"),
    ({"method": "local", "dp-clip-norm": 1.0}, "shares nothing"),
    ({"method": "fedavg", "dp-clip-norm": 1.0, "aggregation": "weighted"}, "equally weighted mean"),
    ({"dp-clip-norm": 1.0, "aggregation": "median"}, "equally weighted mean"),
    ({"dp-noise-multiplier": 1.0}, "DP is off while dp-clip-norm = 0"),
    ({"dp-clip-norm": 1.0, "dp-target-epsilon": 3.0}, "ε is infinite"),
    ({"method": "fedcac", "aggregation": "krum"}, "robust aggregation applies"),
])
def test_settings_dp_cannot_honour_are_refused_in_one_line(overrides, words):
    config = load_config({**app_defaults(), **overrides})
    with pytest.raises(ConfigError) as raised:
        get_method(config.method).strategy.check(config)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_an_adaptive_noise_the_count_cannot_carry_is_a_config_failure(tmp_path):
    config = _run_config(tmp_path / "outputs", "adaptive", dp_clip_norm=1.0, dp_noise_multiplier=1.0,
                         dp_clipping="adaptive")
    with pytest.raises(RunConfigError, match=r"adaptive clipping needs z < 2·σ_b = 0\.3"):
        _start(EchoGrid({1: 0.5}, 3, config), config)


def test_keys_out_of_range_are_refused():
    for key, value in (("dp-delta", 1.0), ("dp-clip-norm", -1.0), ("dp-target-quantile", 1.5), ("trim-fraction", 0.5)):
        with pytest.raises(ConfigError, match=key):
            load_config({**app_defaults(), key: value})


def test_noisy_running_variances_are_clamped_at_zero():
    template = ArrayRecord({"bn.running_var": Array(np.zeros(10_000, np.float32)),
                            "bn.running_mean": Array(np.zeros(10_000, np.float32))})
    strategy = FedLoRAStrategy(upload_template=template, privacy=SharedUpdatePrivacy(1.0, 1.0, 1e-5))
    result = strategy.start(EchoGrid({1: 0.5}, 2, app_defaults()), template, num_rounds=1)
    variance, mean = result.arrays["bn.running_var"].numpy(), result.arrays["bn.running_mean"].numpy()
    assert variance.min() == 0.0 and (variance > 0).mean() == pytest.approx(0.5, abs=0.03)
    assert mean.min() < -1.0, "other tensors keep their noise"
