"""Every YAML option of every config group builds and runs one tiny round on the real engine.

Options are discovered from conf/, so a new option is covered the day it is added. An option
that cannot run on the tiny digits setup declares what it needs in NEEDS (a new text-only
option without an entry fails here: add its needs, don't skip it).
"""

from pathlib import Path

import pytest

from fedsim.config import GROUPS, compose_config, group_options
from fedsim.engine.simulation import simulate
from fedsim.records.results import read_metrics

pytestmark = pytest.mark.slow

TINY = ["num_clients=4", "num_rounds=1", "strategy.fraction_train=0.5", "runtime.progress=false"]
#: Asynchronous strategies sample no fraction: their knobs replace it.
ASYNC = {
    "fedbuff": ["strategy.concurrency=2", "strategy.buffer_size=2"],
    "fedcompass": [],
}
TEXT = ["data=chatterbot", "model=text_classifier", "model.max_length=16"]
NATURAL_LANGUAGES = ("english", "swedish", "yoruba")
HF_CSV = "hf.csv"

#: (group, option) -> overrides it needs beside TINY. "{tmp}" is the test's tmp folder.
NEEDS: dict[tuple[str, str], list[str]] = {
    # Two local steps: whether an option builds and trains does not need a whole epoch of MiniLM.
    ("data", "chatterbot"): [*TEXT[1:], "client.max_steps=2"],
    ("data", "hf"): [f"data.path={{tmp}}/{HF_CSV}", *TEXT[1:], "client.max_steps=2"],
    ("model", "text_classifier"): ["data=chatterbot", "model.max_length=16", "client.max_steps=2"],
    ("model", "text_scratch"): ["data=chatterbot", "model.max_length=16", "client.max_steps=2"],
    # Side-tuning and the peft baselines fine-tune the text backbone.
    **{
        ("client", name): [*TEXT, "client.max_steps=2"]
        for name in ("side_tuning", "pae_side_tuning", "lora", "ia3", "full_ft")
    },
    ("experiment", "mobile_side_tuning"): ["model.max_length=16", "client.max_steps=2"],
    ("experiment", "cyclic_text_scratch"): ["model.max_length=16", "client.max_steps=2"],
    # The tiny setup has 4 clients: a short stage over 2 of them.
    ("warm_start", "cyclic"): ["warm_start.num_cycles=1", "warm_start.clients_per_cycle=2"],
    # One client per language; three languages stand for the 28 (tests/test_data.py reads "all"):
    # with all 28 and whole epochs the case took 2 minutes.
    ("partition", "natural"): [
        *TEXT,
        f"data.languages=[{','.join(NATURAL_LANGUAGES)}]",
        f"num_clients={len(NATURAL_LANGUAGES)}",
        "strategy.fraction_train=0.5",
        "client.max_steps=2",
    ],
}


#: Options within an option (a strategy's knob values, a strategy on another client): one round
#: each, beside TINY.
VARIANTS: list[list[str]] = [
    ["strategy=heterofl", "devices=phones_mixed", "strategy.latency_budget_s=0.02"],
    ["strategy=fedrolex", "strategy.index_policy=random"],
    ["strategy=fedrolex", "strategy.index_policy=static"],
    [
        "strategy=whale_fl",
        "devices=phones_mixed",
        "strategy.utility=latency_fisher",
        "strategy.tradeoff=0.5",
        "strategy.fisher_window=2",
        "strategy.reference_quantile=0.9",
        "num_rounds=2",
    ],
    ["strategy=whale_fl", "devices=phones_mixed", "strategy.time_unit_s=1e-5", "num_rounds=3"],
    ["strategy=whale_fl", "client=side_tuning", *TEXT, "client.max_steps=2"],
    ["strategy=heterofl", "client=side_tuning", *TEXT, "client.max_steps=2"],
    # asynchronous strategies on the side-tuning client (FedCompass sets its local steps)
    ["strategy=fedbuff", "client=side_tuning", *TEXT, "client.max_steps=2", "num_rounds=2"],
    ["strategy=fedcompass", "client=side_tuning", *TEXT, "client.max_steps=2", "num_rounds=2"],
    ["strategy=fedcompass", "distillation=dfl", "devices=phones_mixed", "num_rounds=3"],
]


def _tiny(overrides: list[str]) -> list[str]:
    """TINY, with an asynchronous strategy's own knobs in place of the sampled fraction."""
    for option, knobs in ASYNC.items():
        if f"strategy={option}" in overrides:
            return [o for o in TINY if not o.startswith("strategy.")] + knobs
    return TINY


def _cases() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in group_options(group)]


def _write_hf_csv(folder: Path) -> None:
    rows = ["text,label"]
    for i in range(40):
        rows.append(f"what a wonderful sunny day number {i},happy")
        rows.append(f"this is a terrible rainy evening number {i},sad")
    (folder / HF_CSV).write_text("\n".join(rows) + "\n")


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(("group", "option"), _cases(), ids=lambda v: str(v))
def test_option_builds_and_runs_one_round(group: str, option: str, tmp_path: Path) -> None:
    _write_hf_csv(tmp_path)
    needs = [o.replace("{tmp}", str(tmp_path)) for o in NEEDS.get((group, option), [])]
    overrides = [f"{group}={option}", *_tiny([f"{group}={option}"]), *needs]
    cfg = compose_config(overrides)
    summary = simulate(cfg, tmp_path / "run")
    every_row = read_metrics(tmp_path / "run")
    rows = [row for row in every_row if row["phase"] == "train"]
    stage = [row for row in every_row if row["phase"] != "train"]  # only a warm start adds rows
    assert summary["status"] == "completed"
    assert len(rows) == 1 and rows[0]["num_clients"] >= 1
    assert len(stage) == (1 if (group, option) == ("warm_start", "cyclic") else 0)
    assert 0.0 <= rows[0]["accuracy"] <= 1.0


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda v: " ".join(v))
def test_option_variant_runs(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_config([*_tiny(overrides), *overrides])
    summary = simulate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert summary["status"] == "completed"
    assert rows[-1]["num_clients"] >= 1 and 0.0 <= rows[-1]["accuracy"] <= 1.0
