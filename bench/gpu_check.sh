#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the kernel tests compiled for real (no
# interpreter) and the benchmarks, with results under bench/results/ tagged with the GPU's
# name and the software versions. Meant for the lent GPU image (torch 2.11, triton 3.6, no
# internet): it installs nothing but this project (editable, no dependencies).
#
#   bash bench/gpu_check.sh                 # every step
#   bash bench/gpu_check.sh kernel-tests    # some steps, in the order given
#   RESULTS_DIR=/some/dir bash bench/gpu_check.sh   # write results elsewhere
#
# Each step runs even if an earlier one failed; the summary lists every step's status and the
# script exits non-zero if any failed.
#
# Adding a benchmark: write a function `step_<name>` (it runs from the repository root with
# $RESULTS set; write your files there, return non-zero on failure) and append <name> to
# STEPS below.
set -uo pipefail

STEPS=(env kernel-tests kernel-bench throughput-tiny throughput-sd train-throughput)

cd "$(dirname "$0")/.."
unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}

# ----------------------------------------------------------------------------- set-up

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check here." >&2
    exit 2
fi
if ! "$PY" -c "import ldm_fast.kernels" 2>/dev/null; then
    echo "gpu_check: installing the project (editable, --no-deps, offline)"
    if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e .; then
        # No usable setuptools/pip offline: lay out the package as pyproject maps it
        # (kernels/ → ldm_fast.kernels, export/ → ldm_fast.export) with symlinks instead.
        overlay=$(mktemp -d)
        mkdir "$overlay/ldm_fast"
        for f in "$PWD"/ldm_fast/*; do ln -s "$f" "$overlay/ldm_fast/"; done
        ln -s "$PWD/kernels" "$overlay/ldm_fast/kernels"
        ln -s "$PWD/export" "$overlay/ldm_fast/export"
        export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
        "$PY" -c "import ldm_fast.kernels" || {
            echo "gpu_check: could not make the project importable" >&2; exit 2; }
        echo "gpu_check: pip install failed; using a symlinked package layout in $overlay"
    fi
fi

GPU_SLUG=$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")
RESULTS=${RESULTS_DIR:-bench/results/gpu_check-$GPU_SLUG-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
export RESULTS

# ----------------------------------------------------------------------------- steps

step_env() {
    # GPU name, driver, versions: every other result file is read against this one.
    "$PY" - > "$RESULTS/env.json" <<'EOF'
import json, platform, subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                          "clocks.max.mem,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except Exception as e:  # noqa: BLE001
    smi = f"nvidia-smi unavailable: {e}"
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
                  "sm_count": p.multi_processor_count,
                  "memory_GiB": round(p.total_memory / 2**30, 1), "nvidia_smi": smi,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__,
                  "python": platform.python_version()}, indent=1))
EOF
    cat "$RESULTS/env.json"
}

step_kernel_tests() {
    # The same test files as on CPU, now on CUDA tensors with compiled kernels, plus the
    # GPU-only cases (SD shapes, autotuned and fixed configs, Inductor around the ops).
    if ! "$PY" -m pytest --version >/dev/null 2>&1; then
        echo "pytest is not installed on this machine: kernel tests not run" \
            | tee "$RESULTS/kernel-tests.log"
        return 1
    fi
    "$PY" -m pytest tests/test_kernels_groupnorm.py tests/test_kernels_attention.py \
        -m "gpu or not gpu" -p no:cacheprovider --durations=15 -rs \
        --junitxml="$RESULTS/kernel-tests.xml" 2>&1 | tee "$RESULTS/kernel-tests.log"
}

step_kernel_bench() {
    # GroupNorm(+SiLU) and attention vs eager PyTorch and torch.compile (bench/kernels.py).
    "$PY" bench/kernels.py --out "$RESULTS/kernels.json" 2>&1 | tee "$RESULTS/kernel-bench.log"
}

step_throughput_tiny() {
    # Sampling throughput of the tiny preset on every backend (bench/throughput.py): images/s,
    # UNet-step and decode latency, peak memory, speed-up over eager fp32, % of peak FLOP/s.
    "$PY" bench/throughput.py --sizes tiny --out "$RESULTS/throughput-tiny.json" 2>&1 \
        | tee "$RESULTS/throughput-tiny.log"
}

step_throughput_sd() {
    # The same for an SD1.5-sized UNet (random weights, 64×64 latents, guidance) and the KL-f8
    # decoder to 512²; compile time of each shape is reported apart from the timings.
    "$PY" bench/throughput.py --sizes sd --out "$RESULTS/throughput-sd.json" 2>&1 \
        | tee "$RESULTS/throughput-sd.log"
}

step_train_throughput() {
    # Training steps/s of both stages for eager / triton / compile, and cached latents vs
    # encoding every step (bench/train_throughput.py), at a GPU-sized batch.
    "$PY" bench/train_throughput.py --batch 64 --steps 20 --warmup 3 \
        --backends eager,triton,compile --out "$RESULTS/train_throughput.json" 2>&1 \
        | tee "$RESULTS/train_throughput.log"
}

# ----------------------------------------------------------------------------- driver

[ $# -gt 0 ] && STEPS=("$@")
declare -A STATUS
failed=0
for s in "${STEPS[@]}"; do
    fn="step_${s//-/_}"
    if ! declare -F "$fn" >/dev/null; then
        echo "gpu_check: unknown step '$s'" >&2; STATUS[$s]="unknown"; failed=1; continue
    fi
    echo "=== $s ($(date +%H:%M:%S))"
    start=$SECONDS
    "$fn"; rc=$?
    STATUS[$s]="rc=$rc, $((SECONDS - start)) s"
    [ $rc -ne 0 ] && failed=1
done

{
    echo "gpu_check $(date -Iseconds) on $GPU_SLUG"
    for s in "${STEPS[@]}"; do echo "  $s: ${STATUS[$s]}"; done
} | tee "$RESULTS/summary.txt"
echo "results in $RESULTS"
exit $failed
