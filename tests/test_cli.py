"""Bad input on the command line: exit code 2, one line naming key/value/accepted, no folder."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import refused_in_a_fresh_process

FEDSIM = [sys.executable, "-m", "fedsim"]


def _files(tmp_path: Path) -> None:
    """Bad files the table refers to as {tmp}/...: garbage data, a run with a bad checkpoint."""
    (tmp_path / "garbage.csv").write_bytes(b"\x00\xff\xfe binary \x00\x00\n\x89PNG\r\n")
    (tmp_path / "nolabel.csv").write_text("text,other\nhello,1\nworld,2\n")
    # A ClassLabel column holding -1 (GLUE's "no label" in test splits): outside 0..K-1.
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    datasets.Dataset.from_dict(
        {"text": ["good", "bad", "meh", "fine"], "label": [1, 0, -1, 1]}, features=features
    ).to_parquet(str(tmp_path / "unlabelled.parquet"))
    for name, checkpoint in (("corrupt_ckpt", b"\x00" * 40), ("no_ckpt", None)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text("seed: 0\nnum_rounds: 2\n")
        if checkpoint is not None:
            (run / "checkpoint.safetensors").write_bytes(checkpoint)


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    extra = (
        []
        if any(a.startswith("resume=") for a in args)
        else [f"hydra.run.dir={run_dir}", "runtime.progress=false", "runtime.engine=inline"]
    )
    return subprocess.run(
        [*FEDSIM, *args, *extra],
        capture_output=True,
        text=True,
        timeout=180,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.mark.parametrize(
    ("args", "key", "accepted"),
    [
        (["strategy=fedavgg"], "strategy=fedavgg", "fedavg, fedavgm"),
        (["data=mnist"], "data=mnist", "chatterbot, digits, hf"),
        (["num_clients=0"], "num_clients=0", "integer >= 1"),
        (["num_clients=abc"], "num_clients=abc", "integer >= 1"),
        (["num_clients=5000"], "num_clients=5000", "from 1 to 1438"),
        (["num_rounds=0"], "num_rounds=0", "integer >= 1"),
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha=0", "> 0"),
        (["partition=dirichlet", "partition.alpha=-1.5"], "partition.alpha=-1.5", "> 0"),
        (["data=hf", "data.path=/nonexistent/x.csv"], "data.path=/nonexistent/x.csv", "not found"),
        (["data=hf"], "data.path", ""),
        (["client.lr=-1"], "client.lr=-1", "> 0"),
        (
            ["experiment=null"],
            "experiment=null",
            "unknown option; accepted: cyclic_text_scratch, digits_noniid",
        ),
        (["eval.num_clients_final=-1"], "eval.num_clients_final=-1", "all or an integer >= 0"),
        (["eval.num_clients_final=half"], "eval.num_clients_final=half", "all or an integer"),
        (["strategy.fraction_train=1.5"], "strategy.fraction_train=1.5", "(0, 1]"),
        (["strategy.min_available_nodes=99"], "strategy.min_available_nodes=99", "<= num_clients"),
        (["num_clientz=3"], "num_clientz", "not a config key"),
        (["clock.deadline_s=-2"], "clock.deadline_s=-2", "> 0"),
        (["clock.over_selection=0.5"], "clock.over_selection=0.5", ">= 1"),
        (["seed=-1"], "seed=-1", "integer >= 0"),
        (["warm_start=cyclc"], "warm_start=cyclc", "cyclic, none"),
        (["warm_start=cyclic", "warm_start.num_cycles=0"], "warm_start.num_cycles=0", ">= 1"),
        (
            ["warm_start=cyclic", "warm_start.clients_per_cycle=41"],
            "warm_start.clients_per_cycle=41",
            "<= num_clients (40)",
        ),
        (["distillation=dfl", "distillation.temperature=0"], "distillation.temperature=0", "> 0"),
        (
            ["distillation=dfl", "distillation.beta_schedule=cosine"],
            "distillation.beta_schedule=cosine",
            "acc_based",
        ),
        (
            ["distillation=dfl", "distillation.teacher=both"],
            "distillation.teacher=both",
            "class_global",
        ),
        (["strategy=heterofl", "strategy.widths=[0,0.5]"], "strategy.widths", "(0, 1]"),
        (
            ["strategy=heterofl", "strategy.latency_budget_s=-1"],
            "strategy.latency_budget_s=-1",
            "> 0",
        ),
        (
            ["strategy=heterofl", "data=chatterbot", "model=text_classifier"],
            "strategy=",
            "model=cnn or client=side_tuning",
        ),
        (
            ["strategy=fedrolex", "strategy.index_policy=spiral"],
            "strategy.index_policy=spiral",
            "roll",
        ),
        (["strategy=whale_fl", "strategy.tradeoff=-1"], "strategy.tradeoff=-1", ">= 0"),
        (["strategy=whale_fl", "strategy.fisher_window=0"], "strategy.fisher_window=0", ">= 1"),
        (
            ["strategy=whale_fl", "strategy.reference_quantile=2"],
            "strategy.reference_quantile=2",
            "[0, 1]",
        ),
        (["strategy=whale_fl", "strategy.initial_status=-1"], "strategy.initial_status=-1", ">= 0"),
        (["num_rounds=2.5"], "num_rounds=2.5", "integer >= 1"),
        (["checkpoint_every=-1"], "checkpoint_every=-1", "integer >= 0"),
        (["runtime.client_num_cpus=0"], "runtime.client_num_cpus=0", "> 0"),
        (["data.test_fraction=1.5"], "data.test_fraction=1.5", "(0, 1)"),
        (["faults.exception_prob=2"], "faults.exception_prob=2", "[0, 1]"),
        (["devices=phones_mixed", "devices.shares=[0.5,0.2,0.2]"], "devices.shares", "sum to 1"),
        (["devices=uniform", "devices.server_gflops=-1"], "devices.server_gflops=-1", "> 0"),
        (["partition=shard", "num_clients=1000"], "num_clients", "shard"),
        (
            ["data=chatterbot", "model=text_classifier", "model.backbone=/no/such/model"],
            "model.backbone=/no/such/model",
            "minilm",
        ),
        (["data=hf", "data.path={tmp}/garbage.csv", "model=text_classifier"], "data.path=", ""),
        (
            ["data=hf", "data.path={tmp}/nolabel.csv", "model=text_classifier"],
            "data.label_column=label",
            "other",
        ),
        (["data=hf", "data.path={tmp}/notes.txt"], "data.path={tmp}/notes.txt", ""),
        (
            ["data=hf", "data.path={tmp}/unlabelled.parquet", "model=text_classifier"],
            "data.label_column=label",
            "label in every row, not -1",
        ),
        (["resume={tmp}/nothing_here"], "resume={tmp}/nothing_here", "run folder"),
        (["resume={tmp}/no_ckpt"], "resume={tmp}/no_ckpt", "nothing to resume"),
        (["resume={tmp}/corrupt_ckpt"], "resume=", "corrupt"),
        (["resume={tmp}/no_ckpt", "strategy=fedprox"], "resume=strategy=fedprox", "runtime."),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_folder(args, key, accepted, tmp_path) -> None:
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedsim: error: ")
    key = key.replace("{tmp}", str(tmp_path))
    assert key in lines[0] and accepted in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_a_bad_run_scalar_is_refused_before_torch_flower_or_ray_load(tmp_path) -> None:
    """The config's own checks come first: a typo costs the time to read the config."""
    code, loaded, stderr = refused_in_a_fresh_process(
        ["num_rounds=0", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert (code, loaded) == (2, [])
    assert stderr.strip() == "fedsim: error: num_rounds=0: must be an integer >= 1"
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    proc = _run(["num_clients=4", "num_rounds=1"], tmp_path)
    assert proc.returncode == 2
    assert "hydra.run.dir=" in proc.stderr and "never overwritten" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_cfg_job_prints_the_composed_config(tmp_path) -> None:
    proc = subprocess.run(
        [*FEDSIM, "--cfg", "job", "strategy=fedprox"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "flwr.serverapp.strategy.FedProx" in proc.stdout and "proximal_mu" in proc.stdout


def test_diverging_learning_rate_stops_cleanly_with_metrics_saved(tmp_path) -> None:
    # No clip: the common one (client.max_grad_norm=10) bounds each step and keeps this finite.
    proc = _run(
        [
            "num_clients=4",
            "num_rounds=5",
            "strategy.fraction_train=1.0",
            "client.lr=1e9",
            "client.max_grad_norm=null",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopping (metrics so far are saved)" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert summary["status"] == "diverged" and summary["num_rounds"] == len(rows) < 5
    assert rows[-1]["loss"] is None  # NaN/inf is recorded as null: JSON has no NaN
