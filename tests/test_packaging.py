"""fedsim without the checkout: the wheel carries conf/ and the licence, installs into a fresh
venv and runs a simulation from a folder that is not the repository (issue 16 item 7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import fedsim

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


#: What a source distribution holds: the wheel is built from a copy of these, so that
#: setuptools' build/ folder never lands in (or races with another build of) the checkout.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fedsim", "strategies", "clients",
           "scripts", "conf")  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, source / name, ignore=skip)
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "would be ignored" not in proc.stderr  # every conf/ folder is declared
    (found,) = out.glob("fedsim-*.whl")
    return found


def test_the_wheel_carries_every_config_file_and_the_licence(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = REPO / "conf"
    shipped = {
        f"fedsim/conf/{p.relative_to(conf)}"
        for pattern in ("*.yaml", "*.csv", "*.md")  # configs, availability traces, their notes
        for p in conf.rglob(pattern)
    }
    assert len(shipped) > 40 and shipped <= names, sorted(shipped - names)
    info = f"fedsim-{fedsim.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    assert "Apache License" in zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE").decode()
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode())
    assert metadata["Version"] == fedsim.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("Project-URL") and metadata.get_all("Classifier")


def test_installed_wheel_runs_a_simulation_outside_the_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    # Nothing of this process's may reach the fresh venv: a PYTHONPATH naming the checkout
    # (with its fedsim.egg-info) made pip skip the wheel as "already installed" on CI.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Successfully installed fedsim" in proc.stdout, proc.stdout[-2000:]
    # The dependencies come from this venv's site-packages (no network here), added only now:
    # seen during the install, this checkout's fedsim dist-info made pip skip the wheel as
    # "already satisfied". A plain path line in a .pth adds the folder but not its own .pth
    # files, so the checkout's editable finder is not loaded: `fedsim` comes from the wheel.
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    Path(fresh_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run(
        [str(python), "-c", "import fedsim.config as c; print(c.__file__); print(c.CONF_DIR)"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    where = probe.stdout.split()
    assert all(Path(p).is_relative_to(fresh_site) for p in where), where  # not the checkout
    fedsim_cli = venv / "bin" / "fedsim"
    version = subprocess.run(
        [str(fedsim_cli), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert version.returncode == 0 and version.stdout.startswith(f"fedsim {fedsim.__version__} (")
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(fedsim_cli), "num_rounds=1", "num_clients=4", "strategy.fraction_train=1.0",
         "runtime.progress=false", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.1
