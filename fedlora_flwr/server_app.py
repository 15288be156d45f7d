"""The ServerApp shared by every method (Flower Message API).

Validates the run config before anything else (a bad value stops the run with one line naming
the key), creates the run folder, builds the method's initial shared tensors from a seeded model
(the clients build the same one, so σ⁰ and the initial τ agree everywhere), and runs the
method's strategy for ``num-server-rounds`` rounds (with ``resume``: from the run's checkpoint).
It reads no data: the class count and image shape come from the dataset's metadata
(``fedlora_flwr.data.task_spec``), as a SuperLink holds none.
A failure raises a :class:`~fedlora_flwr.exits.RunFailure` (Flower then records the run as
failed, with the reason) after one error line: a bad config, dataset or model, too few SuperNodes
within ``node-wait-timeout``, a round without a valid reply, an unreadable state file. Once the run
folder holds ``config.json``, ``summary.json`` records the failure too (any other exception as
``"failure": "error"``, re-raised as it is).
"""

from __future__ import annotations

from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora_flwr.config import ConfigError, load_config, unread_changes
from fedlora_flwr.data import DatasetError, task_spec
from fedlora_flwr.exits import RunConfigError, RunFailure, RunStateError
from fedlora_flwr.methods import PluginError, get_method
from fedlora_flwr.results import RunRecorder, create_run_dir
from fedlora_flwr.store import StateError
from fedlora_flwr.text_models import ModelError

app = ServerApp()

#: Errors of this project's modules and the failure each one is.
FAILURE_OF = {ConfigError: RunConfigError, DatasetError: RunConfigError, ModelError: RunConfigError,
              PluginError: RunConfigError, StateError: RunStateError}


@app.main()
def main(grid: Grid, context: Context) -> None:
    recorder: RunRecorder | None = None
    try:
        config = load_config(context.run_config)
        task = task_spec(config.dataset, config.data_dir)  # no data read: a SuperLink holds none
        method = get_method(config.method)
        method.strategy.check(config)
        method.check_model(task, config)  # the plain model has what the method needs
        torch.manual_seed(config.seed)
        client = method.client(config)
        model = client.build_model(task, partition_id=0)
        run_dir = create_run_dir(config)
        recorder = RunRecorder(run_dir, config)  # resume: reads the checkpoint
        strategy = method.strategy.from_config(config, recorder, upload_template=ArrayRecord(client.upload_template(model)))
        unread = unread_changes(context.run_config)
        if unread:
            log(WARNING, "[fedlora-flwr] method %r does not read %s", config.method,
                ", ".join(f"{key}={value!r}" for key, value in sorted(unread.items())))
        log(INFO, "[fedlora-flwr] %s on %s (%s), outputs in %s", config.method, config.dataset, config.data_dir, run_dir)
        instructions = ConfigRecord({"run-dir": str(run_dir), "data-dir": config.data_dir, "backbone": config.backbone})
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(client.initial_download(model)),
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=instructions,
            evaluate_config=ConfigRecord(dict(instructions)),
        )
        recorder.finish(shared=result.arrays.to_torch_state_dict())
    except Exception as err:
        failure = _failure(err)
        if failure is None:
            log(ERROR, "[fedlora-flwr] run failed: %s: %s", type(err).__name__, err)
        else:
            log(ERROR, "[fedlora-flwr] exit %d (%s): %s", failure.status, failure.kind, failure.reason)
        if recorder is not None:
            recorder.fail(failure or err)
        if failure is None or failure is err:
            raise
        raise failure from None


def _failure(err: Exception) -> RunFailure | None:
    """``err`` as the :class:`RunFailure` it is, or None for an unexpected error."""
    if isinstance(err, RunFailure):
        return err
    for error, failure in FAILURE_OF.items():
        if isinstance(err, error):
            return failure(str(err))
    return None
