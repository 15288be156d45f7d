"""The ServerApp shared by every method (Flower Message API).

Validates the run config before anything else (a bad value stops the run with one line naming
the key), creates the run folder, builds the method's initial shared tensors from a seeded model
(the clients build the same one, so σ⁰ and the initial τ agree everywhere), and runs the
method's strategy for ``num-server-rounds`` rounds (with ``resume``: from the run's checkpoint).
It reads no data: the class count and image shape come from the dataset's metadata
(``fedlora_flwr.data.task_spec``), as a SuperLink holds none.
When ``min-available-nodes`` SuperNodes do not connect within ``node-wait-timeout`` it exits with
code 3 after one error line.
"""

from __future__ import annotations

import sys
from logging import ERROR, INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora_flwr.config import ConfigError, load_config
from fedlora_flwr.data import DatasetError, task_spec
from fedlora_flwr.methods import METHODS
from fedlora_flwr.results import RunRecorder, create_run_dir
from fedlora_flwr.store import StateError
from fedlora_flwr.text_models import ModelError
from strategies.sampling import FederationIncomplete

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config = load_config(context.run_config)
        task = task_spec(config.dataset, config.data_dir)  # no data read: a SuperLink holds none
        method = METHODS[config.method]
        method.strategy.check(config)
        torch.manual_seed(config.seed)
        client = method.client(config)
        model = client.build_model(task, partition_id=0)
        run_dir = create_run_dir(config)
        recorder = RunRecorder(run_dir, config)  # resume: reads the checkpoint
        strategy = method.strategy.from_config(config, recorder, upload_template=ArrayRecord(client.upload_template(model)))
    except (ConfigError, DatasetError, StateError, ModelError) as err:
        log(ERROR, "[fedlora-flwr] %s", err)
        sys.exit(2)
    log(INFO, "[fedlora-flwr] %s on %s (%s), outputs in %s", config.method, config.dataset, config.data_dir, run_dir)

    initial = ArrayRecord(client.initial_download(model))

    instructions = ConfigRecord({"run-dir": str(run_dir), "data-dir": config.data_dir, "backbone": config.backbone})
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=instructions,
            evaluate_config=ConfigRecord(dict(instructions)),
        )
    except FederationIncomplete as err:
        log(ERROR, "[fedlora-flwr] %s", err)
        sys.exit(3)
    final = result.arrays if strategy.aggregated_rounds else initial  # no round aggregated: σ̄ is still σ⁰
    recorder.finish(shared=final.to_torch_state_dict())
