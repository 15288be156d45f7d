"""A user's own Flower ServerApp running FedLoRA with this project's strategy and ClientApp.

None of this project's ServerApp is used: no run folder, no ``metrics.jsonl``, no checkpoint. The
strategy is built from plain keyword arguments; ``start()`` returns Flower's ``Result`` (per round
``train-loss`` and ``acc-mean``, the mean of the clients' own test accuracies, and the final σ̄
in ``Result.arrays``), which this app logs and saves itself.

The ClientApp (``fedlora_flwr.client_app:app``) takes its settings from the run config (the keys of
``[tool.flwr.app.config]``) and needs three more in every message's config: ``run-dir`` (each
client keeps its τ_i under ``<run-dir>/clients/<partition-id>/``), ``data-dir`` and ``backbone``.
The server builds σ⁰ from the same seeded model as the clients, so σ⁰ and the initial τ agree.

tests/test_plain_serverapp.py runs it in process. For ``flwr run`` (not tried here), add
``"examples/**/*.py"`` to ``fab-include`` and set ``serverapp = "examples.plain_serverapp:app"``
under ``[tool.flwr.app.components]`` in pyproject.toml.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from clients.fedlora import FedLoRAClient
from fedlora_flwr.config import load_config
from fedlora_flwr.data import task_spec
from strategies.fedlora import FedLoRAStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(context.run_config)  # what the ClientApp will read too
    torch.manual_seed(config.seed)
    client = FedLoRAClient(config)
    model = client.build_model(task_spec(config.dataset, config.data_dir), partition_id=0)

    strategy = FedLoRAStrategy(
        upload_template=ArrayRecord(client.upload_template(model)),  # σ: what every train reply must carry
        fraction_train=config.fraction_train,
        seed=config.seed,
        node_wait_timeout=60.0,
    )
    run_dir = Path(config.output_dir) / "plain-serverapp"
    instructions = {"run-dir": str(run_dir), "data-dir": config.data_dir, "backbone": ""}
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(client.initial_download(model)),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(instructions),
        evaluate_config=ConfigRecord(instructions),
    )
    for server_round, metrics in result.evaluate_metrics_clientapp.items():
        log(INFO, "round %d: acc-mean %.4f", server_round, metrics["acc-mean"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(result.arrays.to_torch_state_dict(), run_dir / "sigma.safetensors")
