"""Experiment tracking (``logger=...``), each backend read back with its own reader.

Tiny real runs (digits, 4 clients, 2 rounds) through ``fedsim.run``, as a notebook user would;
MLflow is read with ``MlflowClient``, TensorBoard with its ``EventAccumulator``, W&B's offline run
file with W&B's own protobuf records. A killed run resumed with ``logger=mlflow`` continues the
same MLflow run.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from fedsim.config import compose_config, config_hash
from fedsim.errors import ConfigError
from fedsim.records.results import read_metrics
from fedsim.records.tracking import TRACKING_FILE, _require, flatten, row_metrics

TINY = ["num_clients=4", "num_rounds=2", "strategy.fraction_train=0.5", "runtime.progress=false",
        "runtime.engine=inline",
        "eval.num_clients_final=2"]  # fmt: skip
LOGGERS = ("mlflow", "tensorboard", "wandb")


@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished run per logger, in one folder (MLflow's default store lies beside them).

    MLflow's through ``fedsim.api.run`` (in this process); TensorBoard's and W&B's, which write
    from background threads, through the ``fedsim`` command, whose exit skips Python's teardown
    (``fedsim.__main__._end_process``): what they hold is what a user's command leaves.
    """
    from fedsim.api import run

    root = tmp_path_factory.mktemp("tracked")
    runs = {}
    for logger in LOGGERS:
        run_dir = root / "runs" / logger
        if logger == "mlflow":
            assert run([f"logger={logger}", *TINY], run_dir=run_dir)["status"] == "completed"
        else:
            command = [sys.executable, "-m", "fedsim", f"logger={logger}", *TINY,
                       f"hydra.run.dir={run_dir}"]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, timeout=600, cwd=root)
        runs[logger] = run_dir
    return runs


def expected_columns(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as column -> {round: value}: what every backend must hold."""
    columns: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        step, values = row_metrics(row)
        for name, value in values.items():
            columns.setdefault(name, {})[step] = value
    return columns


def test_row_metrics_keeps_finite_numbers_at_the_round() -> None:
    row = {"round": 3, "phase": "train", "accuracy": 0.5, "loss": math.nan, "num_clients": 2,
           "status": "x", "diverged": False, "energy_j": None}  # fmt: skip
    assert row_metrics(row) == (3, {"accuracy": 0.5, "num_clients": 2.0})
    stage = {"round": 0, "phase": "warm_start", "cycle": 2, "accuracy": 0.25}
    assert row_metrics(stage) == (2, {"warm_start/accuracy": 0.25})


def test_flatten_gives_dotted_keys_and_list_indices() -> None:
    tree = {"client": {"lr": 0.2}, "devices": {"shares": [0.5, 0.5]}, "seed": 0}
    assert flatten(tree) == {
        "client.lr": 0.2, "devices.shares.0": 0.5, "devices.shares.1": 0.5, "seed": 0,
    }  # fmt: skip


def test_missing_library_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        _require("fedsim_no_such_tracking_library", "some-package", "mlflow")
    assert caught.value.key == "logger"
    assert "pip install some-package" in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_logger_leaves_the_config_hash_alone() -> None:
    """Old run folders (no ``logger`` key) and runs with any logger keep one hash."""
    plain = compose_config(["num_rounds=2"])
    tracked = compose_config(["num_rounds=2", "logger=mlflow"])
    without = plain.copy()
    with open_dict(without):
        del without["logger"]
    assert config_hash(plain) == config_hash(tracked) == config_hash(without)
    assert config_hash(plain) != config_hash(compose_config(["num_rounds=3"]))


def test_unknown_logger_is_refused_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "fedsim", "logger=mlfow"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedsim: error: logger=mlfow: unknown option; accepted: mlflow, none, tensorboard, wandb"
    ]


def test_tracking_libraries_are_imported_only_when_chosen() -> None:
    code = (
        "import sys, fedsim.api, fedsim.engine.simulation, fedsim.records.tracking;"
        "print([m for m in ('mlflow', 'wandb', 'tensorboard') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_mlflow_holds_config_rows_summary_and_files(tracked_runs: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tracked_runs["mlflow"]
    store = run_dir.parent / "mlflow.db"  # the default store: beside the run folders
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow_run_id"]
    tracked = client.get_run(run_id)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert tracked.info.status == "FINISHED"
    assert tracked.info.run_name == run_dir.name
    assert tracked.data.params["strategy._target_"] == config["strategy"]["_target_"]
    assert tracked.data.params["num_rounds"] == "2"
    assert tracked.data.params["logger._target_"] == "fedsim.records.tracking.MlflowTracker"
    columns = expected_columns(run_dir)
    assert {"accuracy", "sim_time_s", "bytes_up", "energy_j", "num_stragglers"} <= set(columns)
    for name, by_round in columns.items():
        history = client.get_metric_history(run_id, name)
        assert {m.step: m.value for m in history} == by_round, name
        assert len(history) == len(by_round) == 2  # one point per round
    summary = json.loads((run_dir / "summary.json").read_text())
    assert tracked.data.metrics["summary.final_accuracy"] == summary["final_accuracy"]
    assert tracked.data.metrics["summary.bytes_up_total"] == summary["bytes_up_total"]
    assert tracked.data.tags["summary.status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "config.yaml", "choices.yaml", "run.log"} <= artifacts
    assert "metrics.jsonl" not in artifacts  # its rows are the metrics above
    local = Path(client.download_artifacts(run_id, "summary.json"))
    assert json.loads(local.read_text()) == summary


@pytest.mark.slow
def test_tensorboard_event_files_hold_rows_config_and_summary(
    tracked_runs: dict[str, Path],
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tracked_runs["tensorboard"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    columns = expected_columns(run_dir)
    for name, by_round in columns.items():
        points = events.Scalars(name)
        assert [p.step for p in points] == sorted(by_round), name
        assert [p.value for p in points] == pytest.approx(
            [by_round[s] for s in sorted(by_round)], rel=1e-6
        )  # TensorBoard keeps float32
    summary = json.loads((run_dir / "summary.json").read_text())
    (final,) = events.Scalars("summary.final_accuracy")
    assert final.step == 2 and final.value == pytest.approx(summary["final_accuracy"], rel=1e-6)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert hparams["strategy._target_"].string_value == config["strategy"]["_target_"]
    assert hparams["num_clients"].number_value == 4


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of 7-byte-headed
    chunks) after W&B's 7-byte header, each record one of W&B's own protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_rows_config_summary_and_files(
    tracked_runs: dict[str, Path],
) -> None:
    run_dir = tracked_runs["wandb"]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    assert run_file.name == f"run-{run_id}.wandb"
    records = wandb_records(run_file)
    history: dict[str, dict[int, float]] = {}
    summary_logged: dict[str, object] = {}
    files, config = set(), {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}  # fmt: skip
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[int(items["_step"])] = value
        elif kind == "summary":
            for item in record.summary.update:
                summary_logged[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "files":
            files |= {f.path for f in record.files.files}
        elif kind == "run":
            config = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                      for i in record.run.config.update}  # fmt: skip
    assert history == expected_columns(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary_logged["final_accuracy"] == summary["final_accuracy"]
    assert summary_logged["status"] == "completed"
    assert {f"{run_dir.name}/summary.json", f"{run_dir.name}/config.yaml"} <= files
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["strategy"]["_target_"] == saved["strategy"]["_target_"]


@pytest.mark.slow
def test_resumed_run_continues_its_mlflow_run(kill_and_resume) -> None:
    """Killed after round 2 of 4 (no summary), resumed: one MLflow run, every round in it."""
    from mlflow.tracking import MlflowClient

    args = ["logger=mlflow", "num_clients=4", "num_rounds=4", "strategy.fraction_train=0.5",
            "runtime.progress=false", "runtime.engine=inline",
            "eval.num_clients_final=0"]  # fmt: skip
    run_dir, _ = kill_and_resume(args, rows=2)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("fedsim").experiment_id])
    assert tracked.info.run_id == json.loads((run_dir / TRACKING_FILE).read_text())["mlflow_run_id"]
    assert tracked.info.status == "FINISHED"
    history = client.get_metric_history(tracked.info.run_id, "accuracy")
    rows = read_metrics(run_dir)
    # A round the killed process logged after its checkpoint is logged again: the latest point
    # of each round is metrics.jsonl's (the two agree: a resumed run computes it identically).
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    assert latest == {row["round"]: row["accuracy"] for row in rows}
    assert sorted(latest) == [1, 2, 3, 4]
    assert tracked.data.metrics["summary.final_accuracy"] == rows[-1]["accuracy"]


@pytest.mark.slow
def test_a_crash_ends_the_mlflow_run_failed_and_a_resume_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 3 raises (as a GPU out of memory would): the MLflow run is FAILED with the error
    and crash.json; the resume of the folder reopens that run, and nothing of the crash is left
    on it but the file, which the folder keeps too (crashes.jsonl)."""
    from mlflow.tracking import MlflowClient

    from fedsim.engine.simulation import simulate
    from fedsim.rounds import synchronous

    cfg = compose_config(["logger=mlflow", "num_clients=4", "num_rounds=4",
                          "strategy.fraction_train=0.5", "runtime.progress=false",
                          "runtime.engine=inline", "eval.num_clients_final=0"])  # fmt: skip
    run_dir = tmp_path / "run"
    train_round = synchronous.train_round

    def out_of_memory(strategy, server_round, *args, **kwargs):
        if server_round == 3:
            raise RuntimeError("CUDA out of memory")
        return train_round(strategy, server_round, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(synchronous, "train_round", out_of_memory)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            simulate(cfg, run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow_run_id"]
    crashed = client.get_run(run_id)
    assert crashed.info.status == "FAILED"
    assert crashed.data.tags["summary.status"] == "crashed"
    assert crashed.data.tags["summary.error"] == "RuntimeError: CUDA out of memory"
    assert {"crash.json", "run.log", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    assert sorted(m.step for m in client.get_metric_history(run_id, "accuracy")) == [1, 2]

    assert simulate(cfg, run_dir, resume=True)["status"] == "completed"
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["summary.status"] == "completed"
    assert "summary.error" not in finished.data.tags
    assert "crashes.jsonl" in {a.path for a in client.list_artifacts(run_id)}
    history = client.get_metric_history(run_id, "accuracy")
    assert {m.step: m.value for m in history} == {r["round"]: r["accuracy"]
                                                  for r in read_metrics(run_dir)}  # fmt: skip


# --- Optuna studies that persist, and the objective a run returns --------------------------------
def test_objective_values_from_rows_by_hand() -> None:
    from fedsim.records.sweeps import objective_value

    rows = [{"round": 1, "phase": "train", "accuracy": 0.2, "sim_time_s": 10.0},
            {"round": 2, "phase": "train", "accuracy": 0.6, "sim_time_s": 20.0},
            {"round": 3, "phase": "train", "accuracy": 0.4, "sim_time_s": 40.0}]  # fmt: skip
    summary = {"final_accuracy": 0.4, "best_accuracy": 0.6}
    assert objective_value("final_accuracy", summary, rows) == 0.4
    assert objective_value("best_accuracy", summary, rows) == 0.6
    # (10 s x (0.2 + 0.6) / 2 + 20 s x (0.6 + 0.4) / 2) / 30 s = (4 + 10) / 30
    assert objective_value("auc_time", summary, rows) == pytest.approx(14 / 30)
    assert objective_value("time_to_target", summary, rows, 0.5) == 20.0
    assert objective_value("time_to_target", summary, rows, 0.9) == math.inf
    assert math.isnan(objective_value("final_accuracy", {"final_accuracy": None}, []))


def test_bad_objective_is_refused_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "fedsim", "objective=final_acc", "num_rounds=1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "fedsim: error: objective=final_acc: accepted: final_accuracy, best_accuracy, auc_time, "
        "time_to_target"
    )


def study_trials(sweep: Path) -> list:
    import optuna

    study = optuna.load_study(study_name="hpo_fedprox", storage=f"sqlite:///{sweep / 'optuna.db'}")
    return sorted(study.trials, key=lambda t: t.number)


@pytest.mark.slow
def test_optuna_study_persists_in_the_sweep_folder_and_continues(tmp_path: Path) -> None:
    """Two trials with objective=best_accuracy land in <sweep>/optuna.db with the values of the
    runs' summaries; the same sweep launched again adds its trial to that study (trial 2, in
    folder 2), its sampler aware of the first two."""
    sweep = tmp_path / "hpo"
    args = [sys.executable, "-m", "fedsim", "--multirun", "experiment=hpo_fedprox",
            "objective=best_accuracy", "num_clients=4", "num_rounds=2", "eval.num_clients_final=0",
            "runtime.progress=false", "runtime.engine=inline",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    first = subprocess.run([*args, "hydra.sweeper.n_trials=2"], capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    trials = study_trials(sweep)
    assert [t.number for t in trials] == [0, 1]
    for trial in trials:
        summary = json.loads((sweep / str(trial.number) / "summary.json").read_text())
        assert trial.value == summary["best_accuracy"]
        config = yaml.safe_load((sweep / str(trial.number) / "config.yaml").read_text())
        assert trial.params["client.lr"] == config["client"]["lr"]
    again = subprocess.run([*args, "hydra.sweeper.n_trials=1"], capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study_trials(sweep)
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    summary = json.loads((sweep / "2" / "summary.json").read_text())
    assert trials[2].value == summary["best_accuracy"]
    assert trials[2].params not in (trials[0].params, trials[1].params)  # a new proposal


# --- warnings: only known noise is filtered ------------------------------------------------------
PLUGIN = '''
import warnings

from fedsim.learning.models import SmallCNN


class WarningCNN(SmallCNN):
    """The digits CNN, from a user's own module, that warns when it builds a model."""

    def build(self, num_classes, width=1.0):
        warnings.warn("my_plugin: the learning rate looks high for this model", UserWarning)
        return super().build(num_classes, width)
'''


@pytest.mark.slow
def test_a_user_warning_during_a_run_is_shown(tmp_path: Path) -> None:
    """A plug-in model (``model._target_`` from the user's own module) warns as the driver builds
    it: fedsim's CLI used to hide every UserWarning; now the line reaches stderr."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "model._target_=my_plugin.WarningCNN", "num_clients=4",
         "num_rounds=1", "strategy.fraction_train=0.5", "eval.num_clients_final=0",
         "runtime.progress=false", "runtime.engine=inline", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UserWarning: my_plugin: the learning rate looks high for this model" in proc.stderr


def test_known_noise_is_hidden_and_other_warnings_are_not() -> None:
    """Each KNOWN_NOISE entry hides its own message, from its module, and nothing else."""
    code = """
import warnings
from fedsim.__main__ import KNOWN_NOISE
for message, category, module in KNOWN_NOISE:
    warnings.filterwarnings("ignore", message=message, category=category, module=module)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    for message, category, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.warn("something a user should read", UserWarning)
    warnings.warn("a library's plan for its next release", FutureWarning)
print(sorted(str(w.message) for w in caught))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == (
        "[\"a library's plan for its next release\", 'something a user should read']"
    )
