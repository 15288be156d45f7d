"""The ClientApp shared by every method (Flower Message API).

Per message: validate the run config, build the method's model (seeded, so σ and the random
``lora_A`` start identical on every client, METHODS.md A.2), load the received shared tensors and
this client's personal tensors from the on-disk store, then

- ``train``: run the method's schedule, save the personal tensors, reply with the shared ones;
- ``evaluate``: evaluate the model (received σ̄ + own τ_i for FedLoRA) on the client's own test
  split, after aggregation (METHODS.md A.6).

Nothing is kept in module globals except per-process caches of immutable data (the dataset
arrays and the partition indices, in ``fedlora_flwr.data``): Ray reuses one worker process for
many simulated clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import RunConfig, load_config
from fedlora_flwr.data import ClientSplit, ImageDataset, PartitionConfig, client_split, client_tensors, load_dataset
from fedlora_flwr.groups import load_group
from fedlora_flwr.methods import METHODS
from fedlora_flwr.results import CLIENTS_DIR
from fedlora_flwr.store import PersonalStateStore
from fedlora_flwr.training import evaluate as evaluate_model
from fedlora_flwr.training import train_schedule
from strategies.base import ARRAYS, METRICS

app = ClientApp()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class ClientSession:
    """Everything one message needs: config, method, data split, model, personal store."""

    config: RunConfig
    method: MethodClient
    partition_id: int
    dataset: ImageDataset
    split: ClientSplit
    model: nn.Module
    store: PersonalStateStore
    device: torch.device
    server_round: int

    @classmethod
    def open(cls, message: Message, context: Context) -> ClientSession:
        instructions = message.content["config"]
        # The server resolved the paths; a SuperNode may point at its own copy of the data.
        overrides = {"data-dir": context.node_config.get("data-dir", instructions["data-dir"])}
        config = load_config({**context.run_config, **overrides})
        method = METHODS[config.method].client(config)
        dataset = load_dataset(config.dataset, config.data_dir)
        device = pick_device(config.device)
        torch.manual_seed(config.seed)
        model = method.build_model(dataset.num_classes).to(device)
        partition_id = int(context.node_config["partition-id"])
        split = client_split(
            config.dataset,
            config.data_dir,
            partition_id,
            PartitionConfig(
                num_clients=int(context.node_config["num-partitions"]),
                scheme=config.partition,
                alpha=config.alpha,
                classes_per_client=config.classes_per_client,
                train_per_client=config.train_per_client,
                test_per_client=config.test_per_client,
                seed=config.seed,
            ),
        )
        run_dir = Path(str(instructions["run-dir"]))
        # Simulation: <run-dir>/clients/<pid>/. A SuperNode may keep its state elsewhere,
        # keyed by run name: <state-dir>/<run-name>/<pid>/.
        state_dir = context.node_config.get("state-dir")
        store_root = Path(str(state_dir)) / run_dir.name if state_dir else run_dir / CLIENTS_DIR
        session = cls(
            config=config,
            method=method,
            partition_id=partition_id,
            dataset=dataset,
            split=split,
            model=model,
            store=PersonalStateStore(store_root, config.method),
            device=device,
            server_round=int(instructions["server-round"]),
        )
        session._load_state(message.content[ARRAYS])
        return session

    def _load_state(self, shared: ArrayRecord) -> None:
        partition = self.method.partition
        load_group(self.model, shared.to_torch_state_dict(), partition.keys(self.model, "shared"), "shared arrays from the server")
        personal = self.store.load(self.partition_id, expected=partition.state(self.model, "personal"))
        if personal is not None:
            load_group(self.model, personal, personal.keys(), f"personal state of client {self.partition_id}")

    def tensors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = client_tensors(self.dataset, self.split.train if train else self.split.test, train=train)
        return x.to(self.device), y.to(self.device)

    def reply(self, message: Message, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
        content = RecordDict({METRICS: MetricRecord({**metrics, "partition-id": self.partition_id})})
        if arrays is not None:
            content[ARRAYS] = arrays
        return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    session = ClientSession.open(message, context)
    x, y = session.tensors(train=True)
    config = session.config
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + session.server_round * 1_009 + session.partition_id)
    stats = train_schedule(
        session.model,
        session.method.partition,
        session.method.schedule(),
        x,
        y,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        generator=generator,
        augment=session.dataset.train_augment,
    )
    partition = session.method.partition
    personal = partition.state(session.model, "personal")
    if personal:
        session.store.save(session.partition_id, personal)
    shared = ArrayRecord(partition.state(session.model, "shared"))
    return session.reply(message, {"num-examples": len(y), "train-loss": stats.loss, "train-samples": stats.samples}, shared)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    session = ClientSession.open(message, context)
    x, y = session.tensors(train=False)
    stats = evaluate_model(session.model, x, y, batch_size=session.config.batch_size)
    return session.reply(message, {"num-examples": stats.total, "accuracy": stats.accuracy, "eval-loss": stats.loss})
