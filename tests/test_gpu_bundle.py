"""The GPU check's bundle (scripts/gpu_bundle.py) and script (scripts/gpu_check.sh), offline.

Building a bundle needs the package registry, so the suite checks the parts that decide what
the GPU machine gets: which packages are carried, that a wheel with files left out still
installs with pip and lists only what it installs, and that the check script deselects a test
that exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from fedsim.scripts.gpu_bundle import (
    CARRY_ANYWAY,
    IMAGE_LIST,
    NOT_NEEDED,
    image_packages,
    select,
    store_wheel,
    taken_from_image,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_image_list_parses_to_canonical_names(tmp_path: Path) -> None:
    listing = tmp_path / "image.txt"
    listing.write_text("# a comment\nPyYAML\n\nscikit_learn  # trailing\ntyping.extensions\n")
    assert image_packages(listing) == {"pyyaml", "scikit-learn", "typing-extensions"}
    shipped = image_packages(IMAGE_LIST)
    assert {"torch", "transformers", "numpy", "pytest"} <= shipped
    assert not {"flwr", "ray", "hydra-core"} & shipped  # why the bundle exists


def test_torch_is_always_the_images_and_version_sensitive_packages_are_carried() -> None:
    image = frozenset({"numpy", "peft", "rich"})
    # PyTorch's tree is the image's CUDA build, even where the names differ from the image's
    assert taken_from_image("torch", frozenset())
    assert taken_from_image("nvidia-cublas-cu12", frozenset())
    assert taken_from_image("triton", frozenset())
    assert taken_from_image("NumPy", image)
    assert "peft" in CARRY_ANYWAY and not taken_from_image("peft", image)
    resolved = {"torch": "2.13.0", "numpy": "2.4.6", "peft": "0.21.2", "flwr": "1.41.0",
                "rich": "14.3.4", "uv": "0.12.24", "ray": "2.55.1"}  # fmt: skip
    assert "uv" in NOT_NEEDED
    assert select(resolved, image) == {"flwr": "1.41.0", "peft": "0.21.2", "ray": "2.55.1"}


def _wheel(folder: Path) -> Path:
    """A real, minimal wheel: a package with a module and a folder the bundle leaves out."""
    wheel = folder / "tinypkg-1.0-py3-none-any.whl"
    files = {
        "tinypkg/__init__.py": "VALUE = 42\n",
        "tinypkg/jars/big.jar": "x" * 10_000,
        "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "tinypkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return wheel


def test_a_stored_wheel_leaves_files_out_and_still_installs(tmp_path: Path) -> None:
    source = _wheel(tmp_path)
    stored_dir = tmp_path / "stored"
    stored_dir.mkdir()
    store_wheel(source, stored_dir, drop=("tinypkg/jars/",))
    stored = stored_dir / source.name
    with zipfile.ZipFile(stored) as zf:
        names = zf.namelist()
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        record = zf.read("tinypkg-1.0.dist-info/RECORD").decode()
    assert "tinypkg/jars/big.jar" not in names and "tinypkg/__init__.py" in names
    assert "jars" not in record and "tinypkg/__init__.py" in record

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--target", str(target), str(stored)],
        check=True,
    )  # fmt: skip
    assert (target / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (target / "tinypkg" / "jars").exists()


def test_a_wheel_stored_without_dropping_keeps_every_file(tmp_path: Path) -> None:
    source = _wheel(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    store_wheel(source, out)
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(out / source.name) as b:
        assert {n: a.read(n) for n in a.namelist()} == {n: b.read(n) for n in b.namelist()}


def test_the_check_script_parses_and_deselects_a_test_that_exists() -> None:
    script = REPO / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    deselected = re.findall(r'-k "not (\w+)"', script.read_text())
    assert deselected, "the script no longer deselects the MiniLM-weights test"
    tests = (REPO / "tests" / "test_gpu.py").read_text()
    for name in deselected:
        assert f"def {name}(" in tests


def test_a_run_imports_nothing_the_bundle_leaves_out(tmp_path: Path) -> None:
    """A run (its clients too: the inline engine trains them in this process) loads none of it."""
    modules = sorted(n.replace("-", "_") for n in NOT_NEEDED)
    code = (
        "import sys\n"
        "from fedsim.config import compose_config\n"
        "from fedsim.engine.simulation import simulate\n"
        "cfg = compose_config(['num_clients=4', 'num_rounds=1', 'runtime.engine=inline',\n"
        "                      'runtime.progress=false'])\n"
        f"simulate(cfg, {str(tmp_path / 'run')!r})\n"
        f"print(sorted(set({modules!r}) & {{m.split('.')[0] for m in sys.modules}}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert done.stdout.strip().splitlines()[-1] == "[]"
