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
if [ "$dry" = "1" ]; then
    tests=(tests/test_reference.py tests/test_backends.py)
    bench_args=(--device cpu --quick --no-e2e --name "gpu-check-dry-$stamp")
    compile_args=()
else
    # The CUDA cases only: everything else ran on CPU before the machine was asked for.
    tests=(tests -k cuda)
    # Everything except torch.compile over the full default GPU sweep; torch.compile (one
    # compilation per shape) on two T=8192, r=16 shapes only, to stay in the time budget.
    # Each sweep writes its CSV case by case, so a timeout keeps what was measured.
    bench_args=(--providers linear,fused_lora,fused_lora_torch,peft,addmm_composite --name "cuda-$stamp")
    compile_args=(--providers linear,fused_lora,peft,peft_compile --tokens 8192 --ranks 16 \
                  --shapes 4096x4096,4096x14336 --no-e2e --name "cuda-$stamp-compile")
fi

echo "== tests" | tee -a "$log"
timeout 200 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/gpu-tests-$stamp.log" | tail -n 25 \
    | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tail -n 1 "$out/gpu-tests-$stamp.log" > "$out/gpu-tests-summary-$stamp.txt"

echo "== benchmark sweep" | tee -a "$log"
timeout 200 "$py" -m bench --out-dir "$out" "${bench_args[@]}" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ ${#compile_args[@]} -gt 0 ]; then
    echo "== torch.compile subset" | tee -a "$log"
    timeout 90 "$py" -m bench --out-dir "$out" "${compile_args[@]}" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
rm -rf "$site"
echo "== gpu_check exit status $status; files in $out" | tee -a "$log"
exit $status
