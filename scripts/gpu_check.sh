#!/usr/bin/env bash
# Issue 17's GPU check, in one call on a lent GPU machine (README "On GPUs", *Measuring on a lent
# GPU*). Build the bundle here first (make gpu-bundle: .gpu/bundle.tar.xz, ~41 MiB), then, with
# the device tool: run, carry [".gpu"], command "bash scripts/gpu_check.sh", timeout_s 560 (the
# steps' limits add up to about 9 minutes at most; a call's start takes a minute or two more).
#
# It installs the bundle's wheels and this tree into one folder on PYTHONPATH (the image's PyTorch
# stays the one used), then, each step under its own time limit so that a slow step still leaves
# the others' results:
#   1. env.txt     versions, the GPU, and fedsim importing from the installed tree;
#   2. tests.log   tests/test_gpu.py (the CUDA tests run; one CPU test needing MiniLM's weights,
#                  which the bundle leaves out, is deselected);
#   3. gpu_bench.json, bench.log   bench --cases gpu on MiniLM's architecture at random init;
#   4. bench_runs.tar.gz   the benchmark runs' metrics, clients and logs (no checkpoints).
# Everything goes to $OUT (the device tool brings it back), or .gpu/out elsewhere. Exit status:
# 0 all passed, 1 a step failed (each is still run), 3 the install failed.
#
# Rehearsal without a GPU (the CUDA tests and the benchmark then say they were skipped, and why):
#   .venv/bin/python scripts/gpu_bundle.py --python 3.11 --dest /tmp/g311 --image-venv /tmp/img311
#   GPU_BUNDLE=/tmp/g311/bundle.tar.xz GPU_PYTHON=/tmp/img311/bin/python bash scripts/gpu_check.sh
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/.gpu/out}
PY=${GPU_PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-$REPO/.gpu/bundle.tar.xz}
WORK=${GPU_WORK:-/tmp/fedsim-gpu}
TESTS_LIMIT=${GPU_TESTS_LIMIT:-200}  # seconds
BENCH_LIMIT=${GPU_BENCH_LIMIT:-300}
BENCH_ROUNDS=${GPU_BENCH_ROUNDS:-4}

mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
step() { echo "[gpu-check] $(date -u +%T) $*"; }
failed=0

step "unpacking $BUNDLE"
rm -rf "$WORK" && mkdir -p "$WORK/bundle" "$WORK/run" || exit 3
# Python's lzma, not tar -J: the image need not have xz
"$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$BUNDLE" "$WORK/bundle" || exit 3
SITE=$WORK/site
step "installing $(ls "$WORK"/bundle/wheels/*.whl | wc -l) wheels and fedsim into $SITE"
# fedsim is built from this tree by the bundle's setuptools (its PEP 639 licence needs 77+); it
# declares Python 3.11, where it is tested, and the image has 3.12
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/build-tools" "$WORK"/bundle/wheels/setuptools-*.whl || exit 3
PYTHONPATH=$WORK/build-tools "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
    --no-cache-dir --no-build-isolation --ignore-requires-python --target "$SITE" \
    "$WORK"/bundle/wheels/*.whl "$REPO" || exit 3
export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export FEDSIM_GPU_BACKBONE=$WORK/bundle/minilm-arch  # tests/test_gpu.py's side-tuning run
# not the tree's root: its fedsim/ folder is the source, not the installed package
cd "$WORK/run" || exit 3

step "env"
"$PY" - <<'EOF' | tee "$OUT/env.txt" || failed=1
import importlib.metadata as md, platform, torch, fedsim
print("python", platform.python_version(), "| fedsim", fedsim.__version__, "from", fedsim.__file__)
for name in ("torch", "ray", "flwr", "transformers", "peft", "tokenizers", "hydra-core", "numpy",
             "protobuf", "grpcio", "datasets", "flwr-datasets"):
    print(f"{name} {md.version(name)}")
print("cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
EOF

step "tests/test_gpu.py (limit ${TESTS_LIMIT}s)"
timeout "$TESTS_LIMIT" "$PY" -m pytest -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    -ra --durations=10 "$REPO/tests/test_gpu.py" \
    -k "not test_side_tuning_trains_where_the_context_says" \
    >"$OUT/tests.log" 2>&1 || failed=1
tail -n 25 "$OUT/tests.log"

step "bench --cases gpu, $BENCH_ROUNDS rounds (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" -m fedsim.scripts.bench --cases gpu --gpu-rounds "$BENCH_ROUNDS" \
    --out "$OUT/gpu_bench.json" --work-dir "$WORK/bench" \
    --overrides "model.backbone=$WORK/bundle/minilm-arch" model.init=random \
    >"$OUT/bench.log" 2>&1 || failed=1
tail -n 20 "$OUT/bench.log"
# a method whose run failed is recorded in the JSON (the other still measured): a failed step
grep -q '"failed"' "$OUT/gpu_bench.json" 2>/dev/null && failed=1
if [ -d "$WORK/bench" ]; then
    (cd "$WORK/bench" && find . \( -name '*.jsonl' -o -name '*.json' -o -name '*.log' \
        -o -name '*.yaml' \) -print0 | tar -czf "$OUT/bench_runs.tar.gz" --null -T -)
fi

step "done: $([ "$failed" = 0 ] && echo 'all steps passed' || echo 'a step failed'); files in $OUT"
exit "$failed"
