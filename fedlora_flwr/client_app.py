"""The ClientApp shared by every method (Flower Message API).

Per message: validate the run config, build the method's model (seeded, so σ and the random
``lora_A`` start identical on every client; docs/methods/fedlora.md), load the received shared
tensors and this client's personal tensors from the on-disk store, then

- ``train``: run the method's schedule, save the personal tensors, reply with what the method
  uploads (its shared tensors by default);
- ``evaluate``: evaluate the model (received σ̄ + own τ_i for FedLoRA) on the client's own test
  split, after aggregation (as FedDecomp's ``src/server.py``; docs/concepts/strategies.md). With
  ``fused-evaluation`` a train message may name the previous round (``evaluate-round``): the client
  first evaluates that round exactly as an evaluate message would, then trains, and replies with both.
  When ``evaluate-at`` includes after-training, a train reply also carries the evaluation of the
  model as its training left it (record ``after-training``).

The method's hooks (``clients/base.py``) decide what is loaded, trained, stored and sent. A message
names the last round the server recorded this client training in (``last-trained-round``): when
that round's state is gone the store raises ``StateError`` naming the path, and the reply fails
with it instead of the client starting afresh.

Nothing is kept in module globals except per-process caches of immutable data (the dataset
arrays and the partition indices, in ``fedlora_flwr.data``): Ray reuses one worker process for
many simulated clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.base import MethodClient
from fedlora_flwr.config import AFTER_TRAINING, RunConfig, load_config
from fedlora_flwr.data import (
    ClientSplit, DatasetError, ImageDataset, PartitionConfig, augment_backend, client_split, client_tensors,
    hold_out_validation, load_dataset, task_spec,
)
from fedlora_flwr.groups import Phase
from fedlora_flwr.methods import get_method
from fedlora_flwr.results import CLIENTS_DIR
from fedlora_flwr.store import LAST_TRAINED, PersonalStateStore
from fedlora_flwr.text import TextDataset, TokenizedText, tokenized
from fedlora_flwr.text_models import checkpoint_path
from fedlora_flwr.training import EvalStats, TrainStats, train_schedule
from fedlora_flwr.training import evaluate as evaluate_model
from strategies.privacy import CLIP_NORM_KEY, NORM_BIT_KEY, clip_upload
from strategies.protocol import (
    ARRAYS, CLIENT_INFO, EVALUATE_ROUND, EVALUATION, FAULT, METHOD_METRICS, METRICS, MODELLED_TIMEOUT,
    TRAINED_EVALUATION,
)

app = ClientApp()


def pick_device(choice: str) -> torch.device:
    """The run config's ``device``; ``cuda`` is refused in one line where no GPU is visible (Ray hides
    the GPUs from a simulated client unless ``client-resources-num-gpus`` > 0)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA GPU is visible to this client; in a simulation set "
                           "client-resources-num-gpus > 0 (e.g. 0.25: four clients share a GPU), or use device='auto'")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


#: The words of a :func:`training_seed`: the batch generator's (mini-batch order, augmentation) and
#: the global torch RNG's (every other draw of the model in training: dropout, PEFT's lora_dropout).
BATCHES, GLOBAL_RNG = 0, 1


def training_seed(seed: int, server_round: int, partition_id: int, stream: int = 0, word: int = BATCHES) -> int:
    """A seed of one client's local training in one round: word ``word`` of NumPy's ``SeedSequence``
    hash of (seed, round, partition id, stream), so no two clients, rounds or streams (0: training,
    1: lora-ft's fine-tuning before evaluation) share one, and the batch generator (:data:`BATCHES`)
    and the global torch RNG (:data:`GLOBAL_RNG`) draw from independent seeds."""
    words = np.random.SeedSequence([seed, server_round, partition_id, stream]).generate_state(word + 1, dtype=np.uint64)
    return int(words[word])


@dataclass
class ClientSession:
    """One client's work for one message, independent of Flower: config, method, data split,
    model (shared tensors from the server + personal ones from the store), personal store."""

    config: RunConfig
    method: MethodClient
    partition_id: int
    dataset: ImageDataset | TokenizedText
    split: ClientSplit
    model: nn.Module
    store: PersonalStateStore
    device: torch.device
    server_round: int

    @classmethod
    def create(
        cls, config: RunConfig, partition_id: int, num_partitions: int, store_root: Path, server_round: int,
        last_trained: int = 0,
    ) -> ClientSession:
        """Build the seeded model and find the client's data; call :meth:`load` next. ``last_trained``:
        the last round the server recorded this client training in (0: never), whose state must exist."""
        method = get_method(config.method).client(config)
        dataset = load_dataset(config.dataset, config.data_dir)
        expected = task_spec(config.dataset, config.data_dir)  # what the server built its model for
        if dataset.spec != expected:
            raise DatasetError(
                f"data-dir: {config.data_dir} holds {dataset.spec.num_classes} classes of {dataset.spec.image_shape} "
                f"images, but dataset={config.dataset!r} is {expected.num_classes} classes of {expected.image_shape}"
            )
        if isinstance(dataset, TextDataset):  # token ids of the model's tokenizer, once per process
            dataset = tokenized(dataset, checkpoint_path(config.model), config.max_seq_length)
        device = pick_device(config.device)
        torch.manual_seed(config.seed)
        model = method.build_model(dataset.spec, partition_id).to(device)
        split = client_split(
            config.dataset,
            config.data_dir,
            partition_id,
            PartitionConfig(
                num_clients=num_partitions,
                scheme=config.partition,
                alpha=config.alpha,
                classes_per_client=config.classes_per_client,
                train_per_client=config.train_per_client,
                test_per_client=config.test_per_client,
                seed=config.seed,
            ),
        )
        if config.validation_fraction:
            split = hold_out_validation(split, config.validation_fraction, config.seed, partition_id)
        return cls(
            config=config,
            method=method,
            partition_id=partition_id,
            dataset=dataset,
            split=split,
            model=model,
            store=PersonalStateStore(store_root, config.method, round=server_round,
                                     trained={partition_id: last_trained}),
            device=device,
            server_round=server_round,
        )

    @classmethod
    def open(cls, message: Message, context: Context, evaluate_round: int | None = None) -> ClientSession:
        """The session a Flower message asks for, with the message's shared tensors loaded; with
        ``evaluate_round``, the evaluation of that round a fused train message carries."""
        instructions = message.content["config"]
        # The server resolved the paths; a SuperNode may point at its own copy of the data.
        overrides = {"data-dir": context.node_config.get("data-dir", instructions["data-dir"]),
                     "backbone": instructions["backbone"]}
        config = load_config({**context.run_config, **overrides})
        run_dir = Path(str(instructions["run-dir"]))
        # Simulation: <run-dir>/clients/<pid>/. A SuperNode may keep its state elsewhere,
        # keyed by run name: <state-dir>/<run-name>/<pid>/.
        state_dir = context.node_config.get("state-dir")
        session = cls.create(
            config,
            partition_id=int(context.node_config["partition-id"]),
            num_partitions=int(context.node_config["num-partitions"]),
            store_root=Path(str(state_dir)) / run_dir.name if state_dir else run_dir / CLIENTS_DIR,
            server_round=evaluate_round or int(instructions["server-round"]),
            last_trained=int(instructions.get(LAST_TRAINED, 0)),
        )
        training = evaluate_round is None and message.metadata.message_type.startswith("train")
        session.load(message.content[ARRAYS].to_torch_state_dict(), training=training)
        return session

    def load(self, received: Mapping[str, torch.Tensor], training: bool) -> None:
        """Load what the server sent and this client's personal state (the method's ``load`` hook):
        training starts from the state of earlier rounds, evaluation sees this round's training."""
        self.store = self.store.at_round(self.server_round, training)
        self.method.load(self, received, training)

    def tensors(self, train: bool, validation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This client's training, validation (held out of the training arrays) or test split on the
        device, in one transfer per call."""
        indices = self.split.validation if validation else self.split.train if train else self.split.test
        train = train or validation
        if isinstance(self.dataset, TokenizedText):
            x, y = self.dataset.tensors(indices, train)
            return x.to(self.device), y.to(self.device)
        return client_tensors(self.dataset, indices, train=train, device=self.device)

    def run_schedule(self, schedule: Sequence[Phase], stream: int = 0) -> TrainStats:
        """Train the model on this client's training split with the method's partition and loss.
        ``stream`` picks the random draws: 0 for training, 1 for fine-tuning before evaluation.
        The mini-batch order and augmentation come from a generator on the training device (on
        CUDA they differ from a CPU run's draws); the global torch RNG (CPU and CUDA), which
        dropout draws from, is re-seeded from the same (seed, round, partition id, stream), so
        dropout masks differ between clients, rounds and streams and repeat for the same ones.
        (:meth:`create` seeds it with ``seed`` alone, for the model init every client shares.)"""
        x, y = self.tensors(train=True)
        config = self.config
        method = self.method
        seed = training_seed(config.seed, self.server_round, self.partition_id, stream)
        torch.manual_seed(training_seed(config.seed, self.server_round, self.partition_id, stream, GLOBAL_RNG))
        return train_schedule(
            self.model,
            method.partition,
            schedule,
            x,
            y,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            augment=self.dataset.augmentation(augment_backend(config.augment_backend, self.device)),
            loss_fn=method.loss,
            precision=config.precision,
        )

    def train(self) -> tuple[TrainStats, dict[str, torch.Tensor]]:
        """Run the method's schedule, save its personal state; return the stats and the upload."""
        method = self.method
        method.begin_training(self)
        stats = self.run_schedule(method.schedule())
        method.save(self)
        return stats, method.upload(self)

    def evaluate(self, after_training: bool = False) -> EvalStats:
        """The model's accuracy on this client's test split; after aggregation the method's
        ``begin_evaluation`` runs first, ``after_training`` evaluates the model as training left it."""
        if not after_training:
            self.method.begin_evaluation(self)
        return self.score()

    def score(self, validation: bool = False) -> EvalStats:
        """The model as it stands on this client's test split (``validation``: its validation split)."""
        x, y = self.tensors(train=False, validation=validation)
        return evaluate_model(self.model, x, y, batch_size=self.config.batch_size, predict=self.method.predict,
                              precision=self.config.precision)

    def evaluation_metrics(self, after_training: bool = False) -> dict:
        """The evaluation a reply carries: test accuracy, examples and loss, and with a validation
        split the same model's accuracy and loss on it (``val-accuracy``, ``val-loss``)."""
        stats = self.evaluate(after_training)
        metrics = {"num-examples": stats.total, "accuracy": stats.accuracy, "eval-loss": stats.loss}
        if len(self.split.validation):
            held_out = self.score(validation=True)
            metrics.update({"val-accuracy": held_out.accuracy, "val-loss": held_out.loss})
        return metrics

    def reply(self, message: Message, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
        content = RecordDict({METRICS: MetricRecord({**metrics, "partition-id": self.partition_id})})
        group = self.method.client_group(self.partition_id)
        if group is not None:
            content[CLIENT_INFO] = ConfigRecord({"group": group})
        if arrays is not None:
            content[ARRAYS] = arrays
        return Message(content, reply_to=message)


class InjectedFault(RuntimeError):
    """Raised by a client the server told to fail (``fault-kind = "raise"``)."""


def inject_fault(kind: str, message: Message, reply: Message, num_partitions: int, scale: float = 100.0) -> Message:
    """``reply`` spoilt the way ``fault-kind`` says (the server picked this client;
    ``strategies/faults.py`` lists the kinds). ``timeout`` is modelled: an immediate reply with a
    ``modelled-timeout`` record, which the server treats as one that missed ``round-timeout``
    (sleeping would hold a simulation's Ray actor, and every message queued behind it, past the
    round). ``scaled`` sends received + ``scale``·(trained − received) for every floating-point
    tensor it received (a boosted update, run-config ``fault-scale``)."""
    if kind == "raise":
        raise InjectedFault("injected fault (fault-kind = 'raise')")
    if kind == "timeout":
        return Message(RecordDict({MODELLED_TIMEOUT: ConfigRecord({"fault-kind": kind})}), reply_to=message)
    content = reply.content
    metrics = content[METRICS]
    if kind == "nan-weight":
        metrics["num-examples"] = float("nan")
    elif kind == "negative-weight":
        metrics["num-examples"] = -int(metrics["num-examples"])
    elif kind == "forged-id":
        metrics["partition-id"] = (int(metrics["partition-id"]) + 1) % num_partitions
    elif kind == "bad-eval":  # the evaluation this reply carries: its own, a fused one, or its after-training one
        evaluation = next((content[name] for name in (EVALUATION, TRAINED_EVALUATION) if name in content), metrics)
        evaluation["accuracy"] = float(evaluation["accuracy"]) + 1.5
    elif kind == "scaled":
        arrays, received = content[ARRAYS], message.content[ARRAYS]
        for key in list(arrays):
            value = arrays[key].numpy()
            if key in received and np.issubdtype(value.dtype, np.floating):
                sent = received[key].numpy().astype(np.float64)
                arrays[key] = Array.from_numpy_ndarray(np.asarray(sent + scale * (value.astype(np.float64) - sent),
                                                                  dtype=value.dtype))
    elif kind in ("nan", "wrong-shape"):
        arrays = content[ARRAYS]
        key = next(key for key in arrays if np.issubdtype(arrays[key].dtype, np.floating) and arrays[key].shape)
        value = arrays[key].numpy().copy()
        if kind == "nan":
            value.reshape(-1)[0] = np.nan
        else:
            value = value[:-1]
        arrays[key] = Array.from_numpy_ndarray(value)
    else:
        raise ValueError(f"unknown fault-kind {kind!r}")
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    evaluate_round = message.content["config"].get(EVALUATE_ROUND)
    evaluation = (ClientSession.open(message, context, evaluate_round=int(evaluate_round)).evaluation_metrics()
                  if evaluate_round is not None else None)
    session = ClientSession.open(message, context)
    stats, upload = session.train()
    metrics = {"num-examples": len(session.split.train), "train-loss": stats.loss, "train-samples": stats.samples}
    clip_norm = message.content["config"].get(CLIP_NORM_KEY)
    if clip_norm is not None:  # DP: clip the shared update before it leaves (strategies/privacy.py)
        upload, norm = clip_upload(message.content[ARRAYS], upload, float(clip_norm))
        metrics[NORM_BIT_KEY] = int(norm <= float(clip_norm))
    reply = session.reply(message, metrics, ArrayRecord(upload))
    figures = session.method.train_metrics(session)
    if figures:
        reply.content[METHOD_METRICS] = MetricRecord(figures)
    if evaluation is not None:
        reply.content[EVALUATION] = MetricRecord(evaluation)
    if AFTER_TRAINING in session.config.evaluation_points:
        reply.content[TRAINED_EVALUATION] = MetricRecord(session.evaluation_metrics(after_training=True))
    fault = message.content["config"].get(FAULT)
    if not fault:
        return reply
    return inject_fault(str(fault), message, reply, int(context.node_config["num-partitions"]),
                        session.config.fault_scale)


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Name this node's partition and the federation's size: the server maps node ids (random per
    run) to partition ids so that it can sample participants reproducibly and address per-client
    state, and waits for the ``num-partitions`` a strict majority of them reports before round 1
    (``strategies/identity.py``)."""
    node = context.node_config
    metrics = MetricRecord({"partition-id": int(node["partition-id"]), "num-partitions": int(node["num-partitions"])})
    return Message(RecordDict({METRICS: metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    session = ClientSession.open(message, context)
    reply = session.reply(message, session.evaluation_metrics())
    fault = message.content["config"].get(FAULT)
    return inject_fault(str(fault), message, reply, int(context.node_config["num-partitions"])) if fault else reply
