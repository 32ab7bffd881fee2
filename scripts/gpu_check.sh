#!/usr/bin/env bash
# The GPU proof in one run (issues 14 and 20): on the lent GPU machine, from the repository root,
#
#     OUT=/some/dir bash scripts/gpu_check.sh              # at most 9.5 minutes
#     OUT=/some/dir bash scripts/gpu_check.sh --rehearse   # the same steps on CPU, tiny shapes (tests/test_gpu_check.py)
#     OUT=/some/dir bash scripts/gpu_check.sh --only 0,2,3 # only these steps
#
# It runs from the tree (PYTHONPATH=.) on the machine's own jax, flax, optax and orbax; wheels
# the machine lacks travel in .whl/ and are installed into /tmp/site first; before the call, here:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0 tensorboardX==2.6.5
# (both pure Python; qlora_jax.assets imports gguf, qlora_jax.metrics tensorboardX). Each step
# has its own time limit and writes its markdown into $OUT line by line, so a step cut short
# keeps what it measured and the next step still runs. Steps in order of what they prove:
#   0. env.md: python, jax, the devices, package versions, and scripts/check_jax_api.py against this jax
#   1. 1_kernels_check.md: every kernel compiled by Triton vs its *_reference twin
#   2. 2_memory.md: measured peak_bytes_in_use of real train steps (random TinyLlama-1.1B, batch 8 x 512,
#      r=16; random LLaMA-7B, batch 1 x 512, r=64; both with quant.kernel's default, auto) next to XLA's
#      count of the compiled step and the formula
#   3. 3_compiled_memory.md: python -m qlora_jax.memory --compiled for LLaMA-65B on this backend, optimizer
#      state on the device and offloaded to host memory (which the CPU backend cannot tell apart), and with
#      bf16 adapters (lora.dtype: bfloat16) and the state on the device
#   4. 4_train_step.md: QLoRA (auto, XLA, Pallas) vs 16-bit LoRA train step, random TinyLlama-1.1B, seq 512
#   5. 5_kernels_bench.md: fused NF4 matmul vs XLA dequantize+dot vs a bf16 dot, 7B and 70B shapes
#   6. 6_decode.md: decode tokens/s at batch 1 and 8, NF4 (auto, XLA) vs bf16
# Everything the run prints also goes to $OUT/gpu_check.log (8 files in all: what the device tool returns).
# Exit status: 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

rehearse=0 only=""
while [ $# -gt 0 ]; do
    case $1 in
        --rehearse) rehearse=1 ;;
        --only) only=",${2:?--only needs a comma-separated list of step numbers},"; shift ;;
        *) echo "error: unknown argument $1 (expected --rehearse, --only N,N,...)" >&2; exit 2 ;;
    esac
    shift
done

if [ $rehearse -eq 1 ]; then
    export JAX_PLATFORMS=cpu
    kernels=(--interpret --shapes 7b --m 1,16)
    train=(--model tiny --batch 2 --seq-len 32 --warmup 1 --steps 2)
    memory_small=(--model tiny --batch 2 --seq-len 32 --variants xla)
    memory_large=(--model tiny --batch 1 --seq-len 32 --rank 8 --variants xla)
    compiled=(--model tinyllama-1.1b --seq-len 64 --r 8)
    decode=(--model tiny --prompt-len 16 --new-tokens 8 --repeats 2)
    limits=(60 120 120 120 120 120 120)
else
    kernels=(--shapes 7b,70b --m 1,16,512,4096)
    train=(--model tinyllama-1.1b --batch 8 --seq-len 512 --warmup 2 --steps 10)
    memory_small=(--model tinyllama-1.1b --batch 8 --seq-len 512 --variants auto)
    memory_large=(--model llama-7b --batch 1 --seq-len 512 --rank 64 --variants auto)
    compiled=(--model llama-65b --seq-len 512 --r 64)
    decode=(--model tinyllama-1.1b --batch 1,8 --prompt-len 128 --new-tokens 64 --repeats 5)
    limits=(40 70 125 105 80 45 100)  # 565 s: under the device tool's 600 s a call
fi

failed=0
step() {  # step NUMBER TITLE COMMAND...: run COMMAND under the step's time limit, report its status
    local number=$1 title=$2 start=$SECONDS status
    shift 2
    if [ -n "$only" ] && [[ $only != *",$number,"* ]]; then
        echo "=== step $number: $title: not asked for (--only)"
        return
    fi
    echo "=== step $number: $title (limit ${limits[$number]} s)"
    if declare -F "$1" >/dev/null; then
        "$@"  # a shell function (quick): timeout runs programs only
    else
        timeout "${limits[$number]}" "$@"
    fi
    status=$?
    echo "=== step $number: exit $status after $((SECONDS - start)) s$([ $status -eq 124 ] && echo ' (time limit)')"
    [ $status -eq 0 ] || failed=1
}

environment() {
    environment_report | tee "$OUT/env.md"
    return "${PIPESTATUS[0]}"
}

environment_report() {
    echo "# Environment"
    echo
    echo '```'
    "$PYTHON" - <<'PY'
import importlib.metadata as metadata
import platform

import jax

print(f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}")
print("devices:", ", ".join(f"{d.device_kind} ({d.platform})" for d in jax.devices()))
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "triton", "gguf", "tokenizers"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} missing")
PY
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    "$PYTHON" scripts/check_jax_api.py
    local status=$?
    echo '```'
    return $status
}

memory() {  # both models, one process each (a device's peak counts the whole process), into one report
    local limit=$((limits[2] / 3)) status=0
    timeout "$limit" "$PYTHON" scripts/bench_train_step.py "${memory_small[@]}" --memory --warmup 0 --steps 2 \
        --out /tmp/memory_small.md || status=1
    timeout $((limits[2] - limit)) "$PYTHON" scripts/bench_train_step.py "${memory_large[@]}" --memory \
        --warmup 0 --steps 2 --out /tmp/memory_large.md || status=1
    cat /tmp/memory_small.md /tmp/memory_large.md > "$OUT/2_memory.md" 2>/dev/null
    return $status
}

compiled_memory() {  # f32 adapters with the optimizer state on the device and offloaded; bf16 adapters (the paper's)
    local limit=$((limits[3] / 3)) status=0 offload dtype
    for run in none/float32 host/float32 none/bfloat16; do
        offload=${run%/*} dtype=${run#*/}
        echo "## \`python -m qlora_jax.memory ${compiled[*]} --offload $offload --lora-dtype $dtype --compiled\`"
        echo '```'
        timeout "$limit" "$PYTHON" -m qlora_jax.memory "${compiled[@]}" --offload "$offload" --lora-dtype "$dtype" \
            --compiled || status=1
        echo '```'
    done | tee "$OUT/3_compiled_memory.md"
    return $status
}

step 0 "environment and jax API check" environment
step 1 "kernels compiled and checked" "$PYTHON" scripts/bench_kernels.py --check "${kernels[@]}" \
    --out "$OUT/1_kernels_check.md"
step 2 "measured memory of real train steps" memory
step 3 "compiled memory of the 65B step" compiled_memory
step 4 "train step, QLoRA vs 16-bit LoRA" "$PYTHON" scripts/bench_train_step.py "${train[@]}" \
    --out "$OUT/4_train_step.md"
step 5 "kernel timings" "$PYTHON" scripts/bench_kernels.py "${kernels[@]}" --skip-check --out "$OUT/5_kernels_bench.md"
step 6 "decode tokens/s" "$PYTHON" scripts/bench_decode.py "${decode[@]}" --out "$OUT/6_decode.md"
echo "=== gpu_check: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'some steps FAILED'), $SECONDS s"
exit $failed
