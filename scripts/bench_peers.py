r"""Benchmark case ``peers``: the same FedAvg work in fedsim, Flower, pfl and FLGo (issue 19.2).

fedsim composes the workload and exports it (``export_workload``): every client's rows, the test
split, the initial weights and the model's layers, so that every framework trains exactly the
same partitions from the same initial model with the same clients per round (all of them),
local epochs, batch size, learning rate and gradient clip. Each peer runs in a virtual
environment of its own (``ensure_env``: ``--peers-dir``, default ``~/.cache/fedsim-peers``),
built once by this case with a constraints file that pins fedsim's torch (the CPU wheel); a dry
run is read first and the build refuses any ``nvidia-*``, ``cuda`` or ``triton`` package and any
torch, torchvision or torchaudio that is not a ``+cpu`` wheel (``gpu_packages``). Its
runner (``scripts/peers/<peer>_fedavg.py``) runs under the peer's Python, never importing fedsim.

Two workloads (``--peer-workload``):

* ``digits``: fedsim's default data, partition, model and client (sklearn digits, IID, the small
  CNN, 2 local epochs of batch 16 at lr 0.2, clip 10) with the engine cases' 100 clients, all
  sampled, for ``--rounds`` rounds;
* ``blazefl``: BlazeFL's benchmark shape (CIFAR-10 shaped: a CNN on 32x32x3 inputs, 100 clients
  all sampled, 5 rounds x 5 local epochs, batch 50, lr 0.1) on SYNTHETIC images
  (``SyntheticImages``: a fixed random template per class plus noise), ``--peer-examples``
  rows per client (CIFAR-10 has 500). fedsim's ``model=cnn`` with 3 channels, 5x5 kernels and
  widths 6, 16, 120 stands for BlazeFL's CNN (the PyTorch tutorial's: unpadded convs and a
  second hidden layer of 84, which ``model=cnn`` cannot express).

Per framework: ``cold_s`` (a fresh process: imports, start-up, rounds, final evaluation) and
``in_sweep_s`` (the steady cost of a run that follows another in one warm process: fedsim's job
2 of a multirun, as ``overhead_vs_plain`` takes it; pfl's and FLGo's second run in the runner's
process; Flower starts a process and its engine afresh for every run, as in
``speedup_vs_flower``, so its two figures are the same run), client-rounds/s in a sweep and the
final test accuracy. fedsim runs on both engines: ``fedsim`` (Ray, the default) and
``fedsim-inline`` (``runtime.engine=inline``: no Ray, the clients in turn in one process, as
pfl and FLGo train). ``peers`` holds, per peer, fedsim's speedups (peer seconds / fedsim
seconds; ``_inline``: against the inline engine) and the peer's accuracy; BlazeFL (Python
>= 3.12, not in fedsim's venv) appears with its PUBLISHED ratio to Flower only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fedsim.scripts.bench_common import multirun, run_fedsim

if TYPE_CHECKING:
    from torch import nn

    from fedsim.learning.data import DataSplits

__all__ = [
    "PEERS",
    "WORKLOADS",
    "PeerSpec",
    "SyntheticImages",
    "ensure_env",
    "gpu_packages",
    "export_workload",
    "peers",
    "run_peer",
]

PEERS_DIR = Path("~/.cache/fedsim-peers")
RUNNERS = Path(__file__).resolve().parent / "peers"
FORBIDDEN = ("nvidia-", "cuda", "triton")  # GPU stacks a CPU benchmark must never pull
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")  # each must be a +cpu wheel
MARKER = "fedsim-peer.json"  # written last: an env without it is rebuilt


@dataclass(frozen=True)
class PeerSpec:
    """A peer framework: what its venv installs and which runner drives it."""

    name: str
    version: str
    requirements: tuple[str, ...]  # installed with their dependencies, under the torch pin
    no_deps: tuple[str, ...] = ()  # installed alone (their declared deps would pull CUDA)
    why_no_deps: str = ""


PEERS: dict[str, PeerSpec] = {
    "pfl": PeerSpec("pfl", "0.6.0", ("pfl[pytorch]==0.6.0",)),
    "flgo": PeerSpec(
        "flgo",
        "0.4.4",
        # flgo 0.4.4's declared dependencies less torchvision and pynvml
        (
            "torch",
            "tqdm",
            "scipy",
            "matplotlib",
            "prettytable",
            "ujson",
            "pyyaml",
            "networkx",
            "requests",
            "toolz",
        ),
        ("flgo==0.4.4",),
        "flgo declares torchvision and pynvml: PyPI's torchvision 0.28.0 (torch 2.13.0's) bundles "
        "libcudart and libnvjpeg, pynvml pulls nvidia-ml-py; FLGo's FedAvg imports neither "
        "(torchvision: algorithm/standalone.py and utils/submodule.py; pynvml: in a try)",
    ),
}

#: BlazeFL needs Python >= 3.12 (fedsim's venv is 3.11): its own figure, never measured here.
BLAZEFL_PUBLISHED = {
    "measured": False,
    "speedup_vs_flower_published": 3.1,
    "what": "up to 3.1x faster than Flower (Ray backend) on communication-dominated CIFAR-10 "
    "workloads (CNN, 100 clients, 5 rounds x 5 local epochs, batch 50; 32-core EPYC 7542, "
    "free-threaded Python 3.13); the CNN's seconds (about 30 against Flower's 92) are in the "
    "README's plot only, not in its text",
    "source": "Azuma & Nishio, BlazeFL: Fast and Deterministic Federated Learning Simulation, "
    "arXiv:2604.03606 (FedVision @ CVPR 2026); github.com/blazefl/blazefl README, Simulation "
    "Benchmarks",
}


# --------------------------------------------------------------------------- workloads
class SyntheticImages:
    """``num_train`` synthetic C x H x W images of ``num_classes`` classes: a data builder.

    Each class has a fixed random template (standard normal pixels); an image is its class's
    template times ``signal`` plus standard normal noise, so the classes are learnable and the
    accuracy says whether a framework trained. Labels are drawn uniformly. Stands in for
    CIFAR-10 in BlazeFL's benchmark shape (same tensor shapes, not the same images).
    """

    def __init__(
        self,
        num_train: int,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        signal: float = 0.3,
    ) -> None:
        self.num_train, self.test_fraction, self.seed = num_train, test_fraction, seed
        self.num_classes, self.shape, self.signal = (
            num_classes,
            (channels, image_size, image_size),
            signal,
        )

    def load(self) -> DataSplits:
        """Train (``num_train`` rows) and test (``test_fraction`` of all rows) splits."""
        import datasets
        import numpy as np

        from fedsim.learning.data import DataSplits
        from fedsim.seeding import numpy_rng

        rng = numpy_rng(self.seed, "synthetic-images")
        templates = rng.standard_normal((self.num_classes, *self.shape), dtype=np.float32)
        num_test = max(
            self.num_classes, round(self.num_train * self.test_fraction / (1 - self.test_fraction))
        )
        names = [str(k) for k in range(self.num_classes)]
        features = datasets.Features(
            {
                "image": datasets.Array3D(shape=self.shape, dtype="float32"),
                "label": datasets.ClassLabel(names=names),
            }
        )

        def split(n: int) -> datasets.Dataset:
            labels = rng.integers(self.num_classes, size=n)
            noise = rng.standard_normal((n, *self.shape), dtype=np.float32)
            images = self.signal * templates[labels] + noise
            return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

        return DataSplits(split(self.num_train), split(num_test), self.num_classes, names, "image")


def _digits(args: argparse.Namespace) -> list[str]:
    from fedsim.scripts.bench_engine import ALL_SAMPLED

    return [*ALL_SAMPLED, f"num_rounds={args.rounds}"]


def _blazefl(args: argparse.Namespace) -> list[str]:
    clients = 100
    return [
        f"num_clients={clients}",
        "strategy.fraction_train=1.0",
        "num_rounds=5",
        "client.local_epochs=5",
        "client.batch_size=50",
        "client.lr=0.1",  # BlazeFL's benchmark (benchmarks/blazefl-case/main.py)
        "model.in_channels=3",
        "model.image_size=32",
        "model.channels=[6,16]",
        "model.kernel_size=5",
        "model.hidden_size=120",
        f"data._target_={__name__}.SyntheticImages",
        f"+data.num_train={clients * args.peer_examples}",
    ]


#: workload name -> Hydra overrides of fedsim's config (all clients sampled every round)
WORKLOADS = {"digits": _digits, "blazefl": _blazefl}
WORKLOAD_NOTES = {
    "digits": "sklearn digits (real data), fedsim's default model/partition/client",
    "blazefl": "BlazeFL's shape on SYNTHETIC 32x32x3 images (not CIFAR-10)",
}


def _peer_common() -> ModuleType:
    """``scripts/peers/peer_common.py`` (plain torch), loaded by path: the runners' own helpers."""
    spec = importlib.util.spec_from_file_location("peer_common", RUNNERS / "peer_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("peer_common", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


#: constructor arguments that rebuild each layer kind (``peer_common.LAYERS``)
_LAYER_ARGS = {
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding"),
    "Linear": ("in_features", "out_features"),
    "ReLU": (),
    "MaxPool2d": ("kernel_size", "stride"),
    "Flatten": ("start_dim", "end_dim"),
}


def layer_spec(module: nn.Module) -> list[list[Any]]:
    """``module``'s children as ``[name, kind, kwargs or children]`` for ``build_model``."""
    from torch import nn

    spec: list[list[Any]] = []
    for name, child in module.named_children():
        kind = type(child).__name__
        if isinstance(child, nn.Sequential):
            spec.append([name, "Sequential", layer_spec(child)])
        elif kind in _LAYER_ARGS:
            spec.append([name, kind, {key: getattr(child, key) for key in _LAYER_ARGS[kind]}])
        else:
            raise ValueError(f"layer {name!r} ({kind}) cannot be exported to the peers")
    return spec


def export_workload(overrides: list[str], folder: Path) -> dict[str, Any]:
    """Write fedsim's workload for ``overrides`` as ``workload.json`` + ``workload.npz``."""
    import numpy as np
    import torch

    from fedsim.config import compose_config
    from fedsim.learning.workload import get_workload

    cfg = compose_config(overrides)
    workload = get_workload(cfg)
    model = workload.build_model()
    spec = layer_spec(model)
    rebuilt = _peer_common().build_model(spec)
    rebuilt.load_state_dict(model.state_dict())  # same names and shapes, or it raises
    clients = [workload.client_data(pid) for pid in range(int(cfg.num_clients))]
    test = workload.test_features()
    with torch.no_grad():  # the rebuilt network computes what fedsim's does
        if not torch.equal(rebuilt(test["x"][:8]), model(test["x"][:8])):
            raise ValueError(f"{type(model).__name__} is not the sequence of its layers")
    sizes = [len(c["label"]) for c in clients]
    arrays = {
        "client_x": torch.cat([c["x"] for c in clients]).numpy(),
        "client_y": torch.cat([c["label"] for c in clients]).numpy(),
        "client_bounds": np.cumsum([0, *sizes]),
        "test_x": test["x"].numpy(),
        "test_y": test["label"].numpy(),
    } | {f"init/{k}": v.numpy() for k, v in model.state_dict().items()}
    settings = {
        "model": spec,
        "num_clients": int(cfg.num_clients),
        "num_rounds": int(cfg.num_rounds),
        "local_epochs": int(cfg.client.local_epochs),
        "batch_size": int(cfg.client.batch_size),
        "lr": float(cfg.client.lr),
        "max_grad_norm": cfg.client.max_grad_norm,
        "seed": int(cfg.seed),
        "overrides": overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "workload.npz", **arrays)
    (folder / "workload.json").write_text(json.dumps(settings, indent=2))
    return settings | {"client_rows": sizes, "test_rows": len(test["label"])}


# --------------------------------------------------------------------------- peer environments
def _pip(python: Path, *args: str, log: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"pip failed ({done.returncode}), see {log}: {done.stderr[-500:]}")
    return done


def _would_install(python: Path, packages: list[str], pins: Path, log: Path) -> list[str]:
    """``name==version`` of everything pip would install for ``packages`` (a dry run)."""
    report = log.parent / "dry-run.json"
    _pip(
        python,
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        "-c",
        str(pins),
        *packages,
        log=log,
    )
    items = json.loads(report.read_text())["install"]
    return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]


def gpu_packages(planned: list[str]) -> list[str]:
    """The ``name==version`` entries that bring a GPU stack: CUDA packages, non-CPU torch wheels.

    PyPI's Linux torch and torchvision wheels are CUDA builds (torchvision bundles libcudart
    without declaring it); only a ``+cpu`` local version is the CPU build.
    """
    bad = []
    for entry in planned:
        name, _, version = entry.lower().partition("==")
        if any(word in name for word in FORBIDDEN) or (
            name in TORCH_FAMILY and not version.endswith("+cpu")
        ):
            bad.append(entry)
    return bad


def ensure_env(peer: PeerSpec, peers_dir: Path) -> Path:
    """The Python of ``peer``'s venv under ``peers_dir``, built on first use; reused after.

    Two processes asking for the same venv at once (two benchmarks, two test workers) take turns
    on a lock file beside it: the second finds the first one's venv built.
    """
    import fcntl

    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # fedsim's torch, the CPU wheel here
    env = peers_dir.expanduser() / f"{peer.name}-{peer.version}"
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        return _build_env(peer, env, torch_pin)


def _build_env(peer: PeerSpec, env: Path, torch_pin: str) -> Path:
    python = env / "bin" / "python"
    wanted = {
        "requirements": list(peer.requirements),
        "no_deps": list(peer.no_deps),
        "pin": torch_pin,
    }
    marker = env / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted:
        return python
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    log, pins = env / "build.log", env / "constraints.txt"
    pins.write_text(torch_pin + "\n")
    planned = _would_install(python, list(peer.requirements), pins, log)
    bad = gpu_packages(planned)
    if bad:
        raise RuntimeError(f"{peer.name}'s venv would install GPU packages: {', '.join(bad)}")
    _pip(python, "install", "--quiet", "-c", str(pins), *peer.requirements, log=log)
    if peer.no_deps:
        _pip(python, "install", "--quiet", "--no-deps", *peer.no_deps, log=log)
    marker.write_text(json.dumps({"wanted": wanted, "installed": planned}, indent=2))
    return python


def run_peer(python: Path, peer: str, workload: Path, out: Path, runs: int = 2) -> dict[str, Any]:
    """Run ``scripts/peers/<peer>_fedavg.py`` in its venv; its figures plus ``cold_s``."""
    cmd = [
        str(python),
        str(RUNNERS / f"{peer}_fedavg.py"),
        "--workload",
        str(workload),
        "--runs",
        str(runs),
        "--out",
        str(out),
    ]
    log = out.with_suffix(".log")
    env = os.environ | {"MPLBACKEND": "Agg", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of fedsim's venv may leak into the peer's
    launched = time.time()
    with log.open("w") as handle:
        done = subprocess.run(
            cmd, cwd=out.parent, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{peer} runner failed ({done.returncode}), see {log}:\n{tail}")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures | {"cold_s": figures["runs"][0]["done_unix"] - launched}


# --------------------------------------------------------------------------- the case
def _flower(overrides: list[str], work: Path) -> dict[str, Any]:
    """Flower's quickstart-pattern baseline in a fresh process (every run of a sweep is one)."""
    figures = work / "flower.json"
    cmd = [
        sys.executable,
        "-m",
        "fedsim.scripts.flower_baseline",
        "--json",
        str(figures),
        *overrides,
    ]
    started = time.perf_counter()
    with (work / "flower.log").open("w") as handle:
        subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - started
    flower = json.loads(figures.read_text())
    return {
        "cold_s": wall,
        "in_sweep_s": wall,
        "accuracy": flower["accuracies"][-1],
        "rounds_s": flower["rounds_wall_s"],
    }


def _fedsim(overrides: list[str], rounds: int, work: Path) -> dict[str, Any]:
    """Time fedsim cold (a fresh process) and in a sweep (job 2 of a multirun after 1 round)."""
    cold = run_fedsim(overrides, work / "fedsim_cold")
    others = [o for o in overrides if not o.startswith("num_rounds=")]
    jobs, _ = multirun([*others, f"num_rounds=1,{rounds}"], work / "fedsim_sweep")
    return {
        "cold_s": cold["process_wall_s"],
        "in_sweep_s": jobs[1]["startup_s"] + jobs[1]["wall_time_s"],
        "accuracy": jobs[1]["final_accuracy"],
        "cold_accuracy": cold["final_accuracy"],
    }


#: fedsim on ``runtime.engine=inline`` (``fedsim`` alone: the default Ray engine)
INLINE = "fedsim-inline"


def _row(name: str, figures: dict[str, Any], client_rounds: int) -> str:
    rate = client_rounds / figures["in_sweep_s"]
    figures["client_rounds_per_s"] = rate
    return (
        f"  {name:<13} cold {figures['cold_s']:7.1f} s   in a sweep "
        f"{figures['in_sweep_s']:7.1f} s   {rate:8.1f} client-rounds/s   "
        f"accuracy {figures['accuracy']:.4f}"
    )


def peers(args: argparse.Namespace) -> dict[str, Any]:
    """fedsim, Flower and the ``--peers`` on one workload; fedsim's speedup over each."""
    work = Path(args.work_dir).resolve() / f"peers_{args.peer_workload}"
    shutil.rmtree(work, ignore_errors=True)  # the bench owns its work folder
    work.mkdir(parents=True)
    overrides = [
        *WORKLOADS[args.peer_workload](args),
        f"seed={args.seed}",
        "eval.num_clients_final=0",
    ]  # the peers score the test split only
    pythons = {name: ensure_env(PEERS[name], args.peers_dir) for name in args.peers}
    settings = export_workload(overrides, work / "workload")
    rounds, clients = settings["num_rounds"], settings["num_clients"]
    client_rounds = rounds * clients
    frameworks = {
        "fedsim": _fedsim(overrides, rounds, work),
        INLINE: _fedsim([*overrides, "runtime.engine=inline"], rounds, work / "inline"),
        "flower": _flower(overrides, work),
    }
    for name, python in pythons.items():
        figures = run_peer(python, name, work / "workload", work / f"{name}.json")
        frameworks[name] = {
            "cold_s": figures["cold_s"],
            "in_sweep_s": figures["runs"][-1]["wall_s"],
            "accuracy": figures["runs"][-1]["accuracy"],
            "version": figures["version"],
        }
    ours, ours_inline = frameworks["fedsim"], frameworks[INLINE]
    print(
        f"  workload {args.peer_workload}: {WORKLOAD_NOTES[args.peer_workload]}; {clients} "
        f"clients x {rounds} rounds, all sampled, {settings['local_epochs']} local epochs, "
        f"batch {settings['batch_size']}, lr {settings['lr']}, "
        f"{min(settings['client_rows'])}-{max(settings['client_rows'])} rows per client"
    )
    for name, figures in frameworks.items():
        print(_row(name, figures, client_rounds))
    speedups = {
        name: {
            "speedup_in_sweep": figures["in_sweep_s"] / ours["in_sweep_s"],
            "speedup_cold": figures["cold_s"] / ours["cold_s"],
            "speedup_in_sweep_inline": figures["in_sweep_s"] / ours_inline["in_sweep_s"],
            "speedup_cold_inline": figures["cold_s"] / ours_inline["cold_s"],
            "accuracy": figures["accuracy"],
        }
        for name, figures in frameworks.items()
        if name not in ("fedsim", INLINE)
    }
    flower_ratio = speedups["flower"]["speedup_in_sweep"]
    speedups["blazefl"] = BLAZEFL_PUBLISHED | {"fedsim_vs_flower_measured_in_sweep": flower_ratio}
    for name, ratio in speedups.items():
        if name != "blazefl":
            print(
                f"  fedsim vs {name}: {ratio['speedup_in_sweep']:.2f}x in a sweep, "
                f"{ratio['speedup_cold']:.2f}x cold; inline engine "
                f"{ratio['speedup_in_sweep_inline']:.2f}x in a sweep, "
                f"{ratio['speedup_cold_inline']:.2f}x cold"
            )
    print(
        f"  BlazeFL vs Flower: {BLAZEFL_PUBLISHED['speedup_vs_flower_published']}x PUBLISHED "
        f"(not measured here), fedsim vs Flower measured above: {flower_ratio:.2f}x"
    )
    return {
        "workload": args.peer_workload,
        "note": WORKLOAD_NOTES[args.peer_workload],
        "settings": {k: v for k, v in settings.items() if k != "model"},
        "frameworks": frameworks,
        "peers": speedups,
    }
