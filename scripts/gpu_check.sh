#!/usr/bin/env bash
# The GPU proof in one run (issue 20): on the lent GPU machine, from the repository root,
#
#     OUT=/some/dir bash scripts/gpu_check.sh              # at most 8 minutes
#     OUT=/some/dir bash scripts/gpu_check.sh --rehearse   # the same steps on CPU, tiny shapes (tests/test_gpu_check.py)
#
# It runs from the tree (PYTHONPATH=.) on the machine's own jax, flax, optax and orbax; wheels
# the machine lacks travel in .whl/ and are installed into /tmp/site first; before the call, here:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
# (gguf is pure Python; qlora_jax.assets imports it). Each step
# has its own time limit and writes its markdown into $OUT line by line, so a step cut short
# keeps what it measured and the next step still runs:
#   0. env.md: python, jax, the devices, package versions, and scripts/check_jax_api.py against this jax
#   1. 1_kernels_check.md: every kernel compiled by Triton vs its *_reference twin
#   2. 2_kernels_bench.md: fused NF4 matmul vs XLA dequantize+dot vs a bf16 dot, 7B and 70B shapes
#   3. 3_train_step.md: QLoRA (XLA and Pallas) vs 16-bit LoRA train step, random TinyLlama-1.1B, seq 512
#   4. 4_memory.md: that step's compiled memory, measured peak_bytes_in_use and the formula
#   5. 5_decode.md: decode tokens/s at batch 1 and 8, NF4 vs bf16
# Everything the run prints also goes to $OUT/gpu_check.log. Exit status: 1 if any step failed.
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

if [ "${1:-}" = "--rehearse" ]; then
    export JAX_PLATFORMS=cpu
    kernels=(--interpret --shapes 7b --m 1,16)
    train=(--model tiny --batch 2 --seq-len 32 --warmup 1 --steps 2)
    memory=(--variants xla)
    decode=(--model tiny --prompt-len 16 --new-tokens 8 --repeats 2)
    limits=(60 120 120 120 120 120)
else
    kernels=(--shapes 7b,70b --m 1,16,512,4096)
    train=(--model tinyllama-1.1b --batch 8 --seq-len 512 --warmup 2 --steps 10)
    memory=(--variants pallas)
    decode=(--model tinyllama-1.1b --batch 1,8 --prompt-len 128 --new-tokens 64 --repeats 5)
    limits=(40 100 110 100 55 60)  # 465 s: under 8 minutes with start-up
fi

failed=0
step() {  # step NUMBER TITLE COMMAND...: run COMMAND under the step's time limit, report its status
    local number=$1 title=$2 start=$SECONDS status
    shift 2
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

step 0 "environment and jax API check" environment
step 1 "kernels compiled and checked" "$PYTHON" scripts/bench_kernels.py --check "${kernels[@]}" \
    --out "$OUT/1_kernels_check.md"
step 2 "kernel timings" "$PYTHON" scripts/bench_kernels.py "${kernels[@]}" --skip-check --out "$OUT/2_kernels_bench.md"
step 3 "train step, QLoRA vs 16-bit LoRA" "$PYTHON" scripts/bench_train_step.py "${train[@]}" \
    --out "$OUT/3_train_step.md"
step 4 "memory of the train step" "$PYTHON" scripts/bench_train_step.py "${train[@]}" "${memory[@]}" --memory \
    --warmup 0 --steps 2 --out "$OUT/4_memory.md"
step 5 "decode tokens/s" "$PYTHON" scripts/bench_decode.py "${decode[@]}" --out "$OUT/5_decode.md"
echo "=== gpu_check: $([ $failed -eq 0 ] && echo 'every step passed' || echo 'some steps FAILED'), $SECONDS s"
exit $failed
