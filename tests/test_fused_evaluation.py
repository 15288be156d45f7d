"""``fused-evaluation``: round t's evaluation rides on round t+1's train message (issue 12).

The numbers must be those of separate evaluate messages: every metrics row (but the bytes sent),
the summary and every state file are compared with the unfused run of the same seed; fewer
messages are sent; a run that crashed while a round's evaluation was pending resumes to the same
end.
"""

from __future__ import annotations

import logging

import pytest
from flwr.app import MessageType
from inprocess import InProcessGrid
from test_resume import Crash, _config, _rows, _state_files, _summary
from test_resume import _start as start_run

from fedlora_flwr.exits import RunConfigError
from fedlora_flwr.results import CHECKPOINT_FILE, load_checkpoint
from strategies.evaluation import FusedEvaluation

BYTES_SENT = {"bytes_down", "bytes_down_evaluate", "bytes_down_total"}


class CountingGrid(InProcessGrid):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent = {MessageType.TRAIN: 0, MessageType.EVALUATE: 0}

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type in self.sent:
                self.sent[message.metadata.message_type] += 1
        return super().push_messages(messages)


def _start(config: dict) -> CountingGrid:
    return start_run(config, CountingGrid)


def _without_bytes_sent(rows: list[dict] | dict):
    if isinstance(rows, dict):
        return {key: value for key, value in rows.items() if key not in BYTES_SENT}
    return [_without_bytes_sent(row) for row in rows]


@pytest.mark.parametrize(("method", "fraction", "extra"), [
    ("fedlora", 0.67, {}),
    ("fedlora", 1.0, {}),
    ("fedavg", 0.67, {}),
    ("local", 0.67, {}),
    ("lora-ft", 0.67, {"local-steps": 2}),  # fine-tunes in begin_evaluation: its seed is the evaluated round's
    # per-architecture accuracy groups; both points (its paper point, after training, rides on the train reply)
    ("pfedlora", 0.67, {"model-family": "cnn-hetero", "pfedlora-rank": 4, "evaluate-at": "both"}),
])
def test_fused_evaluation_gives_the_numbers_of_separate_evaluate_messages(tmp_path, method, fraction, extra):
    separate = _config(tmp_path / "separate", "run", method, **{"fraction-train": fraction, **extra})
    fused = {**separate, "output-dir": str(tmp_path / "fused"), "fused-evaluation": True}
    separate_grid, fused_grid = _start(separate), _start(fused)

    separate_dir, fused_dir = tmp_path / "separate" / "run", tmp_path / "fused" / "run"
    assert _without_bytes_sent(_rows(fused_dir)) == _without_bytes_sent(_rows(separate_dir))
    assert _without_bytes_sent(_summary(fused_dir)) == _without_bytes_sent(_summary(separate_dir))
    assert _state_files(fused_dir) == _state_files(separate_dir)
    assert [row["round"] for row in _rows(fused_dir)] == [1, 2, 3]

    assert fused_grid.sent[MessageType.TRAIN] == separate_grid.sent[MessageType.TRAIN]
    participants_after_round_1 = sum(len(row["participants"]) for row in _rows(fused_dir)[1:])
    assert fused_grid.sent[MessageType.EVALUATE] == separate_grid.sent[MessageType.EVALUATE] - participants_after_round_1
    fused_bytes, separate_bytes = ([row["bytes_down"] for row in _rows(run)] for run in (fused_dir, separate_dir))
    shares_arrays = separate_bytes[0] > 0  # local sends none
    assert [f < s for f, s in zip(fused_bytes, separate_bytes)] == [shares_arrays, shares_arrays, False]
    assert fused_bytes[-1] == separate_bytes[-1]  # the last round evaluates everyone


@pytest.mark.parametrize("crash", ["finishing round 2's evaluation", "saving round 2's checkpoint"])
def test_a_run_that_crashed_with_an_evaluation_pending_resumes_to_the_same_end(tmp_path, monkeypatch, crash):
    reference_config = _config(tmp_path / "reference", "run", "fedlora")
    _start(reference_config)
    config = {**_config(tmp_path, "run", "fedlora"), "fused-evaluation": True}
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        if crash.startswith("finishing"):
            finish = FusedEvaluation.finish

            def finish_or_crash(self, replies):
                if self.pending.round == 2:
                    raise Crash("killed before round 2's row")
                return finish(self, replies)

            patch.setattr(FusedEvaluation, "finish", finish_or_crash)
        else:
            from test_resume import _crash_at
            _crash_at(patch, 2)
        with pytest.raises(Crash):
            _start(config)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.pending_evaluation is not None, f"the checkpoint of round {checkpoint.round} waits for its row"
    assert [row["round"] for row in _rows(run_dir)] == list(range(1, checkpoint.round + (crash[0] == "s")))

    _start({**config, "resume": True})
    reference_dir = tmp_path / "reference" / "run"
    assert _without_bytes_sent(_rows(run_dir)) == _without_bytes_sent(_rows(reference_dir))
    assert _without_bytes_sent(_summary(run_dir)) == _without_bytes_sent(_summary(reference_dir))
    assert _state_files(run_dir) == _state_files(reference_dir)
    assert (run_dir / CHECKPOINT_FILE).is_file()


def test_fused_evaluation_of_a_method_with_per_client_messages_is_refused_in_one_line(tmp_path, caplog):
    config = {**_config(tmp_path, "run", "fedamp"), "fused-evaluation": True}
    with caplog.at_level(logging.ERROR), pytest.raises(RunConfigError):
        _start(config)
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(lines) == 1 and "fused-evaluation" in lines[0] and "fedamp" in lines[0]
    assert not (tmp_path / "run").exists(), "nothing written for a refused config"
