"""Datasets (offline built-ins and Hugging Face) and their split into clients by flwr-datasets.

A data builder is a Hydra ``_target_`` class whose ``load()`` returns :class:`DataSplits`: a
shuffled training split to partition among clients, a held-out test split for centralized
evaluation, and the label names. Partitioning uses flwr-datasets' partitioners unchanged:
:func:`build_partitioner` instantiates one from ``conf/partition/*.yaml`` and
:func:`partition_train` turns it into one index array per client.

Every builder splits train/test the same way (:func:`stratified_split_indices`): per class, a
seeded ``round(test_fraction * size)`` rows go to test, at least one and never all, so a tiny
class (chatterbot english ``health``: 9 utterances) cannot crash the split. The training split is
returned in a seeded random order because flwr-datasets' ``IidPartitioner`` cuts contiguous
shards: with label-sorted rows its "IID" clients would each hold one class.
"""

from __future__ import annotations

import functools
import inspect
import operator
import typing
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import hydra
import numpy as np
import yaml
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from fedsim.checks import is_int, is_number
from fedsim.errors import ConfigError
from fedsim.learning.flower_partitioners import (
    DirichletPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
from fedsim.seeding import numpy_rng

__all__ = [
    "DataSplits",
    "DigitsData",
    "ChatterbotData",
    "HFData",
    "chatterbot_languages",
    "stratified_split_indices",
    "build_partitioner",
    "partition_train",
    "OnDemandPartitions",
]


@dataclass(frozen=True)
class DataSplits:
    """A loaded dataset: what every builder returns.

    ``train`` and ``test`` hold the input column (``image``: float32 array, or ``text``: str),
    ``label`` (a ``ClassLabel``, ints ``0..num_classes-1``) and possibly more columns (e.g.
    chatterbot's ``language``) that a natural-id partitioner can use.

    In datasets 4, ``split["label"]`` is a lazy ``Column`` that NumPy reads row by row (seconds
    per 100k rows); ``split["label"][:]`` is one batched read to a list.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    num_classes: int
    label_names: list[str]
    input_kind: str  # "image" or "text": the name of the input column


def stratified_split_indices(
    strata: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices ``0..len(strata)-1`` into train and test, stratum by stratum.

    A stratum of ``n >= 2`` rows sends ``floor(test_fraction * n + 0.5)`` of them, clipped to
    ``[1, n - 1]``, to test, so it appears in both splits; a one-row stratum stays in train.
    (scikit-learn's stratified split instead rejects one-row classes and may leave a small class
    out of test.)

    Parameters
    ----------
    strata
        One key per row (e.g. the label); rows with equal keys form a stratum.
    test_fraction
        Share of each stratum held out, in (0, 1).
    rng
        Source of the random choice of test rows and of the training order.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Train indices in random order and test indices in ascending order, both int64.

    """
    _, stratum_of_row = np.unique(strata, return_inverse=True)
    rows_by_stratum = np.argsort(stratum_of_row, kind="stable")
    bounds = np.cumsum(np.bincount(stratum_of_row))[:-1]
    train_parts, test_parts = [], []
    for rows in np.split(rows_by_stratum, bounds):
        rows = rng.permutation(rows)
        num_test = min(max(int(np.floor(test_fraction * len(rows) + 0.5)), 1), len(rows) - 1)
        test_parts.append(rows[:num_test])
        train_parts.append(rows[num_test:])
    train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    return train, np.sort(np.concatenate(test_parts)).astype(np.int64)


def _check_test_fraction(test_fraction: float) -> None:
    if not (is_number(test_fraction) and 0.0 < test_fraction < 1.0):
        raise ConfigError("data.test_fraction", test_fraction, "must be a number in (0, 1)")


def _splits_from_columns(
    columns: Mapping[str, np.ndarray],
    features: datasets.Features,
    strata: np.ndarray,
    label_names: list[str],
    input_kind: str,
    test_fraction: float,
    seed: int,
) -> DataSplits:
    """Split in-memory columns (one row per example) and wrap each split as a Dataset."""
    train_rows, test_rows = stratified_split_indices(
        strata, test_fraction, numpy_rng(seed, "data", "split")
    )

    def to_dataset(rows: np.ndarray) -> datasets.Dataset:
        table = {name: values[rows] for name, values in columns.items()}
        # Arrow takes str columns as lists, not NumPy object arrays.
        table = {k: v.tolist() if v.dtype == object else v for k, v in table.items()}
        return datasets.Dataset.from_dict(table, features=features)

    return DataSplits(
        train=to_dataset(train_rows),
        test=to_dataset(test_rows),
        num_classes=len(label_names),
        label_names=label_names,
        input_kind=input_kind,
    )


class DigitsData:
    """scikit-learn's handwritten digits: 1,797 grey 8x8 images of the digits 0-9.

    Parameters
    ----------
    test_fraction
        Share of each digit held out for the test split.
    seed
        Seed of the split and of the training order.

    """

    _MAX_PIXEL = 16.0  # load_digits counts 0..16 set pixels per 4x4 block of the original scan

    def __init__(self, test_fraction: float = 0.2, seed: int = 0) -> None:
        _check_test_fraction(test_fraction)
        self.test_fraction = test_fraction
        self.seed = seed

    def load(self) -> DataSplits:
        """Return digits with ``image`` (8x8 float32 in [0, 1]) and ``label`` columns."""
        table = read_digits_table()
        images = (table[:, :-1].reshape(-1, 8, 8) / self._MAX_PIXEL).astype(np.float32)
        labels = table[:, -1].astype(np.int64)  # (1797,), digits 0-9
        label_names = [str(digit) for digit in range(10)]
        features = datasets.Features(
            {
                "image": datasets.Array2D(shape=images.shape[1:], dtype="float32"),
                "label": datasets.ClassLabel(names=label_names),
            }
        )
        return _splits_from_columns(
            {"image": images, "label": labels},
            features,
            labels,
            label_names,
            "image",
            self.test_fraction,
            self.seed,
        )


def read_digits_table() -> np.ndarray:
    """scikit-learn's digits table (1797 rows: 64 pixel counts, then the digit), as float64.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``) exactly as
    ``sklearn.datasets.load_digits`` reads it (``np.loadtxt``, comma-separated), without
    importing scikit-learn: that import cost every process that loads digits (the driver and
    each Ray worker) 1-1.7 s of its start-up. ``tests/test_data.py`` checks the result equals
    ``load_digits``.
    """
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data", "digits", "needs scikit-learn installed (its digits file)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as text:
        return np.loadtxt(text, delimiter=",")


# Topic file stems that name the same topic as another language's stem (typos, singulars,
# Spanish names). Our decision: merge them so a topic is one label across languages.
_TOPIC_ALIASES = {
    "computer": "computers",
    "coversations": "conversations",
    "dinero": "money",
    "emociones": "emotion",
    "emotions": "emotion",
    "greeting": "greetings",
    "ia": "ai",
    "perfilbot": "botprofile",
    "profile": "botprofile",
    "psicologia": "psychology",
    "sport": "sports",
}
ALL_LANGUAGES = "all"


def _chatterbot_root() -> Path:
    return Path(str(resources.files("chatterbot_corpus") / "data"))


def chatterbot_languages() -> list[str]:
    """List the languages chatterbot-corpus ships (one folder each), sorted."""
    return sorted(p.name for p in _chatterbot_root().iterdir() if p.is_dir())


def _read_utterances(path: Path) -> list[str]:
    """Read the utterances of one topic file, whitespace-normalised, in file order.

    A conversation given as one string instead of a list (eight of them: english trivia,
    ukrainian) is kept as one utterance rather than split at a guessed " - ". Non-string
    entries (YAML numbers, booleans, nulls, nested lists) and blank strings are dropped: turning
    YAML's ``yes`` back into text would invent words.
    """
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    conversations = document.get("conversations") if isinstance(document, dict) else None
    texts = []
    for conversation in conversations or []:
        utterances = [conversation] if isinstance(conversation, str) else conversation
        for utterance in utterances if isinstance(utterances, list) else []:
            if isinstance(utterance, str) and (text := " ".join(utterance.split())):
                texts.append(text)
    return texts


class ChatterbotData:
    """Topic classification of chatterbot-corpus utterances (offline, 28 languages).

    Every utterance of ``<language>/<topic>.yml`` is one example labelled by its topic, the file
    stem lower-cased with the aliases above merged, so ``sports`` is one label in every language.
    Each row also carries its ``language``, for a natural partition by language.

    Parameters
    ----------
    languages
        Language folder names, one name, or ``"all"``.
    test_fraction
        Share of each (language, topic) group held out for the test split.
    seed
        Seed of the split and of the training order.
    min_examples_per_class
        Topics with fewer examples (over the chosen languages, after deduplication) are dropped.
    deduplicate
        Keep one copy of a text repeated within a language's topic, and drop a text that appears
        under two topics of one language (e.g. "Hello" in greetings and conversations): repeats
        would sit in both train and test. english tech_support repeats 20 texts 2,100 times.

    """

    def __init__(
        self,
        languages: Sequence[str] | str = ("english",),
        test_fraction: float = 0.2,
        seed: int = 0,
        min_examples_per_class: int = 5,
        deduplicate: bool = True,
    ) -> None:
        _check_test_fraction(test_fraction)
        available = chatterbot_languages()
        chosen = [languages] if isinstance(languages, str) else list(languages)
        if chosen == [ALL_LANGUAGES]:
            chosen = available
        if not chosen or any(language not in available for language in chosen):
            raise ConfigError(
                "data.languages",
                languages,
                f"must be '{ALL_LANGUAGES}' or a list drawn from: {', '.join(available)}",
            )
        if not is_int(min_examples_per_class):
            raise ConfigError(
                "data.min_examples_per_class", min_examples_per_class, "must be an integer >= 1"
            )
        self.languages = sorted(set(chosen))
        self.test_fraction = test_fraction
        self.seed = seed
        self.min_examples_per_class = min_examples_per_class
        self.deduplicate = deduplicate

    def _read_rows(self) -> list[tuple[str, str, str]]:
        """(language, topic, text) for every utterance of the chosen languages, deduplicated."""
        root = _chatterbot_root()
        rows = [
            (language, _TOPIC_ALIASES.get(path.stem.lower(), path.stem.lower()), text)
            for language in self.languages
            for path in sorted((root / language).glob("*.yml"))
            for text in _read_utterances(path)
        ]
        if not self.deduplicate:
            return rows
        topics_of_text: dict[tuple[str, str], set[str]] = defaultdict(set)
        for language, topic, text in rows:
            topics_of_text[language, text].add(topic)
        kept, seen = [], set()
        for language, topic, text in rows:
            if len(topics_of_text[language, text]) == 1 and (language, text) not in seen:
                seen.add((language, text))
                kept.append((language, topic, text))
        return kept

    def load(self) -> DataSplits:
        """Return utterances with ``text``, ``label`` and ``language`` columns."""
        rows = self._read_rows()
        counts: dict[str, int] = defaultdict(int)
        for _, topic, _ in rows:
            counts[topic] += 1
        label_names = sorted(t for t, n in counts.items() if n >= self.min_examples_per_class)
        if not label_names:
            raise ConfigError(
                "data.min_examples_per_class",
                self.min_examples_per_class,
                f"no topic has that many utterances in {', '.join(self.languages)}; lower it",
            )
        label_of = {name: i for i, name in enumerate(label_names)}
        rows = [row for row in rows if row[1] in label_of]
        languages = np.array([language for language, _, _ in rows], dtype=object)
        labels = np.array([label_of[topic] for _, topic, _ in rows], dtype=np.int64)
        texts = np.array([text for _, _, text in rows], dtype=object)
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=label_names),
                "language": datasets.Value("string"),
            }
        )
        # Stratify by (language, topic) so every language's topics are in both splits.
        strata = np.unique(languages, return_inverse=True)[1] * len(label_names) + labels
        return _splits_from_columns(
            {"text": texts, "label": labels, "language": languages},
            features,
            strata,
            label_names,
            "text",
            self.test_fraction,
            self.seed,
        )


_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_PATH_ACCEPTED = "an existing .csv/.json/.jsonl/.parquet file or a HF dataset name"


class HFData:
    """Text classification from a local file or a Hugging Face hub dataset.

    Parameters
    ----------
    path
        A ``.csv``/``.json``/``.jsonl``/``.parquet`` file, or a hub dataset name (needs network
        or the local HF cache; with ``HF_HUB_OFFLINE=1`` an uncached name fails at once instead
        of after about 25 s of retries).
    text_column, label_column
        Columns renamed to ``text`` and ``label``. Labels of any type become ints ``0..K-1`` in
        sorted order of their values; other columns are kept.
    split
        The split used for training (a local file is one split, named after this).
    test_split
        The hub split used for testing; ``None`` holds out ``test_fraction`` of ``split``,
        stratified by label.
    test_fraction
        Share of each label held out when ``test_split`` is ``None``.
    seed
        Seed of the held-out choice and of the training order.

    """

    def __init__(
        self,
        path: str = "???",
        text_column: str = "text",
        label_column: str = "label",
        split: str = "train",
        test_split: str | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        _check_test_fraction(test_fraction)
        if text_column == label_column:
            raise ConfigError("data.label_column", label_column, "must differ from text_column")
        self.path = path
        self.text_column = text_column
        self.label_column = label_column
        self.split = split
        self.test_split = test_split
        self.test_fraction = test_fraction
        self.seed = seed

    def _load_raw(self) -> dict[str, datasets.Dataset]:
        """Load the splits ``split`` (and ``test_split``) as they are, keyed by split name."""
        file = Path(self.path).expanduser()
        builder = _FILE_BUILDERS.get(file.suffix.lower())
        if builder is None and file.exists():
            raise ConfigError(
                "data.path", self.path, f"unknown file type; accepted: {_PATH_ACCEPTED}"
            )
        if builder is not None or file.is_absolute() or self.path.startswith((".", "~")):
            if builder is None or not file.is_file():
                raise ConfigError(
                    "data.path", self.path, f"file not found; accepted: {_PATH_ACCEPTED}"
                )
            if self.test_split is not None:
                raise ConfigError(
                    "data.test_split",
                    self.test_split,
                    "must be null for a local file (one split; test_fraction is held out)",
                )
            data_files = {self.split: str(file)}
            try:
                loaded_file = datasets.load_dataset(
                    builder, data_files=data_files, split=self.split
                )
            except Exception as exc:  # a corrupt or mis-typed file: one line, not a traceback
                reason = " ".join(str(exc).split())[:160]
                raise ConfigError(
                    "data.path", self.path, f"could not be read as {builder} ({reason})"
                ) from None
            return {self.split: loaded_file}
        try:
            loaded = datasets.load_dataset(self.path)
        except Exception as exc:  # any hub/network/cache failure is the same user error
            reason = " ".join(str(exc).split())[:200]
            raise ConfigError(
                "data.path",
                self.path,
                f"not a local file and not loadable from the HF hub or cache (offline? {reason}); "
                f"accepted: {_PATH_ACCEPTED}",
            ) from exc
        wanted = {"data.split": self.split, "data.test_split": self.test_split}
        for key, name in wanted.items():
            if name is not None and name not in loaded:
                raise ConfigError(key, name, f"must be a split of {self.path}: {', '.join(loaded)}")
        return {name: loaded[name] for name in wanted.values() if name is not None}

    def _standardise(
        self, dataset: datasets.Dataset, code_of: Mapping[Any, int], label_names: list[str]
    ) -> datasets.Dataset:
        """Rename the text column to ``text`` and encode the label column as ``label``."""
        try:
            codes = np.array([code_of[v] for v in dataset[self.label_column][:]], dtype=np.int64)
        except KeyError as exc:  # None, or ClassLabel's -1 for "unlabelled" (e.g. GLUE test)
            raise ConfigError(
                "data.label_column", self.label_column, f"must have a label in every row, not {exc}"
            ) from exc
        clashing = [c for c in ("text", "label") if c not in (self.text_column, self.label_column)]
        dataset = dataset.remove_columns(
            [self.label_column, *[c for c in clashing if c in dataset.column_names]]
        )
        if self.text_column != "text":
            dataset = dataset.rename_column(self.text_column, "text")
        dataset = dataset.add_column("label", codes)
        return dataset.cast_column("label", datasets.ClassLabel(names=label_names))

    def load(self) -> DataSplits:
        """Return the data with ``text`` (str) and ``label`` columns plus any others."""
        raw = self._load_raw()
        for dataset in raw.values():
            columns = ", ".join(dataset.column_names)
            for key, column in (
                ("data.text_column", self.text_column),
                ("data.label_column", self.label_column),
            ):
                if column not in dataset.column_names:
                    raise ConfigError(key, column, f"must be a column of {self.path}: {columns}")
            text_type = dataset.features[self.text_column]
            if getattr(text_type, "dtype", None) not in ("string", "large_string"):
                raise ConfigError(
                    "data.text_column", self.text_column, f"must hold strings, not {text_type}"
                )
        feature = raw[self.split].features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):  # hub data often names its labels already
            label_names = list(feature.names)
            code_of: dict[Any, int] = {i: i for i in range(len(label_names))}
        else:  # sorted by value (numbers numerically), named by str(value): stable across runs
            values = {v for d in raw.values() for v in d.unique(self.label_column) if v is not None}
            ordered = sorted(values, key=lambda v: (isinstance(v, str), v))
            label_names = [str(v) for v in ordered]
            code_of = {v: i for i, v in enumerate(ordered)}
        train = self._standardise(raw[self.split], code_of, label_names)
        rng = numpy_rng(self.seed, "data", "split")
        if self.test_split is None:
            train_rows, test_rows = stratified_split_indices(
                np.asarray(train["label"][:]), self.test_fraction, rng
            )
            test = train.select(test_rows).flatten_indices()
        else:
            train_rows = rng.permutation(len(train))
            test = self._standardise(raw[self.test_split], code_of, label_names)
        return DataSplits(
            train=train.select(train_rows).flatten_indices(),
            test=test,
            num_classes=len(label_names),
            label_names=label_names,
            input_kind="text",
        )


# ---- partitioning ------------------------------------------------------------------------------

_POSITIVE_NUMBER_ARGS = {"alpha"}
_POSITIVE_INT_ARGS = {
    "min_partition_size",  # an empty client cannot train, so >= 1 rather than flwr's >= 0
    "num_classes_per_partition",
    "num_shards_per_partition",
    "shard_size",
}


def _check_partition_arg(
    name: str, value: Any, params: Mapping[str, inspect.Parameter], cls: type
) -> None:
    """Raise ConfigError if ``partition.<name>`` is not an argument of ``cls`` or out of range."""
    key = f"partition.{name}"
    if name not in params:
        accepted = ", ".join(p for p in params if p != "num_partitions") or "no arguments"
        raise ConfigError(key, value, f"is not an argument of {cls.__name__}; accepted: {accepted}")
    if name in _POSITIVE_NUMBER_ARGS:
        values = value if isinstance(value, list) else [value]
        if not values or not all(is_number(v) and v > 0 for v in values):
            raise ConfigError(
                key, value, "must be a number > 0 (or a list of them, one per client)"
            )
    if name in _POSITIVE_INT_ARGS and not (value is None and params[name].default is None):
        if not is_int(value):
            raise ConfigError(key, value, "must be an integer >= 1")
    annotation = params[name].annotation
    if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
        raise ConfigError(
            key, value, f"must be one of: {', '.join(map(str, typing.get_args(annotation)))}"
        )


def build_partitioner(partition_cfg: DictConfig, num_partitions: int) -> Partitioner:
    """Instantiate a flwr-datasets partitioner from its config, checking its arguments.

    ``num_partitions`` is passed only to classes that take it: a natural-id partitioner gets
    one partition per distinct id instead (checked against ``num_clients`` by
    :func:`partition_train`).

    Parameters
    ----------
    partition_cfg
        A ``conf/partition/*.yaml`` node: ``_target_`` plus constructor arguments.
    num_partitions
        The number of clients.

    Returns
    -------
    Partitioner
        The partitioner, with no dataset assigned yet.

    """
    try:
        cls = hydra.utils.get_class(partition_cfg._target_)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            "partition._target_", partition_cfg._target_, "must name a class"
        ) from exc
    params = inspect.signature(cls, eval_str=True).parameters
    arguments = OmegaConf.to_container(partition_cfg, resolve=True)
    assert isinstance(arguments, dict)
    for name, value in arguments.items():
        if name != "_target_":
            _check_partition_arg(str(name), value, params, cls)
    injected = {}
    if "num_partitions" in params:
        if not is_int(num_partitions):
            raise ConfigError("num_clients", num_partitions, "must be an integer >= 1")
        injected["num_partitions"] = num_partitions
    try:
        return hydra.utils.instantiate(partition_cfg, _convert_="all", **injected)
    except InstantiationException as exc:
        reason = exc.__cause__ or exc
        raise ConfigError("partition", cls.__name__, f"cannot be built: {reason}") from exc


# When flwr-datasets refuses a partitioning: the argument to change and how. Keyed by class only
# to word the error message; behaviour never depends on it.
_REFUSAL_ADVICE: dict[type[Partitioner], tuple[str, str]] = {
    DirichletPartitioner: (
        "min_partition_size",
        "was not reached by every client; lower it, raise partition.alpha or use fewer num_clients",
    ),
    PathologicalPartitioner: (
        "num_classes_per_partition",
        "must not exceed the classes, and each class needs at least as many examples as clients "
        "holding it; lower it or num_clients",
    ),
    ShardPartitioner: (
        "num_shards_per_partition",
        "num_clients x num_shards_per_partition shards of >= 1 example must fit in the training "
        "split; lower either",
    ),
}
_ROW = "__fedsim_row__"  # original row number, carried through any sort a partitioner does


def _refusal(partitioner: Partitioner, problem: str) -> ConfigError:
    """Word a refusal as a ConfigError on the argument to change (flwr keeps it as `_<name>`)."""
    name, advice = _REFUSAL_ADVICE.get(
        type(partitioner), ("", "change the partition settings or num_clients")
    )
    key = f"partition.{name}" if name else "partition"
    value = getattr(partitioner, f"_{name}", None) if name else type(partitioner).__name__
    return ConfigError(key, value, f"{advice} ({problem})")


def _partition_count_rule(partitioner: Partitioner) -> str:
    """Say what ``num_clients`` must be for a partitioner whose partition count differs."""
    if isinstance(partitioner, NaturalIdPartitioner):
        ids = list(partitioner.partition_id_to_natural_id.values())
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        return (
            f"must equal the number of distinct `{getattr(partitioner, '_partition_by', '?')}` "
            f"values for a natural partition: {len(ids)} ({shown})"
        )
    return f"must equal the partitioner's num_partitions ({partitioner.num_partitions})"


class OnDemandPartitions(Sequence[np.ndarray]):
    """Every client's row indices, each computed when asked (a partitioner's pure function).

    A population far larger than the data (``SampledPartitioner``, 1,000,000 clients) would
    otherwise hold ``num_clients`` index arrays in the server and in every worker (about 250
    bytes and 40 us of drawing per client). Memory is O(clients asked for): the last
    ``cache_size`` answers are kept, since a round asks for its clients several times (lane
    balancing, costing, training).

    Parameters
    ----------
    num_clients
        Number of partitions (client ids ``0 .. num_clients - 1``).
    indices_fn
        ``indices_fn(pid)``: the int64 row indices of client ``pid``.
    cache_size
        How many clients' indices are kept (least recently used go first).

    """

    def __init__(
        self, num_clients: int, indices_fn: Callable[[int], np.ndarray], cache_size: int = 4096
    ) -> None:
        self._num_clients = num_clients
        self._indices = functools.lru_cache(maxsize=cache_size)(indices_fn)

    def __len__(self) -> int:
        return self._num_clients

    @typing.overload
    def __getitem__(self, pid: int) -> np.ndarray: ...

    @typing.overload
    def __getitem__(self, pid: slice) -> list[np.ndarray]: ...

    def __getitem__(self, pid: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(pid, slice):
            return [self[i] for i in range(*pid.indices(self._num_clients))]
        index = operator.index(pid)
        if index < 0:
            index += self._num_clients
        if not 0 <= index < self._num_clients:
            raise IndexError(f"partition {pid} of {self._num_clients}")
        return self._indices(index)


def partition_train(
    splits: DataSplits, partitioner: Partitioner, num_clients: int
) -> Sequence[np.ndarray]:
    """Assign the training split to ``partitioner`` and return each client's row indices.

    The partitioner is given a slim copy of ``splits.train``: its ``partition_by`` column (if
    any) plus the row number, which maps indices back after a partitioner sorts its copy.

    Parameters
    ----------
    splits
        The loaded data; only ``splits.train`` is partitioned.
    partitioner
        A fresh partitioner from :func:`build_partitioner` (a dataset can be assigned once).
    num_clients
        The number of clients; partition ``i`` is client ``i``.

    Returns
    -------
    Sequence[np.ndarray]
        ``num_clients`` int64 arrays of indices into ``splits.train``, in the partition's order:
        a list, or :class:`OnDemandPartitions` for a partitioner that computes any client's
        indices on demand (``partition_indices(pid)``, e.g. ``SampledPartitioner``).

    """
    num_rows = len(splits.train)
    max_clients = num_rows  # one row each at least, unless the partitioner lets clients overlap
    if getattr(partitioner, "allows_more_partitions_than_rows", False):
        max_clients = max(num_rows, num_clients)
    if not is_int(num_clients, 1, max_clients):
        raise ConfigError(
            "num_clients",
            num_clients,
            f"must be an integer from 1 to {max_clients} (the training examples available)",
        )
    partition_by = getattr(partitioner, "_partition_by", None)
    if partition_by is not None and partition_by not in splits.train.column_names:
        columns = ", ".join(splits.train.column_names)
        raise ConfigError(
            "partition.partition_by", partition_by, f"must be a column of the data: {columns}"
        )
    # Slim: every flwr horizontal partitioner reads only `partition_by`, and load_partition then
    # builds each partition's Dataset without copying image/text features.
    row_numbers = np.arange(num_rows, dtype=np.int64)
    if partition_by is None:
        partitioner.dataset = datasets.Dataset.from_dict({_ROW: row_numbers})
    else:
        by_column = splits.train.select_columns(partition_by)
        partitioner.dataset = by_column.add_column(_ROW, row_numbers)
    try:
        num_partitions = partitioner.num_partitions  # computes the whole assignment for most
        if num_partitions != num_clients:
            raise ConfigError("num_clients", num_clients, _partition_count_rule(partitioner))
        first = np.asarray(partitioner.load_partition(0)[_ROW][:], dtype=np.int64)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
        raise _refusal(partitioner, f"flwr-datasets: {exc}") from exc
    rows = np.asarray(partitioner.dataset[_ROW][:], dtype=np.int64)  # after any sort
    on_demand = getattr(partitioner, "partition_indices", None)
    if callable(on_demand):  # a pure function of the client id: drawn when a client is used
        return OnDemandPartitions(num_clients, lambda pid: rows[on_demand(pid)])
    # flwr-datasets 0.6 keeps the assignment as `_partition_id_to_indices`; reading it costs
    # microseconds per client where load_partition builds a Dataset (about a millisecond).
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and len(mapping) == num_clients:
        parts = [rows[np.asarray(mapping[pid], dtype=np.int64)] for pid in range(num_clients)]
    else:
        rest = [partitioner.load_partition(pid)[_ROW][:] for pid in range(1, num_clients)]
        parts = [first, *(np.asarray(r, dtype=np.int64) for r in rest)]
    empty = [pid for pid, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise _refusal(partitioner, f"{len(empty)} clients got no examples, e.g. client {empty[0]}")
    return parts
