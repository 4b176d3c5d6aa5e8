"""The config tree composes: every experiment file (subfolders too) and the defaults."""

import pytest
from omegaconf import OmegaConf

from fedsim.config import CONF_DIR, compose_config, group_options, validate

EXPERIMENTS = sorted(
    str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
    for p in (CONF_DIR / "experiment").rglob("*.yaml")
)


def test_experiments_are_found_recursively() -> None:
    assert EXPERIMENTS == group_options("experiment") and EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name: str) -> None:
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    assert not OmegaConf.missing_keys(cfg)


def test_experiment_file_is_a_global_diff() -> None:
    for path in (CONF_DIR / "experiment").rglob("*.yaml"):
        assert path.read_text().lstrip().startswith("# @package _global_"), path


def test_defaults_compose_without_missing_values() -> None:
    cfg = compose_config([])
    validate(cfg)
    assert cfg.strategy._target_ == "flwr.serverapp.strategy.FedAvg"
    assert cfg.data._target_ == "fedsim.data.DigitsData"


@pytest.mark.parametrize("group", ["strategy", "data", "partition", "model", "client", "devices"])
def test_every_option_composes(group: str) -> None:
    for option in group_options(group):
        cfg = compose_config([f"{group}={option}"])
        assert "_target_" in cfg[group], (group, option)
