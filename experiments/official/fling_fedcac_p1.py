"""FedCAC as its authors ship it (Fling) on our protocol-P1 data: a side-by-side harness.

Runs ``personalized_model_pipeline`` of a Fling checkout (``--fling``) with the authors'
``flzoo/cifar10/cifar10_fedcac_resnet_config.py``, set to the fedcac run of
``experiments/grids/table1-p1.toml`` at ``--seed``: its clients, E, B, SGD lr/momentum, τ, β;
Fling's own ResNet-8 on the CPU, serial launcher. Three things of the pipeline's module are replaced:

- ``get_dataset``: our CIFAR-10 npz (``data-dir`` of that grid) as Fling's CIFAR-10 dataset, with
  Fling's own transform (ToTensor; ``--normalize`` adds Normalize(0.5, 0.5), as our npz loader does);
- ``data_sampling``: each client gets exactly the train / test indices of ``fedlora_flwr``'s
  partition, and every label and pixel it will see is checked against ``fedlora_flwr.data``;
- ``Logger``: Fling's, which also writes ``metrics.jsonl`` in ``--out``: per round (1-based) the mean
  client test accuracy before aggregation (= after local training) and after aggregation.

How to get Fling and the measured results: experiments/official/README.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

import torch
from PIL import Image
from torch.utils.data import Dataset

from fedlora_flwr.data import ImageDataset, PartitionConfig, client_tensors, load_dataset, partition_dataset
from fedlora_flwr.grid import expand, load_spec

REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "experiments" / "grids" / "table1-p1.toml"
HALF = (0.5, 0.5, 0.5)
METRICS = "metrics.jsonl"


class NpzCIFAR10(Dataset):
    """Fling's ``CIFAR10Dataset`` items (``{'input', 'class_id'}``) from uint8 N x H x W x C arrays."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> dict:
        return {"input": self.transform(Image.fromarray(self.images[item])), "class_id": int(self.labels[item])}


def p1_fedcac_run(seed: int) -> tuple[dict, int]:
    """The run config of table1-p1.toml's fedcac run at ``seed`` (absolute data-dir) and its client count."""
    spec = load_spec(GRID, cwd=REPO)
    runs = {run.seed: run.config for run in expand(spec, cwd=REPO) if run.params["method"] == "fedcac"}
    if seed not in runs:
        raise SystemExit(f"--seed {seed}: {GRID.name} runs fedcac with seeds {sorted(runs)}")
    return runs[seed], spec.experiment.num_clients


def as_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised float images back to uint8 pixels."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x * std + mean).mul(255).round().to(torch.uint8)


def check_clients(client_sets, data: ImageDataset, indices, train: bool, mean, std) -> list[int]:
    """Assert that every client's Fling dataset holds our partition's labels and pixels; its sizes."""
    split = "train" if train else "test"
    for cid, (client_set, idx) in enumerate(zip(client_sets, indices, strict=True)):
        items = [client_set[k] for k in range(len(client_set))]
        x_ours, y_ours = client_tensors(data, idx, train)
        y_fling = torch.tensor([item["class_id"] for item in items])
        assert torch.equal(y_fling, y_ours), f"client {cid} {split}: Fling's labels differ from fedlora_flwr's partition"
        x_fling = torch.stack([item["input"] for item in items])
        assert torch.equal(as_pixels(x_fling, mean, std), as_pixels(x_ours, data.mean, data.std)), (
            f"client {cid} {split}: Fling's images differ from fedlora_flwr's partition")
    return [len(client_set) for client_set in client_sets]


def fling_args(base, cfg: dict, num_clients: int, rounds: int, normalize: bool, out: Path):
    """The authors' CIFAR-10 FedCAC config, set to our P1 run."""
    if cfg["fraction-train"] != 1.0:
        raise SystemExit("the P1 run trains every client every round; Fling's sample_rate stays 1")
    args = copy.deepcopy(base)
    if normalize:  # include_default=False: Fling adds no key to CIFAR-10's default augmentation (none) otherwise
        args.data.transforms = dict(include_default=False, Normalize=dict(mean=HALF, std=HALF))
    # Recorded in Fling's total_config.py only: data_sampling is replaced by our partition.
    args.data.sample_method = dict(name=cfg["partition"], alpha=cfg["alpha"],
                                   train_num=cfg["train-per-client"], test_num=cfg["test-per-client"])
    args.learn.update(device="cpu", local_eps=cfg["local-epochs"], global_eps=rounds, batch_size=cfg["batch-size"],
                      optimizer=dict(name="sgd", lr=cfg["lr"], momentum=cfg["momentum"]),
                      tau=cfg["fedcac-tau"], beta=cfg["fedcac-beta"])
    args.client.client_num = num_clients
    args.launcher = dict(name="serial")
    args.other.logging_path = str(out)
    return args


def git_commit(path: Path) -> str:
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fling", type=Path, required=True, help="the Fling checkout (github kxzxvbk/Fling)")
    parser.add_argument("--out", type=Path, default=Path("outputs/official/fling_fedcac_p1"),
                        help="Fling's logging folder; metrics.jsonl goes here")
    parser.add_argument("--normalize", action="store_true", help="add Normalize(0.5, 0.5) after ToTensor, as ours")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()

    fling_root = opts.fling.resolve()
    sys.path.insert(0, str(fling_root))  # flzoo has no __init__.py: it is found from the checkout only
    from fling.utils import get_data_transform
    from fling.utils.data_utils.sampling import NaiveDataset
    from flzoo.cifar10.cifar10_fedcac_resnet_config import exp_args
    pipeline = importlib.import_module("fling.pipeline.personalized_model_pipeline")

    cfg, num_clients = p1_fedcac_run(opts.seed)
    data = load_dataset(cfg["dataset"], cfg["data-dir"])
    splits = partition_dataset(cfg["dataset"], cfg["data-dir"], PartitionConfig(
        num_clients=num_clients, scheme=cfg["partition"], alpha=cfg["alpha"],
        classes_per_client=cfg["classes-per-client"], train_per_client=cfg["train-per-client"],
        test_per_client=cfg["test-per-client"], seed=cfg["seed"]))
    mean, std = (HALF, HALF) if opts.normalize else ((0.0,) * 3, (1.0,) * 3)
    out = opts.out.resolve()
    metrics = out / METRICS

    def get_dataset(args, train: bool) -> NpzCIFAR10:
        x, y = (data.x_train, data.y_train) if train else (data.x_test, data.y_test)
        return NpzCIFAR10(x, y, get_data_transform(args.data.transforms, train=train))

    def data_sampling(dataset, args, seed, train: bool = True) -> list:
        indices = [split.train if train else split.test for split in splits]
        client_sets = [NaiveDataset(tot_data=dataset, indexes=idx) for idx in indices]
        sizes = check_clients(client_sets, data, indices, train, mean, std)
        print(f"data check ({'train' if train else 'test'}): all {len(sizes)} clients hold fedlora_flwr's "
              f"labels and pixels; sizes {min(sizes)}-{max(sizes)}", flush=True)
        return client_sets

    class MetricsLogger(pipeline.Logger):
        """Fling's Logger; each round's mean client test accuracies also go to metrics.jsonl."""

        def __init__(self, path: str):
            super().__init__(path)
            metrics.write_text("")
            self.row: dict = {}

        def add_scalars_dict(self, prefix: str, dic: dict, rnd: int) -> None:
            super().add_scalars_dict(prefix, dic, rnd)
            if prefix == "before_aggregation_test":
                self.row = {"round": rnd + 1, "before_aggregation": dic["test_acc"]}
            elif prefix == "after_aggregation_test":
                self.row["after_aggregation"] = dic["test_acc"]
                with metrics.open("a") as handle:
                    handle.write(json.dumps(self.row) + "\n")

    pipeline.get_dataset, pipeline.data_sampling, pipeline.Logger = get_dataset, data_sampling, MetricsLogger
    args = fling_args(exp_args, cfg, num_clients, opts.rounds, opts.normalize, out)
    print(f"Fling {git_commit(fling_root)} at {fling_root}; torch {torch.__version__}; "
          f"P1 fedcac seed {opts.seed}: {num_clients} clients, {opts.rounds} rounds, transform "
          f"{'ToTensor + Normalize(0.5, 0.5)' if opts.normalize else 'ToTensor'}", flush=True)
    start = time.perf_counter()
    pipeline.personalized_model_pipeline(args, seed=opts.seed)
    seconds = time.perf_counter() - start

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    before = [100 * row["before_aggregation"] for row in rows]
    after = [100 * row["after_aggregation"] for row in rows]
    print(f"\n{'round':>10}  {'before_agg':>10}  {'after_agg':>9}")
    for row, b, a in zip(rows, before, after):
        print(f"{row['round']:>10}  {b:10.2f}  {a:9.2f}")
    print(f"{'best':>10}  {max(before):10.2f}  {max(after):9.2f}")
    last = f"mean {rows[-5:][0]['round']}-{rows[-1]['round']}"
    print(f"{last:>10}  {fmean(before[-5:]):10.2f}  {fmean(after[-5:]):9.2f}")
    print(f"{seconds:.0f} s; {metrics}")


if __name__ == "__main__":
    main()
