import json
import math

import pytest
from omegaconf import OmegaConf

from fedsim.errors import ConfigError
from fedsim.records.progress import RoundProgress, format_duration
from fedsim.records.results import CLIENT_EVAL_FILE, RunWriter, read_metrics


def test_run_writer_writes_and_never_reuses_a_folder(tmp_path) -> None:
    cfg = OmegaConf.create({"seed": 1, "x": "${seed}"})
    writer = RunWriter(tmp_path / "run")
    writer.start(cfg)
    writer.log_row({"round": 1, "accuracy": 0.5, "loss": math.nan})
    writer.finish({"final_accuracy": 0.5})
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").x == 1  # saved resolved
    assert read_metrics(tmp_path / "run") == [{"round": 1, "accuracy": 0.5, "loss": None}]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_accuracy"] == 0.5
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="hydra.run.dir"):
        RunWriter(tmp_path / "run").start(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before  # nothing lost
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (75.2, "1:15"), (3725, "1:02:05")])
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_progress_line_names_round_accuracy_loss_eta(capsys) -> None:
    import sys

    progress = RoundProgress(10, stream=sys.stdout)
    progress.update(1, 0.5, 1.25)
    line = capsys.readouterr().out
    assert "round  1/10" in line and "acc 0.5000" in line and "loss 1.2500" in line
    assert "eta" in line and "elapsed" in line


def test_run_writer_client_eval_is_replaced_whole_and_kept_on_reopen(tmp_path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.start(OmegaConf.create({"seed": 0}))
    writer.write_rows([{"partition_id": 0, "accuracy": 0.5}, {"partition_id": 1}], CLIENT_EVAL_FILE)
    writer.write_rows([{"partition_id": 2, "accuracy": math.nan}], CLIENT_EVAL_FILE)
    # the second call replaces the file (a resumed run scores its final model again)
    rows = read_metrics(tmp_path / "run", CLIENT_EVAL_FILE)
    assert rows == [{"partition_id": 2, "accuracy": None}]
    writer.reopen(server_round=1)
    # Kept until the resumed run writes a complete new one (issue 15: a resume that fails to
    # start must not lose it); the next write_rows replaces it whole.
    assert read_metrics(tmp_path / "run", CLIENT_EVAL_FILE) == rows
    writer.write_rows([{"partition_id": 3, "accuracy": 0.25}], CLIENT_EVAL_FILE)
    rows = read_metrics(tmp_path / "run", CLIENT_EVAL_FILE)
    assert rows == [{"partition_id": 3, "accuracy": 0.25}]
    writer.close()
