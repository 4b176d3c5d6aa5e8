"""ARCHITECTURE.md's recipes, each followed once: a strategy, a client behaviour, a device fleet
and a device effect of one's own, built from the config and run by fedsim as its own options
are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf
from recipe_examples import FrozenFirstLayer, MeanOfClients, OwnerBusy

from fedsim.clock.devices import DeviceEffect
from fedsim.config import compose_config
from fedsim.engine.simulation import simulate
from fedsim.errors import ConfigError
from fedsim.records.results import read_metrics
from fedsim.training.contract import ClientBehaviour, TrainContext

TINY = ["num_clients=4", "num_rounds=2", "strategy.fraction_train=1.0", "runtime.progress=false"]


def _reply(values: list[float], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(values, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, 1, "train")


def test_the_strategy_recipe_aggregates_by_hand_numbers(flower_identity) -> None:
    arrays, _ = MeanOfClients().aggregate_train(1, [_reply([0, 0], 1), _reply([2, 4], 3)])
    assert arrays is not None
    np.testing.assert_array_equal(arrays["w"].numpy(), [1.0, 2.0])  # FedAvg: [1.5, 3.0]


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the loop calls model(**inputs)
        return self.last(torch.relu(self.first(x)))


def test_the_client_behaviour_recipe_trains_all_but_the_first_layer() -> None:
    torch.manual_seed(0)
    model = _TwoLayers()
    data = {"x": torch.randn(8, 3), "label": torch.tensor([0, 1] * 4)}
    before = [p.detach().clone() for p in model.parameters()]
    ctx = TrainContext(0, 1, ConfigRecord(), torch.Generator().manual_seed(0), RecordDict())
    behaviour: ClientBehaviour = FrozenFirstLayer(batch_size=4)
    outcome = behaviour.train(model, data, ctx)
    after = list(model.parameters())
    assert outcome.num_steps == 2 and outcome.num_examples == 8
    assert torch.equal(after[0], before[0]) and after[0].requires_grad  # frozen, then restored
    assert not torch.equal(after[2], before[2])  # the rest trained


@pytest.mark.slow
def test_a_strategy_a_behaviour_and_a_fleet_of_ones_own_run(tmp_path: Path) -> None:
    cfg = compose_config(TINY)
    fleet = yaml.safe_load(Path(cfg_path("devices", "uniform")).read_text())
    fleet["profiles"][0].update(name="tablet", train_gflops=30.0)  # the fleet recipe: YAML only
    cfg.devices = OmegaConf.create(fleet)
    cfg.strategy = OmegaConf.create(
        {
            "_target_": "recipe_examples.MeanOfClients",
            "fraction_train": 1.0,
            "fraction_evaluate": 0.0,
        }
    )
    cfg.client = OmegaConf.create({"_target_": "recipe_examples.FrozenFirstLayer", "lr": 0.2})
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_clients"] == 4 for r in rows)
    assert rows[-1]["accuracy"] > 0.1
    clients = read_metrics(tmp_path / "run", "clients.jsonl")
    assert {c["device"] for c in clients} == {"tablet"}


def cfg_path(group: str, option: str) -> Path:
    from fedsim.config import CONF_DIR

    return CONF_DIR / group / f"{option}.yaml"


def test_the_device_effect_recipe_is_a_device_effect_and_a_bad_one_is_named() -> None:
    from fedsim.clock.devices import Fleet

    assert isinstance(OwnerBusy(p=0.5), DeviceEffect)
    fleet = yaml.safe_load(cfg_path("devices", "uniform").read_text())
    fleet.pop("_target_")
    with pytest.raises(ConfigError) as error:
        Fleet(**fleet, effects=[OwnerBusy(p=0.5), {"p": 0.5}])  # a _target_ left out
    assert str(error.value).startswith("devices.effects[1]=")


@pytest.mark.slow
def test_a_device_effect_of_ones_own_keeps_phones_out_as_drawn(tmp_path: Path) -> None:
    """OwnerBusy on the low-end phones of phones_mixed: exactly the rows its draws name are
    offline with its reason, nobody else is, and the same config gives the same rows."""
    overrides = ["num_clients=12", "num_rounds=3", "devices=phones_mixed", "seed=3"]
    # as on the command line: fedsim devices=phones_mixed '+devices.effects=[...]'
    effect = "+devices.effects=[{_target_:recipe_examples.OwnerBusy,p:0.5,tiers:[low]}]"
    cfg = compose_config([*TINY, *overrides, effect])
    plain = compose_config([*TINY, *overrides])
    for name, config in (("busy", cfg), ("again", cfg), ("plain", plain)):
        assert simulate(config, tmp_path / name)["status"] == "completed"
    rows = read_metrics(tmp_path / "busy", "clients.jsonl")
    assert rows == read_metrics(tmp_path / "again", "clients.jsonl")
    plain_rows = {
        (r["round"], r["partition_id"]): r
        for r in read_metrics(tmp_path / "plain", "clients.jsonl")
    }
    busy = OwnerBusy(p=0.5, tiers=["low"])
    expected = 0
    for row in rows:
        was = plain_rows[(row["round"], row["partition_id"])]
        in_use = was["outcome"] != "offline" and busy.check_in(
            3, row["partition_id"], row["round"], 0.0, _profile(row["device"])
        )
        if in_use:
            expected += 1
            assert row["outcome"] == "offline" and row["offline_reason"] == "in_use", row
        else:
            assert row["outcome"] == was["outcome"] and "offline_reason" not in row
    assert expected > 0  # seed 3 keeps some low-end phones out


def _profile(name: str):  # noqa: ANN202 - the fleet's profile of that name
    from fedsim.config import build

    fleet = build(compose_config(["devices=phones_mixed"]), "devices")
    return next(p for p in fleet.profiles if p.name == name)
