"""The report (fedlora_flwr.report) on small fake run folders: arithmetic, rows, the two
selections, paper column, CSV/Markdown/LaTeX, skipped folders, plots, the ordering line and the
command line's errors."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
from runfolders import fake_run

from fedlora_flwr.paper import PAPER_TABLE1, matches, paper_entry
from fedlora_flwr.report import ReportError, make_report, register, run_table
from fedlora_flwr.runs import load_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("curves.png", "per_client.png", "partition.png", "distance.png", "bytes.png")



@pytest.fixture
def two_methods(tmp_path: Path) -> Path:
    """fedlora 0.80/0.82/0.84 and fedavg 0.60/0.61/0.62 over seeds 1-3, plus one unfinished run."""
    root = tmp_path / "runs"
    for seed, (lora, avg) in enumerate(((0.80, 0.60), (0.82, 0.61), (0.84, 0.62)), start=1):
        fake_run(root, f"fedlora-s{seed}", "fedlora", seed, lora)
        fake_run(root / "nested", f"fedavg-s{seed}", "fedavg", seed, avg)
    fake_run(root, "fedlora-s4-unfinished", "fedlora", 4, 0.10, finished=False)
    return root


def write_spec(path: Path) -> Path:
    path.write_text(
        "[grid]\nmethods = ['fedlora', 'fedavg']\n\n"
        "[[paper]]\nmethod = 'fedlora'\ndataset = 'synthetic'\nalpha = 0.1\nacc = 85.47\nstd = 2.06\n\n"
        "[[paper]]\nmethod = 'fedavg'\ndataset = 'synthetic'\nacc = 60.39\nstd = 1.46\n\n"
        "[[paper]]\nmethod = 'fedavg'\ndataset = 'synthetic'\nalpha = 0.5\nacc = 1.0\nstd = 1.0\n"
    )
    return path


def test_table_arithmetic_selections_paper_column_tables_and_plots(two_methods, tmp_path, capsys):
    out = tmp_path / "report"
    report = make_report(two_methods, out=out, spec=write_spec(tmp_path / "spec.toml"))
    printed = capsys.readouterr().out

    table = report.table.set_index("method")
    assert list(table.index) == ["fedavg", "fedlora"]  # the paper's row order
    assert table.at["fedlora", "best_mean"] == pytest.approx(82.0, abs=1e-9)
    assert table.at["fedlora", "best_std"] == pytest.approx(math.sqrt(8 / 3), abs=1e-9)  # ddof=0: 1.633
    assert table.at["fedlora", "final_mean"] == pytest.approx(81.0, abs=1e-9)  # the last round's, per seed −1
    assert table.at["fedavg", "best_mean"] == pytest.approx(61.0, abs=1e-9)
    assert table.at["fedavg", "best_std"] == pytest.approx(math.sqrt(2 / 3), abs=1e-9)  # 0.816
    assert table.at["fedlora", "diff"] == pytest.approx(82.0 - 85.47, abs=1e-9)
    assert table.at["fedavg", "paper"] == 60.39  # entry without alpha matches; the alpha=0.5 one does not

    md = (out / "table.md").read_text()
    assert "| method | dataset | alpha | n | best (%) | final (%) | paper (%) | diff |" in md
    assert "| fedlora | synthetic | 0.1 | 3 | 82.00 ± 1.63 | 81.00 ± 1.63 | 85.47 ± 2.06 | -3.47 |" in md
    assert "| fedavg | synthetic | 0.1 | 3 | 61.00 ± 0.82 | 60.00 ± 0.82 | 60.39 ± 1.46 | +0.61 |" in md
    assert "ddof=0" in md and "[[paper]] entries of spec spec.toml" in md
    assert "selected on the test set" in md and "the last round's mean client test accuracy: no selection" in md
    assert "by-val is not reported" in md
    assert "| fedlora | synthetic | 0.1 | 3 | 82.00 ± 1.63 |" in printed  # the table is printed too

    with (out / "table.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["fedlora"]["best_mean"] == "82.0000" and rows["fedlora"]["best_std"] == "1.6330"
    assert rows["fedlora"]["final_mean"] == "81.0000" and rows["fedlora"]["final_std"] == "1.6330"
    assert rows["fedlora"]["n"] == "3" and rows["fedlora"]["seeds"] == "1 2 3"
    assert rows["fedlora"]["best_values"] == "80.0000 82.0000 84.0000"
    assert rows["fedlora"]["paper"] == "85.4700" and rows["fedlora"]["paper_std"] == "2.0600"
    assert rows["fedlora"]["diff"] == "-3.4700"
    assert rows["fedavg"]["best_mean"] == "61.0000" and rows["fedavg"]["best_std"] == "0.8165"
    assert rows["fedavg"]["diff"] == "0.6100"
    assert "seed" not in rows["fedlora"]

    tex = (out / "table.tex").read_text()
    assert "\\begin{tabular}" in tex and "fedlora & synthetic & 0.1 & 3 & 82.00 ± 1.63 & 81.00 ± 1.63" in tex
    assert "best (\\%)" in tex

    # The unfinished run is skipped and said so; it does not enter the fedlora row.
    assert "skipped 1 run folder(s)" in printed and "fedlora-s4-unfinished: unfinished (no summary.json)" in printed
    assert [Path(path).name for path, _ in report.skipped] == ["fedlora-s4-unfinished"]

    line = "ordering [dataset=synthetic alpha=0.1]: fedlora > fedavg (paper: fedlora > fedavg) -> holds"
    assert report.ordering == [line] and line in printed and line in md

    for name in PLOTS:  # synthetic data needs no file, so the partition is recomputed too
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_a_failed_run_is_skipped_with_its_reason(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "done", "fedlora", 1, 0.8)
    failed = fake_run(root, "failed", "fedlora", 2, 0.1)
    summary = json.loads((failed / "summary.json").read_text())
    summary.update(status="failed", failure="no-valid-replies", reason="round 3: no client sent a valid reply")
    (failed / "summary.json").write_text(json.dumps(summary))
    report = make_report(root, out=tmp_path / "out", echo=lambda _: None, plots=False)
    assert report.table.runs.tolist() == [["done"]]
    assert [(Path(path).name, why) for path, why in report.skipped] == [
        ("failed", "failed (no-valid-replies: round 3: no client sent a valid reply)")]


def test_rows_group_seeds_and_label_varying_keys(tmp_path):
    root = tmp_path / "runs"
    for seed in (1, 2):
        fake_run(root, f"lora-r06-s{seed}", "fedlora", seed, 0.7 + seed / 100, **{"rank-conv": 0.6})
        fake_run(root, f"lora-r02-s{seed}", "fedlora", seed, 0.6, **{"rank-conv": 0.2})
        fake_run(root, f"avg-s{seed}", "fedavg", seed, 0.5, **{"data-dir": f"/elsewhere/{seed}", "device": "cpu"})
    table, _, label_keys = run_table(_finished(root))
    assert label_keys == ["method", "dataset", "alpha", "rank-conv"]
    assert table[["method", "rank-conv", "seeds"]].values.tolist() == [
        ["fedlora", 0.2, [1, 2]], ["fedavg", 0.6, [1, 2]], ["fedlora", 0.6, [1, 2]]
    ]
    report = make_report(root, out=tmp_path / "out", echo=lambda _: None, plots=False)
    assert "| fedlora | synthetic | 0.1 | 0.2 | 2 | 60.00 ± 0.00 | 59.00 ± 0.00 | — | — |" in report.markdown
    assert "| fedlora | synthetic | 0.1 | 0.6 | 2 | 71.50 ± 0.50 | 70.50 ± 0.50 | — | — |" in report.markdown
    # Only rows that differ by method alone are ranked; no paper numbers for synthetic data.
    assert report.ordering == ["ordering [dataset=synthetic alpha=0.1 rank-conv=0.6]: fedlora > fedavg (paper: n/a)"]


def test_a_resumed_or_fused_evaluation_run_is_a_seed_of_the_same_row(tmp_path):
    """resume and fused-evaluation change how a run went, not what it computed (config.OPERATIONAL_KEYS)."""
    root = tmp_path / "runs"
    fake_run(root, "s1", "fedlora", 1, 0.70)
    fake_run(root, "s2", "fedlora", 2, 0.72, resume=True, **{"fused-evaluation": True, "round-timeout": 60.0})
    table, _, _ = run_table(_finished(root))
    assert table[["method", "seeds", "n"]].values.tolist() == [["fedlora", [1, 2], 2]]


def test_builtin_table1_numbers_and_missing_data_file(tmp_path, capsys):
    """dataset=npz with a cifar10.npz file is CIFAR-10 for the built-in Table 1 numbers; the
    partition plot is skipped with a reason when that file cannot be read."""
    root = tmp_path / "runs"
    npz = {"dataset": "npz", "data-dir": str(tmp_path / "absent" / "cifar10.npz"), "alpha": 0.1}
    for method, best in (("fedavg", 0.7), ("local", 0.75), ("fedlora", 0.8)):
        fake_run(root, f"{method}-s1", method, 1, best, **npz)
    out = tmp_path / "report"
    report = make_report(root, out=out)
    printed = capsys.readouterr().out
    acc, std = PAPER_TABLE1[("fedlora", "cifar10", 0.1)]
    assert (acc, std) == (85.47, 2.06)
    assert f"| fedlora | npz (cifar10) | 0.1 | 1 | 80.00 ± 0.00 | 79.00 ± 0.00 | {acc:.2f} ± {std:.2f} | -5.47 |" \
        in report.markdown
    assert "| local | npz (cifar10) | 0.1 | 1 | 75.00 ± 0.00 | 74.00 ± 0.00 | 81.91 ± 3.09 | -6.91 |" in report.markdown
    assert "| fedavg | npz (cifar10) | 0.1 | 1 | 70.00 ± 0.00 | 69.00 ± 0.00 | 60.39 ± 1.46 | +9.61 |" in report.markdown
    assert report.ordering == [
        "ordering [dataset=npz (cifar10) alpha=0.1]: fedlora > local > fedavg (paper: fedlora > local > fedavg) -> holds"
    ]
    assert "partition.png: cannot recompute the partition" in printed and "cifar10.npz" in printed
    assert not (out / "partition.png").exists()
    for name in set(PLOTS) - {"partition.png"}:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


def _finished(root: Path):
    frame = load_runs(root)
    finished = frame.drop_duplicates("run_dir", keep="last")
    finished.attrs = frame.attrs
    return finished


def test_a_corrupt_metrics_file_is_one_line_naming_it(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "runs", "bad", "fedlora", 1, 0.5)
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\nnot json\n')
    args = _cli(["report", str(tmp_path / "runs")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedlora-flwr report: error: {run_dir / 'metrics.jsonl'} line 2: not JSON")
    assert "\n" not in err


def test_ordering_that_differs_from_the_paper(tmp_path):
    root = tmp_path / "runs"
    for method, best in (("fedavg", 0.9), ("local", 0.75), ("fedlora", 0.8)):
        fake_run(root, f"{method}-s1", method, 1, best, dataset="cifar10", **{"data-dir": "nowhere"})
    report = make_report(root, out=tmp_path / "out", echo=lambda _: None, plots=False)
    assert report.ordering == [
        "ordering [dataset=cifar10 alpha=0.1]: fedavg > fedlora > local (paper: fedlora > local > fedavg) -> differs"
    ]


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedlora-flwr")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_report_and_its_errors(two_methods, tmp_path, capsys):
    args = _cli(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedlora-flwr report: error: {tmp_path / 'missing'} does not exist"]

    fake_run(tmp_path / "empty", "only-unfinished", "fedlora", 1, 0.5, finished=False)
    args = _cli(["report", str(tmp_path / "empty")])
    assert args.func(args) == 2
    assert capsys.readouterr().err.startswith(f"fedlora-flwr report: error: no finished runs under {tmp_path / 'empty'}")

    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text("[[paper]]\nmethod = 'fedlora'\nstd = 1.0\n")  # no acc
    args = _cli(["report", str(two_methods), "--spec", str(bad_spec)])
    assert args.func(args) == 2
    assert "[[paper]] entry 1: acc must be a number (%), not None" in capsys.readouterr().err

    args = _cli(["report", str(two_methods), "--spec", str(tmp_path / "nope.toml")])
    assert args.func(args) == 2
    assert "--spec: cannot read" in capsys.readouterr().err


def test_one_paper_matcher_for_the_grid_and_the_report():
    """fedlora_flwr.paper: every named key equal (numbers as numbers, booleans strictly), npz with a
    cifar10 file is cifar10, the most specific entry wins, then the built-in Table 1."""
    config = {"method": "fedlora", "dataset": "npz", "data-dir": "/x/cifar10.npz", "alpha": 0.1, "resume": False}
    assert matches({"method": "fedlora", "dataset": "cifar10", "acc": 1}, config)
    assert matches({"dataset": "npz", "alpha": 0.1000000000001, "acc": 1}, config)
    assert not matches({"method": "fedlora", "dataset": "cifar100", "acc": 1}, config)
    assert not matches({"resume": 0, "acc": 1}, config) and not matches({"rank-conv": 0.6, "acc": 1}, config)
    entries = [{"method": "fedlora", "acc": 1.0}, {"method": "fedlora", "alpha": 0.1, "acc": 2.0}]
    assert paper_entry(config, entries)["acc"] == 2.0
    assert paper_entry(config) == {"method": "fedlora", "dataset": "cifar10", "alpha": 0.1, "acc": 85.47, "std": 2.06,
                                   "source": "paper Table 1"}
    assert paper_entry({**config, "dataset": "synthetic"}) is None


def _two_point_run(root: Path, name: str, seed: int, shift: float) -> Path:
    """A fedlora run evaluated at both points with a validation split (evaluate-at = both,
    validation-fraction > 0), its rows and summary as RunRecorder writes them."""
    run_dir = fake_run(root, name, "fedlora", seed, 0.7, **{"evaluate-at": "both", "validation-fraction": 0.1})
    columns = {"acc_mean": (0.5, 0.7, 0.6), "acc_mean_after_training": (0.55, 0.65, 0.8),
               "val_acc_mean": (0.4, 0.6, 0.6), "val_acc_mean_after_training": (0.9, 0.5, 0.5)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update(eval_point="after-aggregation", **{key: values[i] + shift for key, values in columns.items()})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(eval_point="after-aggregation", best_acc_mean=0.7 + shift, final_acc_mean=0.6 + shift,
                   best_val_round=3, best_val_acc_mean=0.6 + shift, acc_mean_at_best_val=0.6 + shift)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize(("point", "best", "final", "by_val"), [
    ("primary", 70.0, 60.0, 60.0),  # the summary's figures at the run's eval_point
    ("after-aggregation", 70.0, 60.0, 60.0),  # recomputed from the rows: the same (validation tie → later round)
    ("after-training", 80.0, 80.0, 55.0),  # best validation after training in round 1, where the test acc is 0.55
])
def test_both_evaluation_points_and_the_by_validation_column(tmp_path, point, best, final, by_val):
    root = tmp_path / "runs"
    for seed, shift in ((1, -0.01), (2, 0.01)):
        _two_point_run(root, f"fedlora-s{seed}", seed, shift)
    report = make_report(root, out=tmp_path / "report", plots=False, eval_point=point, echo=lambda line: None)
    (row,) = report.table.to_dict("records")
    assert row["n"] == 2
    assert (row["best_mean"], row["final_mean"], row["by_val_mean"]) == pytest.approx((best, final, by_val))
    assert row["by_val_std"] == pytest.approx(1.0)
    assert "by-val (%)" in report.markdown and "validation" in report.markdown
    assert (f"evaluation point: {point}" in report.markdown) == (point != "primary")


def test_no_by_validation_column_without_a_validation_split(two_methods, tmp_path):
    report = make_report(two_methods, out=tmp_path / "report", plots=False, echo=lambda line: None)
    assert "by-val (%)" not in report.markdown and "no run held out a validation split" in report.markdown
    with pytest.raises(ReportError, match="eval-point 'sideways'"):
        make_report(two_methods, out=tmp_path / "report", plots=False, eval_point="sideways")


def test_privacy_plot_only_for_runs_that_added_noise(tmp_path):
    root = tmp_path / "runs"
    for z in (0.0, 1.0):
        run_dir = fake_run(root, f"dp-z{z}", "fedlora", 1, 0.5, **{"dp-clip-norm": 5.0, "dp-noise-multiplier": z})
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:  # ε is null without noise (infinite), as RunRecorder writes it
            row["dp_epsilon"] = 10.0 * row["round"] if z else None
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = make_report(root, out=tmp_path / "report", echo=lambda line: None)
    assert tmp_path / "report" / "privacy.png" in report.files
    assert (tmp_path / "report" / "privacy.png").read_bytes().startswith(PNG_MAGIC)
    (root / "dp-z1.0").rename(tmp_path / "elsewhere")  # only the run without noise is left
    report = make_report(root, out=tmp_path / "report", echo=lambda line: None)
    assert not (tmp_path / "report" / "privacy.png").exists()  # the stale plot is removed
