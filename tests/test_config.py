"""The config tree composes: every experiment file (subfolders too) and the defaults."""

import pytest
from omegaconf import OmegaConf, open_dict

from fedsim.config import (
    CONF_DIR,
    NULL_AS_BEFORE,
    compose_config,
    config_hash,
    group_options,
    validate,
)

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
    assert cfg.data._target_ == "fedsim.learning.data.DigitsData"


@pytest.mark.parametrize("group", ["strategy", "data", "partition", "model", "client", "devices"])
def test_every_option_composes(group: str) -> None:
    for option in group_options(group):
        cfg = compose_config([f"{group}={option}"])
        assert "_target_" in cfg[group], (group, option)


# --- defaults that learn (issue 16 item 5) -------------------------------------------------------
@pytest.mark.parametrize("client", ["side_tuning", "pae_side_tuning"])
def test_side_tuning_picks_a_text_model_and_data_unless_told(client: str) -> None:
    cfg = compose_config([f"client={client}"])  # the default CNN on digits would be refused
    assert cfg.model._target_ == "fedsim.learning.models.TextClassifier"
    assert cfg.model.init == "pretrained"
    assert cfg.data._target_ == "fedsim.learning.data.ChatterbotData"
    told = compose_config([f"client={client}", "model=text_scratch", "data=hf", "data.path=x.csv"])
    assert told.model.init == "random" and told.data._target_ == "fedsim.learning.data.HFData"
    # the showcase composes exactly as it did when it chose model and data itself
    showcase = compose_config(["experiment=mobile_side_tuning"])
    assert showcase.model._target_ == cfg.model._target_ and "model" not in showcase.client


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ([], 0.2),  # the digits CNN's
        (["model=text_classifier", "data=chatterbot"], 0.05),  # MiniLM's, not the CNN's 0.2
        (["model=text_scratch", "data=chatterbot"], 0.2),
        (["model=text_classifier", "data=chatterbot", "client.lr=0.3"], 0.3),  # told: kept
        (["model=text_classifier", "data=chatterbot", "~model.sgd_lr"], 0.2),  # a model without
    ],
)
def test_local_sgd_takes_its_lr_from_the_model(overrides: list[str], lr: float) -> None:
    cfg = compose_config(overrides)
    assert OmegaConf.to_container(cfg, resolve=True)["client"]["lr"] == lr


@pytest.mark.parametrize("client", ["local_sgd", "lora", "side_tuning"])
def test_a_knob_added_at_null_keeps_the_hash_of_runs_made_before_it(client: str) -> None:
    # A run folder (or a finished sweep job) written before the cost-backbone keys existed has
    # none of them: composed today with them at null, its job must hash the same.
    extra = [] if client == "local_sgd" else ["model=text_classifier", "data=chatterbot"]
    today = compose_config([f"client={client}", *extra])
    before = today.copy()
    with open_dict(before):
        for group, key in NULL_AS_BEFORE:
            assert before[group][key] is None  # the neutral value, in every model and client
            del before[group][key]
    assert config_hash(today) == config_hash(before)
    priced = compose_config([f"client={client}", *extra, "model.cost_backbone=GPT-2"])
    assert config_hash(priced) != config_hash(today)  # a set knob is part of what is computed
