"""The layers of ARCHITECTURE.md, held by the imports: no module imports a layer above its own.

Every ``import`` statement of every module counts, a function's lazy ones included; an
``importlib`` call by a computed name does not (``fedsim.training.loop`` finds a strategy's client
term that way: a registry keyed by module name, never a fixed strategy). The few that still
go up are listed in :data:`KNOWN_UPWARD` with the reason; an entry that no longer occurs must be
removed (the list only shrinks), and a new upward import fails here with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folders -> the dotted package they are installed as (pyproject.toml's package-dir).
ROOTS = {"fedsim": "fedsim", "clients": "fedsim.clients", "strategies": "fedsim.strategies",
         "scripts": "fedsim.scripts"}  # fmt: skip

#: Bottom up. A module is in the layer of the longest prefix that names it.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("fedsim.errors", "fedsim.checks", "fedsim.seeding", "fedsim.keys", "fedsim.config"),
    "records": ("fedsim.records",),
    "learning": ("fedsim.learning",),
    "clock": ("fedsim.clock",),
    "training": ("fedsim.training",),
    "rounds": ("fedsim.rounds",),
    "engine": ("fedsim.engine",),
    "methods": ("fedsim.clients", "fedsim.strategies"),
    "entry": ("fedsim", "fedsim.api", "fedsim.__main__", "fedsim.scripts"),
}
ORDER = list(LAYERS)
#: What each layer may import besides itself: the layers below it, except that the methods
#: (client behaviours, strategies) stand beside the engine, not on it: they never import it,
#: and nothing below the entry points imports them (the config names them: Hydra builds them).
MAY_IMPORT = {name: set(ORDER[:i]) for i, name in enumerate(ORDER)}
MAY_IMPORT["methods"] -= {"engine"}

#: (importer, imported) pairs that still go up a layer, each with its reason. Only shrinks.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    best = max(
        ((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
         if module == prefix or module.startswith(prefix + ".")),
        key=lambda item: len(item[0]),
    )  # fmt: skip
    return best[1]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported fedsim module, line) for every import in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))  # fmt: skip
            for alias in node.names:  # `from fedsim.rounds import interrupt`: the module
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "fedsim"]


def upward_imports() -> dict[tuple[str, str], str]:
    known = modules()
    found = {}
    for module, path in known.items():
        mine = layer_of(module)
        for imported, line in imports_of(module, path, set(known)):
            theirs = layer_of(imported)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                found[(module, imported)] = f"{path.relative_to(REPO)}:{line}"
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    new = {pair: where for pair, where in upward_imports().items() if pair not in KNOWN_UPWARD}
    assert not new, "\n".join(
        f"{where}: {a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for (a, b), where in new.items()
    )


def test_the_list_of_known_upward_imports_only_shrinks() -> None:
    gone = set(KNOWN_UPWARD) - set(upward_imports())
    assert not gone, f"no longer imported: remove from KNOWN_UPWARD: {sorted(gone)}"


def test_every_source_module_has_a_layer() -> None:
    for module in modules():
        assert layer_of(module) in LAYERS


@pytest.mark.parametrize("importer", ["fedsim.learning.params", "fedsim.rounds.synchronous"])
def test_the_checker_sees_an_import_that_goes_up(importer: str, tmp_path: Path) -> None:
    # The rule, tried on a line it must refuse: a core module importing a method.
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from fedsim.clients.side_tuning import SideTuning\n")
    ((imported, line),) = imports_of(importer, path, set(modules()))
    assert (imported, line) == ("fedsim.clients.side_tuning", 2)
    assert layer_of(imported) not in MAY_IMPORT[layer_of(importer)]


def test_flwr_datasets_keeps_the_assignment_fedsim_reads() -> None:
    # fedsim/learning/data.py reads a partitioner's private `_partition_id_to_indices` (its one
    # contract with flwr-datasets' internals): it must still be what load_partition returns.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = [i % 4 for i in range(200)]
    partitioner = DirichletPartitioner(
        num_partitions=5, partition_by="label", alpha=0.5, min_partition_size=1, seed=0
    )
    partitioner.dataset = Dataset.from_dict({"label": labels, "row": list(range(200))})
    first = partitioner.load_partition(0)
    mapping = partitioner._partition_id_to_indices  # noqa: SLF001 - the contract under test
    assert isinstance(mapping, dict) and len(mapping) == 5
    assert list(first["row"]) == [int(i) for i in mapping[0]]
    assert sorted(int(i) for part in mapping.values() for i in part) == list(range(200))


def test_a_run_folder_written_before_the_move_reads_as_now(tmp_path: Path) -> None:
    import yaml
    from omegaconf import OmegaConf

    from fedsim.config import compose_config, config_hash, first_target, with_targets
    from fedsim.errors import ConfigError
    from fedsim.records.saved_config import load_saved_config

    cfg = compose_config(["warm_start=cyclic", "devices=phones_mixed"])
    tree = OmegaConf.to_container(cfg, resolve=True)
    before = with_targets(tree, first_target)  # as a folder written before the move holds it
    assert before["devices"]["_target_"] == "fedsim.devices.Fleet"
    assert before["warm_start"]["_target_"] == "fedsim.warm_start.CyclicWarmStart"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(before))
    loaded = load_saved_config(tmp_path)
    assert OmegaConf.to_container(loaded) == tree
    # the hash its checkpoint holds is the hash of the same config written today
    assert config_hash(loaded) == config_hash(cfg) == config_hash(OmegaConf.create(before))
    tampered = {**before, "devices": {**before["devices"], "_target_": "fedsim.devices.os"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tampered))
    with pytest.raises(ConfigError, match="devices._target_"):  # a moved module is no loophole
        load_saved_config(tmp_path)
