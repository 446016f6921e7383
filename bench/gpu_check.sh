#!/usr/bin/env bash
# One script for a lent GPU machine (no network; its own python3 with torch, triton, peft,
# transformers, pytest, matplotlib): the test suite on CUDA, then the GPU sweep, in under
# 8 minutes. Logs, CSV, JSON and PNG go to $OUT when set, else bench/results/.
#
#   bash bench/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # on a CPU machine: same plumbing, tiny workload
#
# The package is used from this tree without pip: everything runs inside a throwaway folder
# of symlinks that maps fused_lora/ and kernels/ (as fused_lora.kernels), beside tests/,
# bench/ and tools/, and is on PYTHONPATH. The C++ extension is not built there
# (FUSED_LORA_SKIP_EXT=1): the GPU run checks the Triton and torch backends.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${OUT:-$root/bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
stamp="$(date -u +%Y-%m-%d)"
log="$out/gpu-check-$stamp.log"

site="$(mktemp -d)"
mkdir -p "$site/fused_lora"
for f in "$root"/fused_lora/*; do
    [ "$(basename "$f")" = "__pycache__" ] || ln -s "$f" "$site/fused_lora/"
done
ln -s "$root/kernels" "$site/fused_lora/kernels"
for d in tests bench tools; do ln -s "$root/$d" "$site/$d"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$site"
export FUSED_LORA_SKIP_EXT=1 TRITON_DEFAULT_FP_FUSION=1 TQDM_DISABLE=1

{
    echo "== gpu_check $stamp, commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown), dry run: $dry"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch, triton, fused_lora; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'triton', triton.__version__, 'fused_lora from', fused_lora.__file__, 'backends', fused_lora.available_backends())"
} 2>&1 | tee "$log"

status=0
# Each step has its own time cap; together about 8 minutes at most. Sweeps write their
# CSV case by case, so a step cut short keeps what it measured.
if [ "$dry" = "1" ]; then
    tests=(tests/test_reference.py tests/test_backends.py)
    sweep_args=(--device cpu --quick --no-e2e --name "gpu-check-dry-$stamp")
    e2e_args=(--device cpu --quick --e2e-only --name "gpu-check-dry-$stamp-llama")
    compile_args=()
else
    # The CUDA cases only (and the mask's 64-bit test): the rest ran on CPU before.
    tests=(tests -k "cuda or 64_bit")
    # Llama-3-8B projections, T 2k and 8k, r 16 and 64, p 0 and 0.1, without torch.compile;
    # then the end-to-end row; then torch.compile (one compilation per shape) at T=8192,
    # r=16, p=0.1 on two shapes.
    sweep_args=(--providers linear,fused_lora,fused_lora_torch,peft,addmm_composite --tokens 2048,8192
                --shapes 4096x4096,4096x1024,4096x14336,14336x4096 --no-e2e --name "cuda-$stamp")
    e2e_args=(--e2e-only --name "cuda-$stamp-llama")
    compile_args=(--providers linear,fused_lora,peft,peft_compile --tokens 8192 --ranks 16 --dropout 0.1
                  --shapes 4096x4096,4096x14336 --no-e2e --name "cuda-$stamp-compile")
fi

step() {  # step SECONDS TITLE ARGS...: one capped command, logged; a failure marks the run failed
    local seconds=$1 title=$2
    shift 2
    echo "== $title" | tee -a "$log"
    timeout "$seconds" "$py" "$@" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "== $title: FAILED or timed out" | tee -a "$log"; }
}

step 210 "tests on CUDA" -m pytest -q -p no:cacheprovider "${tests[@]}"
grep -E "passed|failed|error" "$log" | tail -n 1 > "$out/gpu-tests-summary-$stamp.txt"
step 150 "benchmark sweep" -m bench --out-dir "$out" "${sweep_args[@]}"
step 45 "end-to-end Llama" -m bench --out-dir "$out" "${e2e_args[@]}"
if [ ${#compile_args[@]} -gt 0 ]; then
    step 60 "torch.compile subset" -m bench --out-dir "$out" "${compile_args[@]}"
fi
rm -rf "$site"
echo "== gpu_check exit status $status; files in $out" | tee -a "$log"
exit $status
