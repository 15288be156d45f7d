"""Reports: finished run folders -> the paper's table (Markdown, CSV, LaTeX) and PNG plots.

``fedlora-flwr report ROOT [--spec SPEC.toml] [--out DIR]`` reads the runs under ROOT with
:func:`fedlora_flwr.runs.load_runs` (unfinished and failed runs are skipped, saying why) and
writes to ``--out`` (default ``ROOT/report``):

- ``table.md`` / ``table.csv`` / ``table.tex``: one row per configuration, mean ± std over its
  seeds (population std, ``ddof=0``) of two selections of the mean client test accuracy (%):
  ``best``, the best round's (``best_acc_mean``: the papers' metric, which selects the round on
  the test set), ``final``, the last round's (``final_acc_mean``: no selection) and, when runs
  held out a validation split (``validation-fraction``), ``by-val``, the round of the best mean
  validation accuracy (``acc_mean_at_best_val``: selected without the test set). Beside them the
  paper's number and ``diff = best − paper``. ``--eval-point`` picks the evaluation point
  (default: each run's primary one, its ``eval_point``); the footer names it. ``table.md`` adds the accuracy per client group
  (``acc_per_group``, per architecture of a ``model-family`` run) when runs recorded it.
- ``curves.png`` (mean client accuracy per round; line: mean over seeds, band: ± std),
  ``per_client.png`` (the paper's Fig. 7), ``partition.png`` (Fig. 5, recomputed from the
  config), ``distance.png`` (Fig. 6: distance of the clients' σ_i to σ̄), ``bytes.png``, and
  ``privacy.png`` (ε spent after each round, ``dp_epsilon``) when a run used DP.

Rows: runs whose config agrees on every key but :data:`IGNORED_KEYS` (seed and the keys that do
not change results, ``fedlora_flwr.config.OPERATIONAL_KEYS``), plus ``num_clients`` from the
summary (the simulation size is not a run-config key). A row is labelled by method, dataset and
alpha, and by every other key that differs between rows. Paper numbers: the spec's ``[[paper]]``
entries, else the built-in Table 1, matched by :mod:`fedlora_flwr.paper` (the grid's rule too).

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no display.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import textwrap
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedlora_flwr.config import OPERATIONAL_KEYS
from fedlora_flwr.paper import PAPER_SOURCE, entry_problem, paper_dataset, paper_entry
from fedlora_flwr.runs import RunsError, load_client_accuracies, load_runs
from fedlora_flwr.store import write_atomic

__all__ = ["IGNORED_KEYS", "Report", "ReportError", "load_paper_spec", "main", "make_report", "register", "run_table"]

#: Config keys that do not define an experiment: runs that differ only here are seeds of one row.
IGNORED_KEYS = frozenset({"seed", *OPERATIONAL_KEYS})
#: Always part of a row's label, in this order.
LABEL_KEYS = ("method", "dataset", "alpha")
#: The paper's column order of methods; others follow alphabetically.
METHOD_ORDER = ("fedavg", "fedavg-lora", "local", "local-lora", "fedlora")
#: The two selections of a run's accuracy: summary field, and what it selects on.
SELECTIONS = {
    "best": ("best_acc_mean", "the best round's mean client test accuracy: selected on the test set, the papers' metric"),
    "final": ("final_acc_mean", "the last round's mean client test accuracy: no selection"),
    "by-val": ("acc_mean_at_best_val", ("the mean client test accuracy in the round of the best mean validation "
               "accuracy (a held-out part of each client's training split, validation-fraction): selected without "
               "the test set")),
}
#: ``--eval-point`` choices: each run's primary point (``eval_point``), or one of the two points.
EVAL_POINTS = ("primary", "after-aggregation", "after-training")
MAX_PANELS = 6
MARKERS = "os^Dv<>ph*"


class ReportError(ValueError):
    """The report cannot be made (missing folder, no finished runs, bad spec): one line."""


def load_paper_spec(path: str | Path) -> list[dict[str, Any]]:
    """The ``[[paper]]`` entries of an experiment spec (TOML), each with its ``source``."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            entries = tomllib.load(handle).get("paper", [])
    except OSError as exc:
        raise ReportError(f"--spec: cannot read {path} ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"--spec: {path} is not valid TOML ({exc})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ReportError(f"--spec: {path}: 'paper' must be an array of tables ([[paper]])")
    for number, entry in enumerate(entries, 1):
        if entry_problem(entry):
            raise ReportError(f"--spec: {path}: [[paper]] entry {number}: {entry_problem(entry)}")
        entry["source"] = f"spec {path.name}"
    return entries


# --------------------------------------------------------------------------- the table


def _sort_value(value: Any) -> tuple:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (0, 0.0, "")
    if isinstance(value, (bool, int, float, np.number)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_table(runs: pd.DataFrame, spec_entries: Sequence[dict[str, Any]] = ()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Group finished runs (one row each, :func:`load_runs` columns and ``attrs``) into the report's rows.

    Returns
    -------
    (table, keys, label_keys)
        ``table``: one row per configuration (sorted: dataset, alpha, the other label keys, method
        in the paper's order) with the config ``keys``, ``n``, ``seeds``, ``runs`` (names),
        ``run_dirs`` (folders), ``best_mean``,
        ``best_std``, ``best_values``, ``final_mean``, ``final_std``, ``by_val_mean``, ``by_val_std``
        (%; NaN without a validation split), ``paper``, ``paper_std``,
        ``paper_source`` and ``diff`` (best − paper); ``label_keys``: method, dataset, alpha and
        the keys that differ between rows.
    """
    runs = runs.copy()
    if "model-family" in runs and runs["model-family"].fillna("").astype(str).ne("").any():
        family = runs["model-family"].fillna("").astype(str).ne("")
        runs.loc[family, "model"] = runs.loc[family, "model-family"]
    runs["paper_dataset"] = [paper_dataset(config) for config in runs.to_dict("records")]
    for name, (column, _) in SELECTIONS.items():
        runs[name] = pd.to_numeric(runs[column], errors="coerce") * 100 if column in runs else np.nan
    keys = [k for k in runs.attrs["config_columns"] if k not in IGNORED_KEYS] + ["num_clients", "paper_dataset"]
    runs = runs.sort_values(["seed", "run_dir"], key=lambda col: col.map(_sort_value))
    runs["data_dir"] = runs.get("data-dir", "")
    table = runs.groupby(keys, dropna=False, sort=False).agg(  # std: ddof=0, the paper does not say which
        n=("best", "count"), seeds=("seed", list), runs=("run", list), run_dirs=("run_dir", list),
        best_mean=("best", "mean"), best_std=("best", lambda s: s.std(ddof=0)), best_values=("best", list),
        final_mean=("final", "mean"), final_std=("final", lambda s: s.std(ddof=0)),
        by_val_mean=("by-val", "mean"), by_val_std=("by-val", lambda s: s.std(ddof=0)), data_dir=("data_dir", "first"),
    ).reset_index()
    varying = [k for k in _settings(table, keys) if k not in LABEL_KEYS and table[k].map(_text).nunique() > 1]
    label_keys = [*LABEL_KEYS, *varying]
    order = sorted(range(len(table)), key=lambda i: (
        *(_sort_value(table.at[i, k]) for k in ("dataset", "alpha", *varying)), _method_rank(table.at[i, "method"])))
    table = table.iloc[order].reset_index(drop=True)
    papers = [paper_entry({**row, "data-dir": row["data_dir"]}, spec_entries) or {} for row in table.to_dict("records")]
    table["paper"] = [p.get("acc", np.nan) for p in papers]
    table["paper_std"] = [p.get("std", np.nan) for p in papers]
    table["paper_source"] = [p.get("source", "") for p in papers]
    table["diff"] = table.best_mean - table.paper
    return table.drop(columns="data_dir"), keys, label_keys


def _settings(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The keys that tell rows apart: every key but ``paper_dataset`` and a method's own keys held
    constant (``lora-epochs`` only in FedLoRA's config.json: missing from other rows, one value)."""
    return [k for k in keys if k != "paper_dataset" and (table[k].notna().all() or table[k].dropna().map(_text).nunique() > 1)]


def _cell(row: pd.Series, key: str) -> str:
    """A row's value of ``key`` for people: ``npz (cifar10)`` when the npz file is CIFAR-10."""
    text = _text(row[key])
    if key == "dataset" and row["paper_dataset"] != text:
        text += f" ({row['paper_dataset']})"
    return text


def _pm(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if not pd.isna(std) else f"{mean:.2f}"


def shown_table(table: pd.DataFrame, label_keys: Sequence[str]) -> pd.DataFrame:
    """The table as people read it: label cells, n, best, final and (with validation splits) by-val
    (mean ± std, %), paper, diff."""
    return pd.DataFrame({
        **{key: [_cell(row, key) for _, row in table.iterrows()] for key in label_keys},
        "n": table.n.astype(str),
        "best (%)": [_pm(m, s) for m, s in zip(table.best_mean, table.best_std, strict=True)],
        "final (%)": [_pm(m, s) for m, s in zip(table.final_mean, table.final_std, strict=True)],
        **({"by-val (%)": [_pm(m, s) for m, s in zip(table.by_val_mean, table.by_val_std, strict=True)]}
           if table.by_val_mean.notna().any() else {}),
        "paper (%)": [_pm(m, s) for m, s in zip(table.paper, table.paper_std, strict=True)],
        "diff": ["—" if pd.isna(d) else f"{d:+.2f}" for d in table["diff"]],
    })


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of a frame of strings."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False)])


def _order(items: Sequence[tuple[str, float]]) -> str:
    ranked = sorted(items, key=lambda item: -item[1])
    text = ranked[0][0]
    for (_, prev), (name, value) in itertools.pairwise(ranked):
        text += (" = " if round(prev, 2) == round(value, 2) else " > ") + name
    return text


def _clusters(table: pd.DataFrame, keys: Sequence[str]) -> list[pd.DataFrame]:
    """Rows that differ by method alone, in row order."""
    others = [k for k in _settings(table, keys) if k != "method"]
    ids = table[others].map(_text).apply(tuple, axis=1)
    return [table[ids == key] for key in dict.fromkeys(ids)]


def _cluster_label(rows: pd.DataFrame, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={_cell(rows.iloc[0], k)}" for k in keys if k != "method")  # label keys


def ordering_lines(table: pd.DataFrame, keys: Sequence[str], label_keys: Sequence[str]) -> list[str]:
    """For each set of rows that differ by method alone: our ranking of the methods by the best
    selection's mean, the paper's where it has every one of them, and whether the two agree."""
    lines = []
    for rows in _clusters(table, keys):
        rows = rows[rows.best_mean.notna()]
        if len(rows) < 2:
            continue
        ours = _order(list(zip(rows.method, rows.best_mean, strict=True)))
        line = f"ordering [{_cluster_label(rows, label_keys)}]: {ours}"
        if rows.paper.notna().all():
            theirs = _order(list(zip(rows.method, rows.paper, strict=True)))
            line += f" (paper: {theirs}) -> {'holds' if theirs == ours else 'differs'}"
        else:
            line += " (paper: n/a)"
        lines.append(line)
    return lines


def group_accuracy_table(frame: pd.DataFrame, table: pd.DataFrame, label_keys: Sequence[str]) -> str | None:
    """Mean ± std over seeds of each client group's accuracy (%) at each run's best round, one
    column per group; None when no run recorded groups."""
    columns = sorted(c for c in frame.columns if c.startswith("acc_per_group."))
    if not columns:
        return None
    best = frame[frame["round"] == frame["best_round"]].set_index("run_dir")[columns] * 100
    cells = {c.removeprefix("acc_per_group."): [_pm(best.reindex(dirs)[c].mean(), best.reindex(dirs)[c].std(ddof=0))
                                                 for dirs in table.run_dirs] for c in columns}
    return markdown(pd.concat([shown_table(table, label_keys)[list(label_keys)], pd.DataFrame(cells)], axis=1))


# --------------------------------------------------------------------------- plots


@dataclass
class _Layout:
    """How rows become panels: [(panel title, row indices)], a colour and a label per row."""

    panels: list[tuple[str, list[int]]]
    color: Callable[[int], Any]
    label: Callable[[int], str]
    common: str  # the settings every row shares (for the figure title)


def _layout(table: pd.DataFrame, keys: Sequence[str], label_keys: Sequence[str]) -> _Layout:
    """One panel per set of rows that differ by method alone (a line per method, one colour per
    method across panels), titled by the keys that differ between panels; or, with more such sets
    than :data:`MAX_PANELS`, one panel with a line per row labelled by the keys that differ."""
    from matplotlib import colormaps

    clusters = _clusters(table, keys)
    shared = [k for k in label_keys if table.apply(lambda r, k=k: _cell(r, k), axis=1).nunique() == 1]
    common = " ".join(f"{k}={_cell(table.iloc[0], k)}" for k in shared)
    differing = [k for k in label_keys if k not in shared and k != "method"]
    if len(clusters) <= MAX_PANELS:
        methods = sorted(set(table.method), key=_method_rank)
        color_of = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
        panels = [(textwrap.fill(" ".join(f"{k}={_cell(rows.iloc[0], k)}" for k in differing), 40, break_on_hyphens=False),
                   list(rows.index))
                  for rows in clusters]
        return _Layout(panels, lambda i: color_of[table.at[i, "method"]], lambda i: table.at[i, "method"], common)
    differing = [k for k in label_keys if k not in shared]
    return _Layout([("", list(table.index))], lambda i: colormaps["tab20"](i % 20),
                   lambda i: " ".join(f"{k}={_cell(table.iloc[i], k)}" for k in differing), common)


def _figure(n_panels: int, width: float = 5.5, height: float = 4.0, sharey: bool = True):
    """Panels in rows of three (one y-axis for all, so that settings compare at a glance)."""
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    width = max(width, 8.0) if n_panels == 1 else width  # room for the legend's columns below it
    fig = Figure(figsize=(width * ncols, height * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _finish(fig, axes, layout: _Layout | None, title: str, path: Path) -> Path:
    """One legend for the figure, below the panels (as many columns as its labels fit), the wrapped
    title and the settings every row shares, then the PNG, written atomically. No ``layout``: no
    legend."""
    import io

    from matplotlib.ticker import MaxNLocator

    if layout is not None:
        entries = {}
        rounds = [line.get_xdata() for ax in axes if ax.get_xlabel() == "round" for line in ax.get_lines()
                  if len(line.get_xdata())]
        if rounds:  # per-round panels span the figure's rounds (a run with one accuracy left is not alone)
            low, high = min(min(r) for r in rounds), max(max(r) for r in rounds)
            for ax in axes:
                ax.set_xlim(low - 0.3, high + 0.3)
        for number, ax in enumerate(axes):
            if number % 3:  # the y-axis is shared: its label once per row
                ax.set_ylabel("")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            entries.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels(), strict=True))
        fits = int(fig.get_figwidth() * 13 // (max(map(len, entries)) + 6))  # ~13 small characters per inch
        fig.legend(entries.values(), entries.keys(), fontsize="small", loc="outside lower center",
                   ncols=max(1, min(len(entries), 6, fits)))
    text = title + (f"\n{layout.common}" if layout and layout.common else "")
    width = max(40, int(fig.get_figwidth() * 12))
    fig.suptitle("\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n")))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path


def _per_round(frame: pd.DataFrame, runs: list[str], key: str) -> pd.DataFrame:
    """Mean and std (ddof=0) over ``runs`` (run folders) of ``key`` per round (rounds no run logged: left out)."""
    if key not in frame:
        return pd.DataFrame(columns=["mean", "std"])
    rows = frame[frame.run_dir.isin(runs)]
    values = pd.to_numeric(rows[key], errors="coerce")
    return values.groupby(rows["round"]).agg(["mean", lambda s: s.std(ddof=0)]).set_axis(["mean", "std"], axis=1).dropna(
        subset=["mean"])


def plot_curves(frame, table, keys, label_keys, path: Path) -> Path:
    layout = _layout(table, keys, label_keys)
    fig, axes = _figure(len(layout.panels))
    for ax, (title, rows) in zip(axes, layout.panels, strict=True):
        for i in rows:
            curve = _per_round(frame, table.at[i, "run_dirs"], "acc_mean") * 100
            ax.plot(curve.index, curve["mean"], color=layout.color(i), label=f"{layout.label(i)} (n={table.at[i, 'n']})",
                    marker="o" if len(curve) < 3 else None)  # a round or two alone: points, not an empty panel
            if table.at[i, "n"] > 1:
                ax.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                                color=layout.color(i), alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel="round", ylabel="mean client test accuracy (%)")
    return _finish(fig, axes, layout, "Mean client accuracy per round (mean over seeds ± std)", path)


def plot_per_client(frame, table, keys, label_keys, path: Path, clients: pd.DataFrame) -> Path:
    layout = _layout(table, keys, label_keys)
    fig, axes = _figure(len(layout.panels), width=6.5)
    for ax, (title, rows) in zip(axes, layout.panels, strict=True):
        ids = sorted(set(clients.client))
        width = 0.8 / max(1, len(rows))
        for j, i in enumerate(rows):
            run = table.at[i, "run_dirs"][0]
            best = frame.loc[frame.run_dir == run, "best_round"].iloc[0]
            acc = clients[(clients.run_dir == run) & (clients["round"] == best)].set_index("client").acc.dropna() * 100
            name = layout.label(i)
            if len(ids) * len(rows) <= 240:
                ax.bar(acc.index + (j - (len(rows) - 1) / 2) * width, acc, width=width, color=layout.color(i), label=name)
            else:
                ax.plot(acc.index, acc, linewidth=0.8, color=layout.color(i), label=name)
            if len(rows) <= 4:  # more mean lines than that only hide the bars
                ax.axhline(acc.mean(), color=layout.color(i), linestyle="--", linewidth=1)
        ax.set(title=title, xlabel="client (partition id)", ylabel="test accuracy at the best round (%)", ylim=(0, 100))
        ax.set_yticks(range(0, 101, 20))
        if len(ids) <= 40:
            ax.set_xticks(ids)
            ax.tick_params(axis="x", labelsize="x-small")
    return _finish(fig, axes, layout, "Per-client test accuracy at each run's best round, first seed of each row "
                   "(paper Fig. 7; dashed, up to 4 rows a panel: mean over clients)", path)


def _plot_series(frame, table, keys, label_keys, path: Path, key: str, scale: float, ylabel: str, title: str,
                 log: bool = False) -> Path:
    """``key`` per round, one line per row (mean over seeds); ``log``: a logarithmic y-axis."""
    layout = _layout(table, keys, label_keys)
    fig, axes = _figure(len(layout.panels))
    for ax, (panel, rows) in zip(axes, layout.panels, strict=True):
        for j, i in enumerate(rows):
            curve = _per_round(frame, table.at[i, "run_dirs"], key) * scale
            label = layout.label(i) + (" (not logged)" if curve.empty else " (all 0)" if (curve["mean"] == 0).all() else "")
            ax.plot(curve.index, curve["mean"], color=layout.color(i), label=label, marker=MARKERS[j % len(MARKERS)],
                    markersize=7 - j % 3 * 2, markevery=max(1, len(curve) // 15))  # lines that coincide stay visible
        ax.set(title=panel, xlabel="round", ylabel=ylabel, yscale="log" if log else "linear")
    return _finish(fig, axes, layout, title, path)


#: What torchvision needs under data-dir (the extracted folder or its archive), per dataset.
TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
}


def _missing_data(dataset: str, data_dir: str) -> str | None:
    """Why a run's data cannot be read without downloading it (the report never downloads)."""
    names = TORCHVISION_FILES.get(dataset)
    if names and not any((Path(data_dir) / name).exists() for name in names):
        return f"neither {names[0]} nor {names[1]} under {data_dir} (the report does not download data)"
    if dataset == "npz" and not Path(data_dir).is_file():
        return f"no npz file at {data_dir}"
    return None


def plot_partition(table: pd.DataFrame, frame: pd.DataFrame, path: Path, echo: Callable[[str], None]) -> Path | None:
    """Fig. 5: samples per (client, class) of the training partition, recomputed with
    :func:`fedlora_flwr.data.partition_dataset` from the first run of each distinct partition;
    None (and the reason echoed) when no dataset could be read."""
    from fedlora_flwr.data import PartitionConfig, load_dataset, partition_dataset

    keys = ["dataset", "data-dir", "partition", "alpha", "classes-per-client", "train-per-client",
            "test-per-client", "num_clients"]
    firsts = frame[frame.run_dir.isin([dirs[0] for dirs in table.run_dirs])].drop_duplicates("run_dir")
    panels = []
    for _, run in firsts.drop_duplicates([k for k in keys if k in firsts]).head(MAX_PANELS).iterrows():
        dataset, data_dir = str(run["dataset"]), str(run.get("data-dir", ""))
        cfg = PartitionConfig(num_clients=int(run["num_clients"]), scheme=str(run["partition"]), alpha=float(run["alpha"]),
                              classes_per_client=int(run["classes-per-client"]), train_per_client=int(run["train-per-client"]),
                              test_per_client=int(run["test-per-client"]), seed=int(run["seed"]))
        missing = _missing_data(dataset, data_dir)
        if missing:
            echo(f"partition.png: cannot recompute the partition of {run['run']}: {missing}")
            continue
        try:
            data = load_dataset(dataset, data_dir)
            splits = partition_dataset(dataset, data_dir, cfg)
        except Exception as exc:  # noqa: BLE001 -- DatasetError, OSError, ValueError...: say why, draw nothing fake
            echo(f"partition.png: cannot recompute the partition of {run['run']} ({type(exc).__name__}: {exc})")
            continue
        counts = np.stack([np.bincount(data.y_train[s.train], minlength=data.num_classes) for s in splits])
        panels.append((run, cfg, counts))
    if not panels:
        echo("partition.png: skipped (no partition could be recomputed)")
        return None
    fig, axes = _figure(len(panels), width=5.0, height=max(3.5, 0.22 * max(p[2].shape[0] for p in panels) + 1.5),
                        sharey=False)
    for ax, (run, cfg, counts) in zip(axes, panels, strict=True):
        clients, classes = np.nonzero(counts)
        ax.scatter(classes, clients, s=counts[clients, classes] / counts.max() * 250, color="tab:red", alpha=0.7,
                   edgecolors="none")
        scheme = f"Dir(α={cfg.alpha:g})" if cfg.scheme == "dirichlet" else cfg.scheme
        ax.set(title=f"{paper_dataset(run)} {scheme}, seed {cfg.seed}\n{cfg.num_clients} clients, "
                     f"≤{cfg.train_per_client} train samples each",
               xlabel="class label", ylabel="client (partition id)",
               xlim=(-0.7, counts.shape[1] - 0.3), ylim=(counts.shape[0] - 0.3, -0.7))
        if counts.shape[1] <= 20:
            ax.set_xticks(range(counts.shape[1]))
        if counts.shape[0] <= 50:
            ax.set_yticks(range(counts.shape[0]))
            ax.tick_params(axis="y", labelsize="x-small")
        ax.grid(alpha=0.2)
    return _finish(fig, axes, None, "Training samples per client and class (paper Fig. 5; dot area ∝ count)", path)


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What :func:`make_report` made: the table (one row per configuration), its label keys,
    the Markdown, the ordering lines, the files written, the skipped runs and notes."""

    table: pd.DataFrame
    label_keys: list[str]
    markdown: str
    ordering: list[str]
    files: list[Path]
    skipped: list[tuple[str, str]]
    notes: list[str]


def at_point(frame: pd.DataFrame, point: str, name: str = "acc_mean") -> pd.Series:
    """Per round (a :func:`load_runs` frame), the metric ``name`` at evaluation ``point``: the plain
    column where the row's ``eval_point`` is ``point``, else the suffixed one (NaN where the round
    did not evaluate there; :func:`fedlora_flwr.results.point_metric`, vectorised)."""
    plain = frame[name] if name in frame else pd.Series(np.nan, index=frame.index)
    other = f"{name}_{point.replace('-', '_')}"
    suffixed = frame[other] if other in frame else pd.Series(np.nan, index=frame.index)
    primary = frame["eval_point"] == point if "eval_point" in frame else pd.Series(False, index=frame.index)
    return pd.to_numeric(plain.where(primary, suffixed), errors="coerce")


def point_selections(frame: pd.DataFrame, point: str) -> pd.DataFrame:
    """Per run (``run_dir``), the summary's three selections recomputed at evaluation ``point``:
    ``best_acc_mean`` (the best round's), ``final_acc_mean`` (the last round's) and
    ``acc_mean_at_best_val`` (at the round of the best ``val_acc_mean``, ties to the later round)."""
    rows = frame.assign(_acc=at_point(frame, point), _val=at_point(frame, point, "val_acc_mean"))
    rows = rows.sort_values(["run_dir", "round"])
    out = {}
    for run_dir, run in rows.groupby("run_dir", sort=False):
        validated = run[run._val.notna()]
        out[run_dir] = {"best_acc_mean": run._acc.max(), "final_acc_mean": run._acc.iloc[-1],
                        "acc_mean_at_best_val": (validated._acc.loc[validated._val[::-1].idxmax()]
                                                 if len(validated) else np.nan)}
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("run_dir").reset_index()


def _skipped(runs: pd.DataFrame) -> list[tuple[str, str]]:
    out = []
    for _, run in runs[runs.status != "finished"].iterrows():
        why = ("unfinished (no summary.json)" if run.status == "unfinished"
               else f"{run.status} ({run.get('failure')}: {run.get('reason')})")
        out.append((run.run_dir, why))
    return out


def make_report(root: str | Path, out: str | Path | None = None, spec: str | Path | None = None,
                echo: Callable[[str], None] = print, plots: bool = True, eval_point: str = "primary") -> Report:
    """Read the runs under ``root``, write the tables and plots to ``out`` (default
    ``root/report``) and echo the table, the ordering lines and what was written. ``eval_point``:
    the table's evaluation point (:data:`EVAL_POINTS`; ``"primary"``: each run's own)."""
    if eval_point not in EVAL_POINTS:
        raise ReportError(f"eval-point {eval_point!r} is not one of {', '.join(EVAL_POINTS)}")
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    spec_entries = load_paper_spec(spec) if spec else []
    try:
        frame = load_runs(root)
    except RunsError as exc:
        raise ReportError(str(exc)) from None
    runs = frame.drop_duplicates("run_dir", keep="last")
    skipped = _skipped(runs)
    if skipped:
        echo(f"skipped {len(skipped)} run folder(s) that are not finished runs:")
        for path, why in skipped:
            echo(f"  {path}: {why}")
    finished = runs[runs.status == "finished"]
    if finished.empty:
        raise ReportError(f"no finished runs under {root} (a finished run folder holds config.json, metrics.jsonl, "
                          "summary.json)")
    frame = frame[frame.run_dir.isin(finished.run_dir)]
    if eval_point != "primary":
        selected = point_selections(frame, eval_point)
        finished = finished.drop(columns=[c for (c, _) in SELECTIONS.values() if c in finished]).merge(
            selected, on="run_dir", how="left")
        finished.attrs = frame.attrs
    table, keys, label_keys = run_table(finished, spec_entries)
    notes = [f"runs without any accuracy, left out of their row: {', '.join(finished.run[finished.best_acc_mean.isna()])}"
             ] if finished.best_acc_mean.isna().any() else []
    notes += [f"row {' '.join(_cell(row, k) for k in label_keys)} holds repeated seeds: {row.seeds}"
              for _, row in table.iterrows() if len(set(map(str, row.seeds))) < len(row.seeds)]

    shown = shown_table(table, label_keys)
    ordering = ordering_lines(table, keys, label_keys)
    common = ", ".join(f"{k}={_text(table[k].dropna().iloc[0])}" + ("" if table[k].notna().all() else " (where set)")
                       for k in keys if k not in label_keys and k != "paper_dataset" and table[k].notna().any())
    validated = table.by_val_mean.notna().any()
    footer = [f"{name} (%): {what} (`{column}` × 100 of each run)." for name, (column, what) in SELECTIONS.items()
              if name != "by-val" or validated]
    footer += [("by-val is not reported: no run held out a validation split (validation-fraction = 0)."
                if not validated else "by-val: — where a row's runs held out no validation split."),
               ("evaluation point: each run's own (`eval_point`: its method's paper point or the one evaluate-at "
                "names)." if eval_point == "primary" else f"evaluation point: {eval_point} (rows of runs that did not "
                "evaluate there are —)."),
               ("best, final and by-val: mean ± std over the n seeds of a row, std the population standard deviation "
               "(`ddof=0`; the paper does not say which it uses)."),
               (f"rows: runs whose config.json agree on every key but {', '.join(sorted(IGNORED_KEYS))}; "
               "num_clients from summary.json."), f"common to all rows: {common}."]
    sources = sorted(set(table.paper_source) - {""})
    if sources:
        footer.append("paper (%): " + "; ".join(
            f"built-in numbers from the {PAPER_SOURCE}, matched on method, dataset and alpha only, so our setup "
            "(the settings above) may differ from the paper's" if s == "paper Table 1" else f"[[paper]] entries of {s}"
            for s in sources) + "; diff = best − paper (percentage points).")
    text = markdown(shown) + "\n\n" + "\n\n".join(footer) + "\n"
    text += "".join(f"\n- {line}" for line in ordering) + ("\n" if ordering else "")
    per_group = group_accuracy_table(frame, table, label_keys)
    if per_group:
        text += ("\nAccuracy per client group (architecture of a `model-family` run; %, mean client accuracy of the "
                 "group at each run's best round, mean ± std over seeds):\n\n" + per_group + "\n")

    out = Path(out) if out else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv = table[["n", "seeds", "best_mean", "best_std", "best_values", "final_mean", "final_std", "by_val_mean",
                 "by_val_std", "paper", "paper_std", "diff", "paper_source", "runs"]].astype(object)
    numbers = ["best_mean", "best_std", "final_mean", "final_std", "by_val_mean", "by_val_std", "paper", "paper_std",
               "diff"]
    csv[numbers] = csv[numbers].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    for column in ("seeds", "best_values", "runs"):
        csv[column] = csv[column].map(lambda values: " ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                                                  for v in values))
    csv = pd.concat([table[label_keys].map(lambda v: _text(v).replace("—", "")), csv], axis=1)
    write_atomic(out / "table.csv", csv.to_csv(index=False).encode("utf-8"))
    write_atomic(out / "table.md", text.encode("utf-8"))
    write_atomic(out / "table.tex", shown.to_latex(index=False, escape=True, column_format="l" * len(shown.columns)).encode("utf-8"))
    files = [out / "table.md", out / "table.csv", out / "table.tex"]
    for line in [markdown(shown), *footer, *ordering, *([per_group] if per_group else []), *(f"note: {n}" for n in notes)]:
        echo(line)

    if plots:
        args = (frame, table, keys, label_keys)
        files += [
            plot_curves(*args, out / "curves.png"),
            plot_per_client(*args, out / "per_client.png", load_client_accuracies(root)),
            _plot_series(*args, out / "distance.png", "shared_distance", 1.0,
                         r"mean L2 distance $\|\sigma_i - \bar{\sigma}\|$", "Distance of the clients' shared "
                         "parameters to their average per round (paper Fig. 6; mean over seeds)"),
            _plot_series(*args, out / "bytes.png", "bytes_up", 1e-6, "bytes uploaded per round (MB)",
                         "Bytes uploaded per round, all clients (mean over seeds)"),
        ]
        private = table[table.run_dirs.map(lambda dirs: "dp_epsilon" in frame and bool(
            frame.loc[frame.run_dir.isin(dirs), "dp_epsilon"].notna().any()))].reset_index(drop=True)
        if len(private):  # the rows whose runs added noise (ε is infinite, not logged, without)
            files.append(_plot_series(frame, private, keys, label_keys, out / "privacy.png", "dp_epsilon", 1.0,
                                      r"privacy spent $\varepsilon$ (at dp-delta, log scale)", "User-level DP of the "
                                      "shared update: ε after each round (RDP accountant; mean over seeds; rows "
                                      "without noise, whose ε is infinite, are not drawn)", log=True))
        elif (out / "privacy.png").exists():
            (out / "privacy.png").unlink()  # a stale plot of other runs would mislead
        partition = plot_partition(table, frame, out / "partition.png", echo)
        if partition:
            files.append(partition)
        elif (out / "partition.png").exists():
            (out / "partition.png").unlink()  # a stale plot of other runs would mislead
    echo(f"wrote {', '.join(path.name for path in files)} to {out}")
    return Report(table, label_keys, text, ordering, files, skipped, notes)


# --------------------------------------------------------------------------- command line

DESCRIPTION = (
    "Turn finished run folders into the paper's table (mean ± std over seeds of the best-round and the final-round "
    "mean client accuracy, with the paper's numbers and the difference) as table.md, table.csv and table.tex, and "
    "plots: curves.png, per_client.png (Fig. 7), partition.png (Fig. 5), distance.png (Fig. 6), bytes.png, and "
    "privacy.png (ε per round) when runs used DP."
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="folder holding run folders (searched recursively)")
    parser.add_argument(
        "--spec", metavar="SPEC.toml",
        help="experiment spec whose [[paper]] entries (config keys + acc, std in %%) give the paper "
        "column; rows it does not match fall back to the built-in Table 1 numbers",
    )
    parser.add_argument("--out", metavar="DIR", help="where to write the tables and plots (default: ROOT/report)")
    parser.add_argument("--eval-point", choices=EVAL_POINTS, default="primary",
                        help="the evaluation point of the table's accuracies: each run's own (primary, default), or "
                        "after-aggregation / after-training (recorded by runs with evaluate-at = both)")


def run(args: argparse.Namespace) -> int:
    """The ``report`` subcommand: 0 on success, 2 (and one line on stderr) on an error."""
    try:
        make_report(args.root, out=args.out, spec=args.spec, eval_point=args.eval_point)
    except ReportError as exc:
        print(f"fedlora-flwr report: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report ROOT [--spec SPEC.toml] [--out DIR]`` to an argparse subparsers object."""
    parser = subparsers.add_parser("report", help="tables and plots from finished runs", description=DESCRIPTION)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlora_flwr.report ROOT ...`` (the same as ``fedlora-flwr report``)."""
    parser = argparse.ArgumentParser(prog="fedlora-flwr report", description=DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
