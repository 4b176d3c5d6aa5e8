"""Tests for fedsim.learning.data: real offline data, real flwr-datasets partitioners, no mocks."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError
from fedsim.learning.data import (
    ChatterbotData,
    DataSplits,
    DigitsData,
    HFData,
    build_partitioner,
    chatterbot_languages,
    partition_train,
    read_digits_table,
    stratified_split_indices,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = [
    # flwr's Dirichlet redraws warn before our ConfigError; datasets' sort warns about pyarrow 25
    pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning"),
    pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning"),
]


def group_cfg(group: str, name: str, seed: int = 0, **overrides: object) -> DictConfig:
    """A conf/<group>/<name>.yaml node inside a root config, as Hydra composes it."""
    root = OmegaConf.create({"seed": seed, group: OmegaConf.load(CONF / group / f"{name}.yaml")})
    for key, value in overrides.items():
        root[group][key] = value
    return root[group]


@functools.cache
def digits(seed: int = 0) -> DataSplits:
    return DigitsData(seed=seed).load()


@functools.cache
def chatterbot(languages: str = "english", deduplicate: bool = True) -> DataSplits:
    return ChatterbotData(languages=languages, deduplicate=deduplicate).load()


def partition_digits(name: str, seed: int, num_clients: int, **overrides: object) -> list:
    """Partition digits as a run with this seed would (the data seed is the run seed too)."""
    partitioner = build_partitioner(group_cfg("partition", name, seed, **overrides), num_clients)
    return partition_train(digits(seed), partitioner, num_clients)


def held_images(seed: int, parts: list) -> list[bytes]:
    """What each client holds (not just its row numbers): the bytes of its images, in order."""
    images = digits(seed).train.with_format("numpy")["image"][:]
    return [images[p].tobytes() for p in parts]


# ---- train/test split ----------------------------------------------------------------------


def test_stratified_split_indices_sizes_by_hand() -> None:
    strata = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3] * 1)
    train, test = stratified_split_indices(strata, 0.2, np.random.default_rng(0))
    # floor(0.2 * n + 0.5) clipped to [1, n - 1]: 10 -> 2, 5 -> 1, 2 -> 0 -> 1, 1 -> 0 (train only)
    assert Counter(strata[test].tolist()) == {0: 2, 1: 1, 2: 1}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(strata)))
    assert train.dtype == test.dtype == np.int64


def test_digits_shapes_ranges_and_stratification() -> None:
    splits = digits()
    assert (len(splits.train), len(splits.test)) == (1438, 359)  # 1,797 images
    assert splits.num_classes == 10 and splits.label_names == [str(d) for d in range(10)]
    assert splits.input_kind == "image"
    images = splits.train.with_format("numpy")["image"][:]
    assert images.shape == (1438, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0  # 0..16 scaled by 1/16
    train_counts = Counter(splits.train["label"][:])
    for label, num_test in Counter(splits.test["label"][:]).items():
        # each digit has 174..183 images; its test share is round(0.2 * n)
        assert num_test == int(np.floor(0.2 * (num_test + train_counts[label]) + 0.5))


def test_digits_are_read_as_scikit_learn_loads_them_without_importing_it() -> None:
    """The file is read as ``load_digits`` reads it; a process that loads digits skips sklearn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    table = read_digits_table()
    assert np.array_equal(table[:, :-1].reshape(-1, 8, 8), bunch.images)
    assert np.array_equal(table[:, -1].astype(np.int64), bunch.target)
    code = (
        "import sys; from fedsim.learning.data import DigitsData; DigitsData().load(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_seed_decides_split() -> None:
    again = DigitsData(seed=0).load()
    assert again.train["label"][:] == digits(0).train["label"][:]
    assert again.test["image"][:] == digits(0).test["image"][:]
    assert digits(1).test["image"][:] != digits(0).test["image"][:]


# ---- chatterbot ------------------------------------------------------------------------------


def test_chatterbot_english_raw_counts() -> None:
    # 4,332 utterances in 21 topic files. flower-notes' 4,419 counted the one english trivia
    # conversation written as a single 88-character string as 88 utterances: 4,332 - 1 + 88.
    splits = chatterbot("english", deduplicate=False)
    assert len(splits.train) + len(splits.test) == 4332
    assert splits.num_classes == 21
    assert (
        Counter(splits.train["label"][:] + splits.test["label"][:])[
            splits.label_names.index("tech_support")
        ]
        == 2100
    )


def test_chatterbot_english_deduplicated() -> None:
    splits = chatterbot("english")
    # 1,875 distinct texts; 7 ("Hello", "Yes.", ...) sit under two topics and are dropped
    assert len(splits.train) + len(splits.test) == 1868
    assert splits.num_classes == 21 and "health" in splits.label_names
    assert splits.input_kind == "text"
    assert set(splits.train.column_names) == {"text", "label", "language"}
    assert set(splits.test["label"][:]) == set(range(21))  # health's 9 utterances: 7 train, 2 test
    assert not set(splits.train["text"][:]) & set(splits.test["text"][:])


def test_chatterbot_all_languages_natural_partition() -> None:
    splits = chatterbot("all")
    languages = sorted(set(splits.train["language"][:]))
    assert languages == chatterbot_languages() and len(languages) == 28
    assert set(splits.test["language"][:]) == set(languages)
    partitioner = build_partitioner(group_cfg("partition", "natural"), 28)
    parts = partition_train(splits, partitioner, 28)
    train_languages = np.array(splits.train["language"][:])
    assert [set(train_languages[p]) for p in parts] == [{lang} for lang in languages]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(splits.train)))


# ---- HFData ----------------------------------------------------------------------------------

ROWS = [{"sentence": f"text {i}", "sentiment": ["pos", "neg", "neu"][i % 3]} for i in range(30)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_hf_data_local_file(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"reviews{suffix}", ROWS)
    splits = HFData(path=str(path), text_column="sentence", label_column="sentiment").load()
    assert splits.label_names == ["neg", "neu", "pos"]  # sorted, so stable across files
    assert (len(splits.train), len(splits.test)) == (24, 6)  # 10 per label, 2 of each held out
    assert set(splits.train.column_names) == {"text", "label"}
    for split in (splits.train, splits.test):
        for text, label in zip(split["text"][:], split["label"][:], strict=True):
            assert ["pos", "neg", "neu"][int(text.split()[1]) % 3] == splits.label_names[label]


def test_hf_data_int_labels_become_contiguous(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [7, 3][i % 2]} for i in range(10)]
    splits = HFData(path=str(write_rows(tmp_path / "d.csv", rows))).load()
    assert splits.label_names == ["3", "7"]
    assert Counter(splits.train["label"][:] + splits.test["label"][:]) == {0: 5, 1: 5}


def test_hf_data_keeps_class_label_names(tmp_path: Path) -> None:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
    )
    rows = {"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "d.parquet")
    splits = HFData(path=str(tmp_path / "d.parquet")).load()
    assert splits.label_names == ["pos", "neg"]  # the file's own order, not sorted


def test_data_yaml_builds_each_builder(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.csv", [{"text": "x", "label": i % 2} for i in range(10)])
    built = [
        instantiate(group_cfg("data", "digits", seed=3)),
        instantiate(group_cfg("data", "chatterbot", seed=3)),
        instantiate(group_cfg("data", "hf", seed=3, path=str(path))),
    ]
    assert [type(b) for b in built] == [DigitsData, ChatterbotData, HFData]
    assert all(b.seed == 3 for b in built)


# ---- partitioners ----------------------------------------------------------------------------

NUM_TRAIN = 1438


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {}), ("shard", {})],
)
def test_partitioner_disjoint_covering_and_seeded(name: str, overrides: dict) -> None:
    parts = partition_digits(name, 1, 10, **overrides)
    rows = np.concatenate(parts)
    assert len(parts) == 10 and all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert len(np.unique(rows)) == len(rows)  # no row in two clients
    if name == "shard":
        # 20 shards of floor(1438 / 20) = 71 rows: the last 18 label-sorted rows are unused
        assert len(rows) == 1420 and rows.max() < NUM_TRAIN
    else:
        assert len(rows) == NUM_TRAIN
    assert held_images(1, parts) == held_images(1, partition_digits(name, 1, 10, **overrides))
    # iid indices are always contiguous runs: the seed acts through the training order
    assert held_images(1, parts) != held_images(2, partition_digits(name, 2, 10, **overrides))


@pytest.mark.parametrize(("name", "most_labels"), [("pathological", 2), ("shard", 4)])
def test_label_skew_per_client(name: str, most_labels: int) -> None:
    # pathological: exactly 2 classes each; shard: 2 shards of 71 label-sorted rows, each
    # spanning at most 2 of the ~144-row classes. Indices wrongly left in sorted order would
    # give ~10 labels per client.
    labels = np.array(digits(1).train["label"][:])
    num_labels = [len(set(labels[p])) for p in partition_digits(name, 1, 10)]
    assert max(num_labels) <= most_labels and (name == "shard" or min(num_labels) == 2)


def test_partition_same_in_fresh_process() -> None:
    code = (
        "from tests.test_data import partition_digits\n"
        "print([p.tolist() for p in partition_digits('dirichlet', 5, 7)])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONHASHSEED": "123"},  # str hashing differs from this process
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out.splitlines()[-1]) == [
        p.tolist() for p in partition_digits("dirichlet", 5, 7)
    ]


# ---- errors ----------------------------------------------------------------------------------


def hf_in(tmp_path: Path, rows: list[dict] = ROWS, **kwargs: object) -> Callable[[], object]:
    """Loading ROWS (or rows) from a csv with these HFData arguments (text in `sentence`)."""
    path = write_rows(tmp_path / "d.csv", rows)
    return lambda: HFData(path=str(path), **{"text_column": "sentence", **kwargs}).load()


def hf_text_file(tmp_path: Path) -> Callable[[], object]:
    (tmp_path / "notes.txt").write_text("a")
    return lambda: HFData(path=str(tmp_path / "notes.txt")).load()


def partition_natural_digits(num_clients: int) -> object:
    partitioner = build_partitioner(group_cfg("partition", "natural", partition_by="label"), 3)
    return partition_train(digits(), partitioner, num_clients)


ERROR_CASES: dict[str, tuple[str, Callable[[Path], Callable[[], object]]]] = {
    "test_fraction_zero": ("data.test_fraction", lambda _: lambda: DigitsData(test_fraction=0)),
    "test_fraction_one": (
        "data.test_fraction",
        lambda _: lambda: HFData(path="x.csv", test_fraction=1),
    ),
    "unknown_language": ("data.languages", lambda _: lambda: ChatterbotData(languages=["klingon"])),
    "no_topic_big_enough": (
        "data.min_examples_per_class",
        lambda _: lambda: ChatterbotData(min_examples_per_class=10**6).load(),
    ),
    "missing_file": ("data.path", lambda tmp: lambda: HFData(path=str(tmp / "x.csv")).load()),
    "unknown_extension": ("data.path", hf_text_file),
    "hub_offline": ("data.path", lambda _: lambda: HFData(path="nobody/no-such-dataset").load()),
    "missing_text_column": ("data.text_column", lambda tmp: hf_in(tmp, text_column="body")),
    "missing_label_column": ("data.label_column", lambda tmp: hf_in(tmp)),  # no column "label"
    "missing_label_value": (
        "data.label_column",
        lambda tmp: hf_in(tmp, [*ROWS, {"sentence": "x"}], label_column="sentiment"),
    ),
    "text_column_not_text": (
        "data.text_column",
        lambda tmp: hf_in(
            tmp,
            [{"stars": i % 5, "y": i % 2} for i in range(9)],
            text_column="stars",
            label_column="y",
        ),
    ),
    "test_split_of_a_file": (
        "data.test_split",
        lambda tmp: hf_in(tmp, label_column="sentiment", test_split="test"),
    ),
    "alpha_zero": (
        "partition.alpha",
        lambda _: lambda: partition_digits("dirichlet", 0, 10, alpha=0),
    ),
    "alpha_negative_list": (
        "partition.alpha",
        lambda _: lambda: partition_digits("dirichlet", 0, 2, alpha=[1.0, -1.0]),
    ),
    "classes_per_client_zero": (
        "partition.num_classes_per_partition",
        lambda _: lambda: partition_digits("pathological", 0, 10, num_classes_per_partition=0),
    ),
    "classes_per_client_too_many": (
        "partition.num_classes_per_partition",
        lambda _: lambda: partition_digits("pathological", 0, 10, num_classes_per_partition=11),
    ),
    "bad_assignment_mode": (
        "partition.class_assignment_mode",
        lambda _: lambda: partition_digits("pathological", 0, 10, class_assignment_mode="bogus"),
    ),
    "unknown_partition_key": (
        "partition.beta",
        lambda _: lambda: partition_digits("iid", 0, 10, beta=1),
    ),
    "missing_partition_column": (
        "partition.partition_by",
        lambda _: lambda: partition_digits("dirichlet", 0, 10, partition_by="colour"),
    ),
    "no_clients": ("num_clients", lambda _: lambda: partition_digits("iid", 0, 0)),
    "more_clients_than_rows": (
        "num_clients",
        lambda _: lambda: partition_digits("iid", 0, NUM_TRAIN + 1),
    ),
    "natural_count_mismatch": ("num_clients", lambda _: lambda: partition_natural_digits(3)),
    "dirichlet_min_size_unreachable": (
        "partition.min_partition_size",
        lambda _: lambda: partition_digits("dirichlet", 0, 100, alpha=0.3, min_partition_size=10),
    ),
    "shards_do_not_fit": (
        "partition.num_shards_per_partition",
        lambda _: lambda: partition_digits("shard", 0, 1000),
    ),
}


@pytest.mark.parametrize(("key", "make"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_input_gives_one_line_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, make: Callable
) -> None:
    # Offline for real and at once: without these flags the hub client retries for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as caught:
        make(tmp_path)()
    message = str(caught.value)
    assert caught.value.key == key and message.startswith(f"{key}=") and "\n" not in message


def test_error_messages_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found; accepted: an existing .csv"):
        HFData(path=str(tmp_path / "x.csv")).load()
    with pytest.raises(ConfigError, match="sentence, sentiment"):  # the available columns
        hf_in(tmp_path, text_column="body")()
    with pytest.raises(ConfigError, match=r"num_clients=3: .*language.*: 28 \(bengali"):
        partition_train(
            chatterbot("all"), build_partitioner(group_cfg("partition", "natural"), 3), 3
        )
    with pytest.raises(ConfigError, match="from 1 to 1438"):
        partition_train(digits(), build_partitioner(group_cfg("partition", "iid"), 5), 0)


def test_a_worker_imports_no_plotting_and_flower_plotting_still_works() -> None:
    # Every Ray worker imports the workload; flwr-datasets' __init__ would pull in seaborn,
    # matplotlib and scipy.stats (fedsim/learning/flower_partitioners.py). A fresh interpreter
    # shows what a worker pays; then a user's call into flwr-datasets' plotting loads it.
    probe = (
        "import sys, json\n"
        "import fedsim.engine.worker\n"
        "heavy = [m for m in ('seaborn', 'matplotlib', 'scipy.stats') if m in sys.modules]\n"
        "from flwr_datasets.visualization import plot_label_distributions\n"
        "import flwr_datasets\n"
        "real = sys.modules['flwr_datasets.visualization']\n"
        "print(json.dumps({'heavy': heavy, 'callable': callable(plot_label_distributions),\n"
        "    'bound': flwr_datasets.visualization is real, 'seaborn': 'seaborn' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"heavy": [], "callable": True, "bound": True, "seaborn": True}
