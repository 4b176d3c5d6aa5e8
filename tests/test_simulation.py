"""End to end on the real engine: Flower's simulation runtime on a local Ray, real data (the two
text-model tests, about composition and learning, run on the inline engine)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

TINY = ["num_clients=6", "num_rounds=2", "strategy.fraction_train=0.5", "runtime.progress=false"]
WALL_CLOCK = {"wall_time_s"}
FEDSIM = [sys.executable, "-m", "fedsim"]


def _strip_wall_clock(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def test_cli_run_writes_a_complete_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*FEDSIM, *TINY, "runtime.progress=true", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[fedsim] round 2/2" in proc.stderr  # the progress display
    assert f"results: {run_dir}" in proc.stderr
    # start-up talks (issue 16 item 1): one line per phase, in order, then the total, whose
    # seconds the done line and the summary repeat
    lines = proc.stderr.splitlines()
    phases = [line.split("start-up: ", 1)[1] for line in lines if "] start-up: " in line]
    names = [p.rsplit(" ", 2)[0] for p in phases[:-1]]
    assert names == ["data and model", "Ray", "Flower engine",
                     "server (model inputs, strategy, fleet)", "Ray workers"]  # fmt: skip
    total = float(phases[-1].split(" s in all")[0])
    assert total == pytest.approx(sum(float(p.rsplit(" ", 2)[1]) for p in phases[:-1]), abs=0.3)
    assert lines.index(f"[fedsim] start-up: {phases[-1]}") < lines.index(
        next(line for line in lines if "round 1/2" in line)
    )
    done = next(line for line in lines if line.startswith("[fedsim] done: "))
    assert f"({total:.1f} s start-up, " in done
    # run.log keeps the console output (issue 16 item 2): every [fedsim] line, in order
    assert (run_dir / "run.log").read_text().splitlines() == [
        line for line in lines if line.startswith("[fedsim] ")
    ]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    columns = ("accuracy", "loss", "macro_f1", "num_clients", "bytes_up", "bytes_down")
    for key in (*columns, "wall_time_s"):
        assert all(key in r for r in rows), key
    # 3 of 6 clients sampled per round, each downloads and uploads the full CNN once
    assert all(r["num_clients"] == 3 for r in rows)
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_rounds"] == 2
    assert summary["startup_s"] == pytest.approx(total, abs=0.051)
    assert (run_dir / "config.yaml").read_text().count("num_clients: 6") == 1


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = compose_config([*TINY, f"seed={seed}", "partition=dirichlet", "partition.alpha=0.5"])
        simulate(cfg, tmp_path / name)
        runs[name] = _strip_wall_clock(read_metrics(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_learning_happens_on_digits(tmp_path: Path) -> None:
    cfg = compose_config(
        ["num_clients=10", "num_rounds=10", "strategy.fraction_train=0.5", "runtime.progress=false"]
    )
    summary = simulate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    # 10 digit classes: chance is 0.1; ten FedAvg rounds of a small CNN must do far better
    assert summary["final_accuracy"] > 0.6
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_multirun_sweep_then_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            *FEDSIM,
            "--multirun",
            "strategy=fedavg,fedprox",
            "seed=0,1",
            "num_clients=6",
            "num_rounds=2",
            "strategy.fraction_train=0.5",
            "runtime.progress=false",
            "runtime.engine=inline",  # the table and plot; sweeps on Ray: test_engine, test_bench
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 4  # 2 strategies x 2 seeds, each its own folder
    # the sweep's table for pandas (issue 16 item 3): every round of every run, with its choices
    assert f"[fedsim] sweep table: {sweep / 'runs.parquet'}" in proc.stderr
    table = pd.read_parquet(sweep / "runs.parquet")
    assert len(table) == 4 * 2 and set(table.run) == {"0", "1", "2", "3"}
    assert table.groupby(["strategy", "seed"]).size().to_dict() == {
        ("fedavg", 0): 2,
        ("fedavg", 1): 2,
        ("fedprox", 0): 2,
        ("fedprox", 1): 2,
    }
    assert set(table.status) == {"completed"} and set(table.client) == {"local_sgd"}
    finals = table[table["round"] == 2].set_index("run").accuracy
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert finals[run.name] == summary["final_accuracy"]
    out = tmp_path / "plots" / "curves.png"
    plot = subprocess.run(
        [sys.executable, "-m", "fedsim.scripts.plot", str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plot.returncode == 0, plot.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    # one row per strategy, each over the 2 seeds
    assert "| strategy=FedAvg | 2 |" in table
    assert "| strategy=FedProx | 2 |" in table


def test_flwr_run_gives_the_same_metrics_as_the_fedsim_engine(tmp_path: Path) -> None:
    overrides = "num_clients=6 num_rounds=2 runtime.progress=false"
    proc = subprocess.run(
        ["make", "-s", "flwr-run", f"OVERRIDES={overrides}", f"RESULTS_DIR={tmp_path / 'flwr'}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (flwr_run,) = [p.parent for p in (tmp_path / "flwr").rglob("metrics.jsonl")]
    simulate(compose_config(overrides.split()), tmp_path / "engine")
    assert _strip_wall_clock(read_metrics(flwr_run)) == _strip_wall_clock(
        read_metrics(tmp_path / "engine")
    )


def test_a_text_model_on_local_sgd_learns_a_separable_csv(tmp_path: Path) -> None:
    """Issue 16 item 5: the text model brings its own local-SGD lr (the CNN's 0.2 collapsed it
    to 0.53 on this file before the common clip): above the majority class (0.5) in 3 rounds."""
    rows = ["text,label"]
    for i in range(40):
        rows += [f"what a wonderful sunny day number {i},happy",
                 f"this is a terrible rainy evening number {i},sad"]  # fmt: skip
    (tmp_path / "sep.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*FEDSIM, "data=hf", f"data.path={tmp_path / 'sep.csv'}", "model=text_classifier",
         "model.max_length=16", "num_clients=4", "num_rounds=3", "runtime.progress=false",
         "runtime.engine=inline",  # what the text model learns is the point, not the engine
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml_lr(run_dir) == 0.05
    assert max(r["accuracy"] for r in read_metrics(run_dir)) >= 0.9


def test_side_tuning_alone_runs_on_a_text_model(tmp_path: Path) -> None:
    """`fedsim client=side_tuning` picks MiniLM and chatterbot instead of refusing the CNN."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*FEDSIM, "client=side_tuning", "model.max_length=16", "client.max_steps=2",
         "num_clients=4", "num_rounds=1", "runtime.progress=false",
         "runtime.engine=inline",  # the config's composition is the point, not the engine
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    choices = (run_dir / "choices.yaml").read_text()
    assert "model: text_classifier" in choices and "data: chatterbot" in choices
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def yaml_lr(run_dir: Path) -> float:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["client"]["lr"]
