"""Benchmarks: framework overhead, throughput, memory and communication (``fedlora-flwr bench``).

Each benchmark runs real ``flwr run`` simulations through a private SuperLink
(:class:`fedlora_flwr.superlink.LocalSuperLink`), prints a table and writes a JSON file that a
script can compare between versions. Figures depend on the machine: every JSON records the CPU
count, torch/flwr versions and the exact settings.

- ``overhead``: a FedLoRA ``flwr run`` (with separate evaluate messages, and with
  ``fused-evaluation``) against the same federation (same clients, data, schedule, seeds,
  personal-state store) run as a plain loop in a fresh PyTorch process, side by side: wall time
  from launch to exit, time in rounds, and the median steady round (round 1 carries Ray's and
  the workers' start-up). ``shared_max_abs_diff`` compares the two runs' final shared tensors:
  the plain process uses all cores in one process and the Ray workers one thread each, and
  oneDNN's convolutions sum in another order with another thread count (bitwise equality at the
  same thread count is tests/test_bench.py's). For ``--model`` on ``--device`` (cuda:
  ``--workers`` client actors share the GPU, each ``client-resources-num-gpus`` = 1 / workers,
  against the plain loop on the same GPU).
- ``throughput``: training samples per second per round, for 1, 2, … parallel client workers
  (Ray actors; ``client-resources-num-cpus`` = CPUs / workers); with ``--device cuda`` for
  ``--actors-per-gpu`` k = 1, 2, 4, 8, 16 actors on one GPU (``client-resources-num-gpus`` = 1/k),
  with the GPU memory per actor: the peak rise of the memory in use on the device during the run
  (``torch.cuda.mem_get_info``, sampled every 0.5 s: the actors' CUDA contexts, allocator caches
  and tensors together) divided by the actors running at once.
- ``memory``: peak memory of the whole simulation process tree for 40, 1,000 and 10,000 clients,
  3 rounds, each training and evaluating 100 sampled clients (``fraction-train`` =
  ``fraction-evaluate`` = 100 / clients); personal state lives on disk, so it should stay nearly
  flat. With the wall time and the seconds of each round (round 1 asks every node its partition id).
- ``comm``: bytes up and down per round for each method and model.
- ``cost``: pFedLoRA's computation and communication figures: training FLOPs per round per client
  (counted by ``torch.utils.flop_counter.FlopCounterMode`` around one real round of local training:
  matmuls and convolutions, forward and backward, 2 FLOPs per multiply-add; element-wise ops and
  the optimizer step are not counted) and bytes up per round per client (the reply's ArrayRecord),
  for every architecture of ``cnn-hetero`` under pfedlora and its controls, against FedAvg on the
  family's largest member (CNN-1); ``local`` and ``fedavg`` train E_1 + E_2 epochs.

- ``step``: seconds per local step of PF2LoRA's bilevel step, its simultaneous ablation and a
  plain LoRA step (lora-ft) on the same model and batch (PF2LoRA's extra cost, issue 10).
- ``paper``: the FedLoRA paper's CIFAR-10 protocol (``experiments/fedlora-cifar10-paper.toml``:
  ResNet-8, 40 clients × 500 training samples, E = 5, B = 100; real CIFAR-10 npz) for ``--rounds``
  rounds: seconds per steady round (the median after round 1) and the 300-round time it implies.

``--device cuda`` needs one visible GPU (``CUDA_VISIBLE_DEVICES`` picks it on a bigger machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from fedlora_flwr.client_app import ClientSession
from fedlora_flwr.config import RunConfig, load_config
from fedlora_flwr.data import PartitionConfig, load_dataset, partition_dataset
from fedlora_flwr.grid import app_defaults, default_app_dir
from fedlora_flwr.methods import get_method, registry
from fedlora_flwr.models import MODEL_FAMILIES
from fedlora_flwr.runs import load_runs
from fedlora_flwr.store import write_atomic
from fedlora_flwr.superlink import LocalSuperLink
from fedlora_flwr.text_models import is_text_model
from strategies.base import average_arrays

APP_DIR = default_app_dir()
DEFAULT_NPZ = APP_DIR.parent / "shared" / "data" / "cifar10" / "cifar10.npz"
DEFAULT_AGNEWS = APP_DIR.parent / "shared" / "data" / "agnews"
PAPER_PROTOCOL = APP_DIR / "experiments" / "fedlora-cifar10-paper.toml"
PAPER_CLIENTS = 40  # FedLoRA §4.1: N = 40, a federation setting (num-supernodes), not a run-config key
PAPER_ROUNDS = 300  # T
RAY_RESOURCE_UNITS = 10_000  # Ray keeps a fractional resource to 4 decimal places


def _environment() -> dict[str, Any]:
    import flwr

    return {
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _gpu_used() -> int:
    """Bytes in use on the current GPU, by every process."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def _simulate(
    link: LocalSuperLink, overrides: dict[str, Any], num_clients: int, client_cpus: int, client_gpus: float = 0.0,
    sample_memory: bool = False, sample_gpu: bool = False,
) -> dict[str, Any]:
    """One ``flwr run``; returns wall time, per-round metrics (:func:`~fedlora_flwr.runs.load_runs`'s
    frame) and (optionally) the peak memory of the process tree, or the peak rise of the GPU memory
    in use."""
    out = Path(overrides["output-dir"]) / overrides["run-name"]
    peak = {"rss": 0, "pss": 0, "gpu": 0}
    baseline = _gpu_used() if sample_gpu else 0
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if sample_gpu:
                peak["gpu"] = max(peak["gpu"], _gpu_used() - baseline)
            if sample_memory:
                link.record_tree()
                rss = pss = 0
                for proc in list(link.tree.values()):
                    try:
                        info = proc.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory or sample_gpu:
        sampler.start()
    started = time.monotonic()
    code, log = link.run(APP_DIR, overrides, num_supernodes=num_clients, client_cpus=client_cpus, client_gpus=client_gpus)
    wall = time.monotonic() - started
    done.set()
    if sample_memory or sample_gpu:
        sampler.join()
    metrics = load_runs(out) if (out / "config.json").is_file() else None
    if code != 0 or metrics is None or metrics.status.iloc[0] != "finished":
        raise RuntimeError(f"benchmark run {out.name} failed (exit {code}):\n{log[-3000:]}")
    # Round t lasts from round t-1's aggregation to its own (its train messages and the evaluation
    # before them, fused or not); the last evaluation is in the total, elapsed_s of the last row.
    round_seconds = metrics["train_elapsed_s"].diff().fillna(metrics["train_elapsed_s"])
    result = {"wall_s": round(wall, 2), "round_s": [round(float(s), 2) for s in round_seconds],
              "rounds_s": float(metrics["elapsed_s"].iloc[-1]), "metrics": metrics}
    if sample_memory:
        result["peak_rss_mib"] = round(peak["rss"] / 2**20, 1)
        result["peak_pss_mib"] = round(peak["pss"] / 2**20, 1)
    if sample_gpu:
        result["gpu_peak_mib"] = round(peak["gpu"] / 2**20, 1)
    return result


def client_resources(device: str, workers: int, cpus: int | None = None) -> tuple[int, float]:
    """(``client-resources-num-cpus``, ``client-resources-num-gpus``) for ``workers`` client actors
    at once: the CPUs split evenly (at least one each) and, on ``cuda``, 1/workers of the GPU each,
    rounded down to Ray's resource unit so that ``workers`` actors fit on it."""
    cpus = cpus or os.cpu_count() or 1
    client_gpus = (RAY_RESOURCE_UNITS // workers) / RAY_RESOURCE_UNITS if device == "cuda" else 0.0
    return max(cpus // workers, 1), client_gpus


def train_samples_per_round(config: RunConfig, num_clients: int) -> int:
    """Training samples one round processes: every client's split (the Dirichlet protocol may leave
    a client a few short of ``train-per-client``) times its epochs (FedLoRA: E, E_lora included)."""
    splits = partition_dataset(config.dataset, config.data_dir, PartitionConfig(
        num_clients=num_clients, scheme=config.partition, alpha=config.alpha,
        classes_per_client=config.classes_per_client, train_per_client=config.train_per_client,
        test_per_client=config.test_per_client, seed=config.seed))
    return sum(len(split.train) for split in splits) * config.local_epochs


def plain_federation(config: RunConfig, num_clients: int, store_root: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same federation without Flower: one process, clients one after another.

    Same sessions as the ClientApp (seeded model, data split, schedule, on-disk personal store),
    the strategy's own averaging, and every client evaluated each round. Returns the seconds of
    each round (the first includes loading the data) and the final shared tensors (equal to the
    Flower run's ``shared.safetensors``).
    """
    started = time.monotonic()
    round_seconds = []
    method = get_method(config.method)
    task = load_dataset(config.dataset, config.data_dir).spec
    torch.manual_seed(config.seed)
    client = method.client(config)
    shared = client.initial_download(client.build_model(task, partition_id=0))
    weighted = (config.aggregation if config.aggregation != "auto" else method.strategy.default_aggregation) == "weighted"
    for server_round in range(1, config.num_server_rounds + 1):
        uploads, weights = [], []
        for pid in range(num_clients):
            session = ClientSession.create(config, pid, num_clients, store_root, server_round)
            session.load(shared, training=True)
            _, update = session.train()
            uploads.append(update)
            weights.append(float(len(session.split.train)) if weighted else 1.0)
        shared = average_arrays([ArrayRecord(update) for update in uploads], weights).to_torch_state_dict()
        for pid in range(num_clients):
            session = ClientSession.create(config, pid, num_clients, store_root, server_round)
            session.load(shared, training=False)
            session.evaluate()
        round_seconds.append(time.monotonic() - started - sum(round_seconds))
    return round_seconds, shared


def plain_process(config: RunConfig, num_clients: int, work: Path) -> dict[str, Any]:
    """:func:`plain_federation` in a fresh Python process, as a user's own PyTorch script would run
    (imports and data loading included in its wall time); its final shared tensors are read back."""
    config_file = work / "plain-config.json"
    config_file.write_text(json.dumps(config.as_record()))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedlora_flwr.bench", "plain", str(config_file), str(num_clients), str(work)],
                   check=True)
    wall = time.monotonic() - started
    result = json.loads((work / "plain.json").read_text())
    return {"wall_s": wall, "round_s": result["round_s"], "threads": result["threads"],
            "shared": load_file(work / "plain-shared.safetensors")}


def _plain_main(config_file: str, num_clients: str, work: str) -> None:
    """Entry point of :func:`plain_process`'s child."""
    config = load_config(json.loads(Path(config_file).read_text()))
    round_seconds, shared = plain_federation(config, int(num_clients), Path(work) / "plain-clients")
    save_file({key: value.contiguous() for key, value in shared.items()}, str(Path(work) / "plain-shared.safetensors"))
    (Path(work) / "plain.json").write_text(json.dumps({"round_s": round_seconds, "threads": torch.get_num_threads()}))


def _base(args: argparse.Namespace, work: Path, **overrides: Any) -> dict[str, Any]:
    data = {"dataset": "npz", "data-dir": str(args.data_dir)} if args.dataset == "npz" else {"dataset": "synthetic"}
    return {**data, "model": "cnn", "output-dir": str(work), **overrides}


def _on_device(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys of ``--device`` and ``--precision``."""
    return {"device": args.device, "precision": args.precision}


def _steady(round_s: list[float]) -> float:
    """Seconds of a steady round: the median after round 1 (which starts the actors), or round 1 alone."""
    return statistics.median(round_s[1:] or round_s)


def bench_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    overrides = _base(args, work, **{"method": "fedlora", "model": args.model, "num-server-rounds": args.rounds,
                                      "train-per-client": args.train_per_client, **_on_device(args)})
    client_cpus, client_gpus = client_resources(args.device, args.workers)
    plain_config = load_config({**app_defaults(APP_DIR), **overrides, "run-name": "overhead-plain"})
    plain = plain_process(plain_config, args.clients, work)
    plain_rounds = sum(plain["round_s"])
    rows = []
    for evaluation in ("separate", "fused"):
        name = f"overhead-{evaluation}"
        with LocalSuperLink() as link:
            simulated = _simulate(link, {**overrides, "run-name": name, "fused-evaluation": evaluation == "fused"},
                                  args.clients, client_cpus=client_cpus, client_gpus=client_gpus)
        flower_shared = load_file(work / name / "shared.safetensors")
        difference = max((value.double() - plain["shared"][key].double()).abs().max().item()
                         for key, value in flower_shared.items())
        flwr_rounds = simulated["rounds_s"]
        steady_flwr, steady_plain = _steady(simulated["round_s"]), _steady(plain["round_s"])
        rows.append({
            "model": args.model, "device": args.device, "clients": args.clients, "rounds": args.rounds,
            "evaluation": evaluation, "client_cpus": client_cpus, "client_gpus": client_gpus,
            "flwr_wall_s": simulated["wall_s"], "flwr_rounds_s": round(flwr_rounds, 2),
            "flwr_round_1_s": simulated["round_s"][0], "flwr_steady_round_s": round(steady_flwr, 2),
            "plain_wall_s": round(plain["wall_s"], 2), "plain_rounds_s": round(plain_rounds, 2),
            "plain_steady_round_s": round(steady_plain, 2), "plain_threads": plain["threads"],
            "ratio_wall": round(simulated["wall_s"] / plain["wall_s"], 2),
            "ratio_rounds": round(flwr_rounds / plain_rounds, 2),
            "ratio_steady_round": round(steady_flwr / steady_plain, 2),
            "shared_max_abs_diff": float(f"{difference:.3g}"),
        })
    return {"rows": rows, "settings": overrides}


def bench_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """CPU: every divisor of the CPU count as parallel workers. CUDA: ``--actors-per-gpu`` actors
    sharing the GPU, with the GPU memory per actor."""
    cpus = os.cpu_count() or 1
    cuda = args.device == "cuda"
    counts = args.actors_per_gpu if cuda else [workers for workers in range(1, cpus + 1) if cpus % workers == 0]
    rows = []
    for workers in counts:
        client_cpus, client_gpus = client_resources(args.device, workers, cpus)
        overrides = _base(args, work, **{"method": "fedlora", "model": args.model, "num-server-rounds": args.rounds,
                                          "train-per-client": args.train_per_client,
                                          "run-name": f"throughput-w{workers}-c{client_cpus}-g{client_gpus}",
                                          **_on_device(args)})
        with LocalSuperLink() as link:
            result = _simulate(link, overrides, args.clients, client_cpus=client_cpus, client_gpus=client_gpus,
                               sample_gpu=cuda)
        samples = train_samples_per_round(load_config({**app_defaults(APP_DIR), **overrides}), args.clients)
        row = {
            ("actors_per_gpu" if cuda else "workers"): workers, "client_cpus": client_cpus, "client_gpus": client_gpus,
            "median_round_s": round(_steady(result["round_s"]), 2),
            "train_samples_per_s": round(samples / _steady(result["round_s"]), 1),
            "first_round_s": result["round_s"][0],
        }
        if cuda:
            at_once = min(workers, cpus // client_cpus, args.clients)
            row.update(actors_at_once=at_once, gpu_mem_peak_mib=result["gpu_peak_mib"],
                       gpu_mem_per_actor_mib=round(result["gpu_peak_mib"] / at_once, 1))
        rows.append(row)
    settings = {key: value for key, value in overrides.items() if key != "run-name"}
    return {"rows": rows, "settings": {"clients": args.clients, **settings}}


def paper_protocol(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], int]:
    """The FedLoRA paper's CIFAR-10 run (§4.1 and FedDecomp's defaults: ``PAPER_PROTOCOL``) on the real
    CIFAR-10 npz for ``--rounds`` rounds, on ``--device``; and its number of clients."""
    with PAPER_PROTOCOL.open("rb") as handle:
        protocol = tomllib.load(handle)
    return {**protocol, "dataset": "npz", "data-dir": str(args.data_dir), "num-server-rounds": args.rounds,
            "output-dir": str(work), "run-name": "paper", **_on_device(args)}, PAPER_CLIENTS


def extrapolate(wall_s: float, round_s: list[float], total_rounds: int = PAPER_ROUNDS) -> float:
    """Seconds a ``total_rounds`` run would take: this run's wall time plus a steady round for every
    round it did not run (evaluation is part of every round)."""
    return wall_s + (total_rounds - len(round_s)) * _steady(round_s)


def bench_paper(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    overrides, clients = paper_protocol(args, work)
    client_cpus, client_gpus = client_resources(args.device, args.workers)
    with LocalSuperLink() as link:
        result = _simulate(link, overrides, clients, client_cpus=client_cpus, client_gpus=client_gpus)
    total = extrapolate(result["wall_s"], result["round_s"])
    rows = [{
        "device": args.device, "precision": args.precision, "clients": clients, "rounds": len(result["round_s"]),
        "client_cpus": client_cpus, "client_gpus": client_gpus, "wall_s": result["wall_s"],
        "first_round_s": result["round_s"][0], "steady_s_per_round": round(_steady(result["round_s"]), 2),
        f"extrapolated_{PAPER_ROUNDS}_rounds_h": round(total / 3600, 2),
        "acc_mean_last": round(float(result["metrics"]["acc_mean"].iloc[-1]), 4),
    }]
    return {"rows": rows, "settings": {**overrides, "num_clients": clients, "protocol": str(PAPER_PROTOCOL)}}


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Synthetic data whatever ``--dataset`` says: 10,000 clients need more samples than the subset.
    Each size trains and evaluates the same ``--memory-sampled`` clients per round (``fraction-train``
    = ``fraction-evaluate`` = sampled / clients, at most 1), so that only the number of clients grows."""
    args = argparse.Namespace(**{**vars(args), "dataset": "synthetic"})
    rows = []
    for clients in args.client_counts:
        fraction = min(1.0, args.memory_sampled / clients)
        overrides = _base(args, work, **{
            "method": "fedlora", "num-server-rounds": args.memory_rounds, "local-epochs": 1, "lora-epochs": 1,
            "train-per-client": 20, "test-per-client": 10, "batch-size": 20, "run-name": f"memory-{clients}",
            "fraction-train": fraction, "fraction-evaluate": fraction,
            # round 1 asks all 10,000 nodes their partition id, which takes Flower's simulation
            # engine minutes (docs/guide/scale.md): wait for every answer
            "node-wait-timeout": args.memory_node_wait,
        })
        with LocalSuperLink() as link:
            result = _simulate(link, overrides, clients, client_cpus=1, sample_memory=True)
        last = result["metrics"].iloc[-1]
        evaluated = last["num_evaluated"] if "num_evaluated" in last.index else last["num_nodes"]
        rows.append({"clients": clients, "fraction": round(fraction, 6),
                     "trained_per_round": int(last["num_participants"]), "evaluated_per_round": int(evaluated),
                     "peak_rss_mib": result["peak_rss_mib"], "peak_pss_mib": result["peak_pss_mib"],
                     "wall_s": result["wall_s"], "round_s": result["round_s"]})
    return {"rows": rows, "settings": {"sampling": "sum over the SuperLink's process tree every 0.5 s",
                                       "rounds": args.memory_rounds, "sampled_per_round": args.memory_sampled,
                                       "personal_state": "on disk (clients/<partition id>/)"}}


def bench_comm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Bytes depend on the model and the method only; synthetic data keeps the runs short."""
    args = argparse.Namespace(**{**vars(args), "dataset": "synthetic"})
    rows = []
    with LocalSuperLink() as link:
        for model in ("cnn", "resnet8"):
            for method in sorted(registry()):
                overrides = _base(args, work, **{
                    "method": method, "model": model, "num-server-rounds": 1, "local-epochs": 1, "lora-epochs": 1,
                    "train-per-client": 20, "test-per-client": 10, "run-name": f"comm-{method}-{model}",
                })
                first = _simulate(link, overrides, args.clients, client_cpus=1)["metrics"].iloc[0]
                rows.append({
                    "method": method, "model": model, "clients": args.clients,
                    "bytes_up_per_round": int(first["bytes_up"]), "bytes_down_per_round": int(first["bytes_down"]),
                    "bytes_up_per_client": int(first["bytes_up"]) // max(int(first["num_participants"]), 1),
                })
    return {"rows": rows, "settings": {"note": "bytes_down counts the train and the evaluate broadcasts"}}


def training_cost(config: RunConfig, partition_id: int, num_clients: int, store_root: Path) -> tuple[int, int]:
    """(FLOPs, bytes up) of one round of client ``partition_id``'s local training, measured on the
    real session: FlopCounterMode around ``train()``, the upload's ArrayRecord bytes."""
    task = load_dataset(config.dataset, config.data_dir).spec
    torch.manual_seed(config.seed)
    client = get_method(config.method).client(config)
    shared = client.initial_download(client.build_model(task, partition_id=0))
    session = ClientSession.create(config, partition_id, num_clients, store_root, server_round=1)
    session.load(shared, training=True)
    with FlopCounterMode(display=False) as counter:
        _, upload = session.train()
    return int(counter.get_total_flops()), ArrayRecord(upload).count_bytes()


def bench_cost(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """pFedLoRA (arXiv 2310.13283) on cnn-hetero, one client per architecture, against FedAvg on CNN-1."""
    base = _base(args, work, **{"train-per-client": args.train_per_client, "run-name": "cost"})
    probe = load_config({**app_defaults(APP_DIR), **base})
    epochs = probe.pfedlora_local_epochs + probe.pfedlora_adapter_epochs
    setups = [(method, {"method": method, "model-family": "cnn-hetero", "local-epochs": epochs})
              for method in ("pfedlora", "fedavg-adapter", "local")]
    setups.append(("fedavg", {"method": "fedavg", "model": "cnn-1", "local-epochs": epochs}))
    rows = []
    for method, overrides in setups:
        config = load_config({**app_defaults(APP_DIR), **base, **overrides})
        client = get_method(method).client(config)
        members = len(MODEL_FAMILIES[config.model_family]) if config.model_family else 1
        for pid in range(members):
            flops, bytes_up = training_cost(config, pid, members, work / f"cost-{method}")
            rows.append({"method": method, "architecture": client.architecture(pid),
                         "train_flops_per_round": flops, "bytes_up_per_round": bytes_up})
    reference = next(row for row in rows if row["method"] == "fedavg")
    for row in rows:
        row["flops_ratio_fedavg_cnn1"] = round(reference["train_flops_per_round"] / row["train_flops_per_round"], 2)
        row["bytes_ratio_fedavg_cnn1"] = (round(reference["bytes_up_per_round"] / row["bytes_up_per_round"], 2)
                                          if row["bytes_up_per_round"] else None)
    return {"rows": rows, "settings": {**base, "epochs_per_round": epochs,
                                       "flops": "FlopCounterMode: matmul/conv forward+backward, 2 per multiply-add"}}


STEP_METHODS = ("lora-ft", "pf2lora-simultaneous", "pf2lora")
TEXT_STEP_METHODS = ("lora-ft", "fedsa-lora", "pf2lora-simultaneous", "pf2lora")


def bench_step(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seconds per local step on one client, same model, data and batch size: a plain LoRA step
    (lora-ft's: one forward/backward, SGD), PF2LoRA's simultaneous ablation (the same work over
    both adapters) and PF2LoRA's bilevel step (two forwards, two backwards, one double backward);
    on a text model (``minilm``, on AG_NEWS at ``--max-seq-length``) also FedSA-LoRA's step.
    In-process ``ClientSession.run_schedule``; one untimed warm-up schedule first."""
    rows = []
    for model in args.step_models:
        text = is_text_model(model)
        methods = TEXT_STEP_METHODS if text else STEP_METHODS
        data = {"dataset": "agnews", "data-dir": str(args.text_data_dir), "max-seq-length": args.max_seq_length} if text else {}
        for method in methods:
            config = load_config({**app_defaults(), **_base(args, work, **{
                "method": method, "model": model, "local-steps": args.steps, "train-per-client": args.train_per_client,
                "batch-size": args.batch_size, **data, **_on_device(args)})})
            session = ClientSession.create(config, 0, args.clients, work / method, server_round=1)
            schedule = session.method.schedule()
            session.run_schedule(schedule)  # warm-up
            started = time.perf_counter()
            stats = session.run_schedule(schedule)
            seconds = time.perf_counter() - started
            rows.append({"model": model, "method": method, "steps": stats.steps, "batch_size": args.batch_size,
                         "s_per_step": round(seconds / stats.steps, 4)})
        plain = rows[-len(methods)]["s_per_step"]
        for row in rows[-len(methods):]:
            row["vs_lora_step"] = round(row["s_per_step"] / plain, 2)
    return {"rows": rows, "settings": {"threads": torch.get_num_threads(), "device": str(session.device),
                                       **_base(args, work)}}


BENCHMARKS = {"overhead": bench_overhead, "throughput": bench_throughput, "memory": bench_memory, "comm": bench_comm,
              "cost": bench_cost, "step": bench_step, "paper": bench_paper}


def _print_table(name: str, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    print(f"\n## {name}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")


def run_benchmarks(args: argparse.Namespace) -> int:
    if args.device == "cuda" and torch.cuda.device_count() != 1:
        print(f"bench: --device cuda needs one visible CUDA GPU, torch sees {torch.cuda.device_count()} "
              "(set CUDA_VISIBLE_DEVICES to one GPU, or use --device cpu)")
        return 2
    if args.which == "paper" and args.dataset != "npz":
        print("bench: paper runs the paper's protocol on the real CIFAR-10 npz (--dataset npz, --data-dir)")
        return 2
    if args.dataset == "npz" and not args.data_dir.is_file():
        print(f"bench: --data-dir {args.data_dir}: no npz file there (use --dataset synthetic to run without it)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(BENCHMARKS) if args.which == "all" else [args.which]
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
            result = BENCHMARKS[name](args, Path(work))
        result = {"benchmark": name, "environment": _environment(), **result}
        _print_table(name, result["rows"])
        path = args.out / f"{name}.json"
        write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
        print(f"\nwritten: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="framework overhead, throughput, memory, communication, pFedLoRA cost, "
                                   "PF2LoRA step and paper-protocol time benchmarks")
    parser.add_argument("which", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for <benchmark>.json")
    parser.add_argument("--dataset", choices=["npz", "synthetic"], default="npz",
                        help="data for overhead/throughput (memory and comm always use synthetic)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_NPZ, help="the npz file (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=40, help="clients for overhead/throughput/comm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-per-client", type=int, default=100)
    parser.add_argument("--client-counts", type=int, nargs="+", default=[40, 1000, 10_000], help="memory benchmark sizes")
    parser.add_argument("--memory-rounds", type=int, default=3, help="rounds of each memory benchmark run")
    parser.add_argument("--memory-node-wait", type=float, default=7200.0,
                        help="node-wait-timeout of the memory benchmark: round 1 waits this long for every node's "
                        "partition id (default: %(default)s s)")
    parser.add_argument("--memory-sampled", type=int, default=100,
                        help="clients trained and evaluated per round in the memory benchmark (fraction-train = "
                        "fraction-evaluate = this / clients, at most 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed local steps per method (step benchmark)")
    parser.add_argument("--batch-size", type=int, default=100, help="mini-batch size (step benchmark)")
    parser.add_argument("--step-models", nargs="+", default=["cnn"], help="models for the step benchmark (minilm: on AG_NEWS)")
    parser.add_argument("--text-data-dir", type=Path, default=DEFAULT_AGNEWS, help="AG_NEWS for text models (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=32, help="tokens per sample for text models (step benchmark)")
    parser.add_argument("--model", choices=["cnn", "resnet8"], default="cnn", help="model for overhead/throughput")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where clients train (overhead, throughput, paper, step); cuda: client actors share one GPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="run-config precision for overhead, throughput, paper and step (bf16: image models' forward passes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="client actors at once for overhead and paper: CPUs / workers each, and on cuda "
                        "1 / workers of the GPU each (default: the CPU count, %(default)s)")
    parser.add_argument("--actors-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="throughput on cuda: actors sharing the GPU (client-resources-num-gpus = 1/k)")
    parser.set_defaults(func=run_benchmarks)


if __name__ == "__main__":
    if sys.argv[1:2] != ["plain"] or len(sys.argv) != 5:
        sys.exit("usage: python -m fedlora_flwr.bench plain CONFIG_JSON NUM_CLIENTS WORK_DIR (bench overhead's child)")
    _plain_main(*sys.argv[2:])
