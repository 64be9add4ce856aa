#!/usr/bin/env bash
# Everything that needs a GPU, in one command sized for a 15-minute lease on a bare machine:
# the kernel tests compiled for real (no interpreter), the kernel and sampler-step benchmarks,
# the `auto` backend's measured table, sampling and training throughput. Meant for the lent
# GPU image (torch 2.11, triton 3.6, numpy, safetensors, tokenizers, PyYAML, tqdm, Pillow,
# pytest, onnx, onnxruntime; no diffusers, matplotlib or internet): it installs nothing but
# this project (editable, no dependencies). tests/test_gpu_check.py checks, on CPU, that
# every step imports with only those packages and handles its arguments.
#
#   bash bench/gpu_check.sh                 # every step, ≤ 10 min
#   bash bench/gpu_check.sh --quick         # the kernel steps and SD throughput, ≤ 5 min
#   bash bench/gpu_check.sh kernel-tests    # some steps, in the order given
#   bash bench/gpu_check.sh --list          # steps and their time budgets
#   RESULTS_DIR=/some/dir bash bench/gpu_check.sh
#
# Results go to $RESULTS_DIR, else $OUT (the folder a lent machine sends back), else
# bench/results/gpu_check-<GPU>-<time>. Every step writes its own files as it finishes, so a
# later failure loses nothing; each runs under `timeout` with its budget (the summary says
# "timed out"), and the script exits non-zero if any step failed.
#
# Adding a step: write `step_<name>` (it runs from the repository root with $RESULTS and
# $QUICK set; write your files there, return non-zero on failure), give it a budget in
# BUDGET and add it to STEPS.
set -uo pipefail

STEPS=(env kernel-tests kernel-bench sampler-bench kernel-defaults throughput-sd throughput-tiny
       train-throughput)
QUICK_STEPS=(env kernel-tests kernel-bench sampler-bench kernel-defaults throughput-sd)
# Seconds per step: full run, --quick run. Full ≤ 600 in all, quick ≤ 300.
declare -A BUDGET=([env]="30 30" [kernel-tests]="150 90" [kernel-bench]="150 70"
                   [sampler-bench]="40 25" [kernel-defaults]="10 10" [throughput-sd]="120 70"
                   [throughput-tiny]="45 0" [train-throughput]="55 0")
QUICK=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        --list) for s in "${STEPS[@]}"; do read -r full quick <<< "${BUDGET[$s]}"
                    echo "$s: ${full} s (quick: ${quick} s)"; done; exit 0 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option '$a' (try --help)" >&2; exit 2 ;;
        *) ARGS+=("$a") ;;
    esac
done
if [ ${#ARGS[@]} -gt 0 ]; then STEPS=("${ARGS[@]}"); elif [ $QUICK = 1 ]; then STEPS=("${QUICK_STEPS[@]}"); fi
for s in "${STEPS[@]}"; do
    if [ -z "${BUDGET[$s]:-}" ]; then echo "gpu_check: unknown step '$s' (try --list)" >&2; exit 2; fi
done
export QUICK

# ----------------------------------------------------------------------------- set-up

cd "$(dirname "$0")/.."
unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
export PYTHONUNBUFFERED=1
export PY=${PYTHON:-python}
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
RESULTS=${RESULTS_DIR:-${OUT:-bench/results/gpu_check-$GPU_SLUG-$(date +%Y%m%d-%H%M%S)}}
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
    # The kernel test files, now on CUDA tensors with compiled kernels, plus the GPU-only
    # cases (SD shapes, autotuned and fixed configs, Inductor around the ops, a real CUDA-graph
    # capture of the denoising step); --quick leaves out the Inductor/compile cases (each
    # compiles a fresh graph).
    local sel=()
    [ "$QUICK" = 1 ] && sel=(-k "not inductor and not compile")
    "$PY" -m pytest tests/test_kernels_groupnorm.py tests/test_kernels_attention.py \
        tests/test_kernels_sampler_steps.py tests/test_kernels_geglu.py \
        tests/test_kernels_add_layernorm.py tests/test_kernels_models.py \
        tests/test_fast_path.py tests/test_cuda_graph.py \
        -m "gpu or not gpu" -p no:cacheprovider --durations=15 -rs "${sel[@]}" \
        --junitxml="$RESULTS/kernel-tests.xml" 2>&1 | tee "$RESULTS/kernel-tests.log"
}

step_kernel_bench() {
    # GroupNorm(+SiLU) and attention vs eager PyTorch and torch.compile (bench/kernels.py),
    # autotuned once per shape; --quick: bf16 at the SD shapes only.
    local a=(--sizes sd,tiny --dtype fp16,bf16)
    [ "$QUICK" = 1 ] && a=(--sizes sd --dtype bf16)
    "$PY" bench/kernels.py "${a[@]}" --out "$RESULTS/kernels.json" 2>&1 \
        | tee "$RESULTS/kernel-bench.log"
}

step_sampler_bench() {
    # The fused sampler updates vs their eager chains (bench/sampler_steps.py).
    local a=()
    [ "$QUICK" = 1 ] && a=(--sizes sd-512,large --no-compile)
    "$PY" bench/sampler_steps.py "${a[@]}" --out "$RESULTS/sampler_steps.json" 2>&1 \
        | tee "$RESULTS/sampler-bench.log"
}

step_kernel_defaults() {
    # Which kernels beat eager at every SD shape: the `auto` backend's table, to be reviewed
    # and committed as kernels/measured_defaults.json (bench/kernel_defaults.py).
    "$PY" bench/kernel_defaults.py "$RESULTS" 2>&1 | tee "$RESULTS/kernel-defaults.log"
}

step_throughput_sd() {
    # Sampling throughput of an SD1.5-sized UNet (random weights, 64×64 latents, guidance) and
    # the KL-f8 decoder to 512² on every backend; compile time reported apart from timings.
    local a=()
    [ "$QUICK" = 1 ] && a=(--batches 2 --steps 10 --reps 5 --sample-reps 1)
    "$PY" bench/throughput.py --sizes sd "${a[@]}" --out "$RESULTS/throughput-sd.json" 2>&1 \
        | tee "$RESULTS/throughput-sd.log"
}

step_throughput_tiny() {
    # The same for the tiny preset.
    "$PY" bench/throughput.py --sizes tiny --reps 5 --sample-reps 1 \
        --out "$RESULTS/throughput-tiny.json" 2>&1 | tee "$RESULTS/throughput-tiny.log"
}

step_train_throughput() {
    # Training steps/s of both stages for eager / triton / compile, and cached latents vs
    # encoding every step (bench/train_throughput.py), at a GPU-sized batch.
    "$PY" bench/train_throughput.py --batch 64 --steps 10 --warmup 2 \
        --backends eager,triton,compile --out "$RESULTS/train_throughput.json" 2>&1 \
        | tee "$RESULTS/train_throughput.log"
}

# ----------------------------------------------------------------------------- driver

declare -A STATUS
failed=0
for s in "${STEPS[@]}"; do
    fn="step_${s//-/_}"
    read -r full quick <<< "${BUDGET[$s]}"
    budget=$full; [ "$QUICK" = 1 ] && budget=$quick
    [ "$budget" = 0 ] && budget=$full    # a full-only step asked for by name under --quick
    echo "=== $s ($(date +%H:%M:%S), budget ${budget} s)"
    start=$SECONDS
    # The step runs in a subshell under `timeout` (functions are exported for it).
    export -f "$fn"
    timeout --kill-after=10 "$budget" bash -c "set -o pipefail; $fn"; rc=$?
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        STATUS[$s]="timed out after ${budget} s"
    else
        STATUS[$s]="rc=$rc, $((SECONDS - start)) s"
    fi
    [ $rc -ne 0 ] && failed=1
done

{
    echo "gpu_check $(date -Iseconds) on $GPU_SLUG$([ "$QUICK" = 1 ] && echo ' (quick)')"
    for s in "${STEPS[@]}"; do echo "  $s: ${STATUS[$s]}"; done
} | tee "$RESULTS/summary.txt"
echo "results in $RESULTS"
exit $failed
