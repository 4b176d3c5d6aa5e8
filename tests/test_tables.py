"""The Python API and tidy results (issue 16 items 2, 3 and 8): ``fedsim.run``, the run's
``choices.yaml``, ``fedsim.load_runs`` / ``fedsim.load_clients`` as pandas tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import fedsim
from fedsim.config import compose_config, compose_with_provenance
from fedsim.errors import ConfigError
from fedsim.records.results import read_metrics

TINY = [
    "num_clients=4",
    "num_rounds=2",
    "strategy.fraction_train=1.0",
    "runtime.progress=false",
    "runtime.engine=inline",
]


def test_import_fedsim_stays_light() -> None:
    code = "import sys, fedsim; print(fedsim.__version__, *(m in sys.modules for m in HEAVY))"
    code = f"HEAVY = ('ray', 'torch'); {code}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [fedsim.__version__, "False", "False"]


def test_provenance_names_each_groups_choice_and_leaves_the_config_as_composed() -> None:
    overrides = ["experiment=mobile_side_tuning", "strategy=fedprox", "seed=3"]
    cfg, made_by = compose_with_provenance(overrides)
    assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(compose_config(overrides))
    assert made_by == {
        "choices": {
            "client": "side_tuning", "data": "chatterbot", "devices": "phones_mixed",
            "distillation": "none", "experiment": "mobile_side_tuning", "logger": "none",
            "model": "text_classifier", "partition": "dirichlet", "strategy": "fedprox",
            "warm_start": "none",
        },
        "overrides": overrides,
    }  # fmt: skip


@pytest.mark.slow
def test_run_from_python_then_load_runs_and_clients(tmp_path: Path) -> None:
    pythonpath = os.environ.get("PYTHONPATH")
    summary = fedsim.run([*TINY, "strategy=fedprox", "devices=phones_mixed"], tmp_path / "a")
    assert summary["status"] == "completed" and summary["run_dir"] == str(tmp_path / "a")
    made_by = yaml.safe_load((tmp_path / "a" / "choices.yaml").read_text())
    assert made_by["choices"]["strategy"] == "fedprox"
    assert made_by["choices"]["devices"] == "phones_mixed"
    second = fedsim.run([*TINY, "seed=1"], tmp_path / "b")  # a second run in the same process
    assert second["status"] == "completed"
    assert os.environ.get("PYTHONPATH") == pythonpath  # the caller's environment is its own

    rounds = fedsim.load_runs(tmp_path)
    assert sorted(set(rounds.run)) == ["a", "b"] and len(rounds) == 4
    a = rounds[rounds.run == "a"]
    assert a.strategy.tolist() == ["fedprox"] * 2 and a.devices.tolist() == ["phones_mixed"] * 2
    assert a["round"].tolist() == [1, 2]
    assert a.accuracy.tolist() == [r["accuracy"] for r in read_metrics(tmp_path / "a")]
    assert a.sim_time_s.is_monotonic_increasing and (a.bytes_up > 0).all()
    assert rounds[rounds.run == "b"].seed.tolist() == [1, 1]
    assert (rounds.overrides[rounds.run == "b"] == " ".join([*TINY, "seed=1"])).all()
    one = fedsim.load_runs(tmp_path / "a")  # a run folder itself
    assert set(one.run) == {"."}

    clients = fedsim.load_clients(tmp_path / "a")
    rows = read_metrics(tmp_path / "a", "clients.jsonl")
    assert len(clients) == len(rows) > 0
    assert set(clients.strategy) == {"fedprox"}
    # a client that did not train (offline) has no latency: NaN in the table, absent in the row
    assert clients.latency_s.fillna(-1).tolist() == [r.get("latency_s", -1) for r in rows]


def test_runs_written_before_choices_yaml_have_empty_choice_columns(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 7\n")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n{trunc")
    table = fedsim.load_runs(tmp_path)
    assert table.to_dict("records") == [
        {
            "run": "old",
            "seed": 7,
            "status": None,
            "data": None,
            "partition": None,
            "model": None,
            "strategy": None,
            "client": None,
            "devices": None,
            "warm_start": None,
            "distillation": None,
            "logger": None,
            "experiment": None,
            "overrides": None,
            "round": 1,
            "accuracy": 0.5,
        }
    ]  # fmt: skip  (a killed run's truncated last line is dropped)


def test_a_folder_without_runs_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        fedsim.load_runs(tmp_path)
    assert err.value.key == "path" and "holds no run folder" in str(err.value)
    with pytest.raises(ConfigError, match="is not a folder"):
        fedsim.load_runs(tmp_path / "missing")
