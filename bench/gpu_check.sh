#!/usr/bin/env bash
# The GPU check: what to run on a machine with an NVIDIA GPU (sm_90 for the TMA kernels) to
# see that fused_lora is correct there and how fast it is. It needs python3 with torch, triton,
# peft, transformers, pytest (pytest-xdist and pytest-timeout used where present), matplotlib; no network. The package is used
# from this tree, without pip and without the C++ extension (FUSED_LORA_SKIP_EXT=1).
#
#   bash bench/gpu_check.sh                        # everything (not yet run on a GPU; step caps 16 min in all)
#   GPU_CHECK_STAGE=check bash bench/gpu_check.sh  # tests, kernels, latency, headline sweep
#   GPU_CHECK_STAGE=sweep bash bench/gpu_check.sh  # the full sweep and the end-to-end row
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh    # on a CPU machine: same plumbing, tiny work
#
# Each step has its own time cap; a step that fails or runs out marks the run failed and the
# next step still runs. Every result lands in $OUT (default bench/results/scratch/gpu-check-<date>/,
# untracked; copy what you publish to bench/results/):
# gpu-check.log, and the CSV/JSON/PNG/txt files of each step, also packed as results.tgz.
#
# Kernels compile on first use (1-10 s each on a fresh machine): the first step compiles the
# variants the later steps use in parallel processes into Triton's cache, while the tests run.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stamp="$(date -u +%Y-%m-%d)"
out="${OUT:-$root/bench/results/scratch/gpu-check-$stamp}"
results="$out/r"
mkdir -p "$results"
py="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
stage="${GPU_CHECK_STAGE:-all}"
log="$out/gpu-check.log"

site="$(mktemp -d)"
mkdir -p "$site/fused_lora"
for f in "$root"/fused_lora/*; do
    [ "$(basename "$f")" = "__pycache__" ] || ln -s "$f" "$site/fused_lora/"
done
ln -s "$root/kernels/triton" "$site/fused_lora/kernels"
for d in tests bench tools; do ln -s "$root/$d" "$site/$d"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$site"
# NOTE: one inductor compile thread: with its default worker pool per pytest-xdist worker,
# the CUDA test step once printed every test green and then did not exit for minutes.
export FUSED_LORA_SKIP_EXT=1 TRITON_DEFAULT_FP_FUSION=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 \
       TORCHINDUCTOR_COMPILE_THREADS=1 TOKENIZERS_PARALLELISM=false

status=0
pack() { tar czf "$out/results.tgz" -C "$out" r 2>/dev/null; }
step() {  # step SECONDS TITLE COMMAND...: one capped command, logged
    local seconds=$1 title=$2
    shift 2
    local begin=$SECONDS
    echo "== $title (cap ${seconds}s)" | tee -a "$log"
    timeout -k 5 "$seconds" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $title: exit $rc after $((SECONDS - begin))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
    pack
}

{
    echo "== gpu_check $stamp, stage $stage, commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown), dry run: $dry"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch, triton, fused_lora; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), 'triton', triton.__version__, 'backends', fused_lora.available_backends())"
} 2>&1 | tee "$log"

if [ "$dry" = "1" ]; then
    headline=(--device cpu --shapes 64x48 --tokens 64 --providers linear,fused_lora,peft --repeats 2 --no-e2e)
    full=(--device cpu --quick --no-e2e)
    e2e=(--device cpu --quick --e2e-only)
    tests=(tests/test_reference.py tests/test_backends.py)
    parts=0
else
    headline=(--shapes 4096x4096,4096x14336,14336x4096 --tokens 8192 --ranks 16 --dropout 0,0.1
              --providers linear,fused_lora,peft,peft_bf16 --no-e2e)
    # Llama-3-8B projections, T 2k and 8k, r 16 and 64, p 0 and 0.1, PEFT with both adapter dtypes.
    full=(--shapes 4096x4096,4096x1024,4096x14336,14336x4096 --tokens 2048,8192 --ranks 16,64 --dropout 0,0.1
          --providers linear,fused_lora,peft,peft_bf16 --no-e2e)
    e2e=(--e2e-only)
    tests=(tests -k "cuda or triton or 64_bit")
    # The H200 image has pytest-xdist; pytest-timeout may be missing there, and pytest
    # refuses an option of a plugin it does not have: use each only where it imports.
    "$py" -c "import xdist" 2>/dev/null && tests=(-n 8 "${tests[@]}")
    "$py" -c "import pytest_timeout" 2>/dev/null && tests=(--timeout 150 "${tests[@]}")
    parts=6
fi

if [ "$stage" = "all" ] || [ "$stage" = "check" ]; then
    if [ "$parts" -gt 0 ]; then
        # The tests run while the cache warms (the machine has more cores than either needs).
        (timeout -k 5 200 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$results/tests.log" 2>&1;
         echo "exit $?" >> "$results/tests.log") &
        tests_pid=$!
        step 200 "compile in parallel (warm Triton's cache)" "$py" -m bench.warm --parts "$parts" --latency \
            "${headline[@]}"
        wait "$tests_pid"
        echo "== tests on CUDA:" | tee -a "$log"
        tail -n 25 "$results/tests.log" | tee -a "$log"
        grep -q "^exit 0" "$results/tests.log" || status=1
    else
        step 240 "tests" "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"
    fi
    if [ "$parts" -gt 0 ]; then
        step 140 "kernels one by one (GEMMs vs torch.mm, skinny passes, per-kernel profile)" \
            "$py" -m bench.gpu_kernels --out-dir "$results"
    fi
    step 50 "latency (fwd+bwd per call at T=1 and 16)" "$py" -m bench --latency --out-dir "$results" \
        $( [ "$dry" = "1" ] && echo "--device cpu --repeats 2" )
    step 120 "headline sweep (T=8192, r=16)" "$py" -m bench --out-dir "$results" --name headline "${headline[@]}"
fi
if [ "$stage" = "all" ] || [ "$stage" = "sweep" ]; then
    if [ "$parts" -gt 0 ]; then
        step 150 "compile in parallel (warm Triton's cache)" "$py" -m bench.warm --parts "$parts" --no-kernels \
            "${full[@]}"
    fi
    step 240 "full sweep" "$py" -m bench --out-dir "$results" --name sweep "${full[@]}"
    step 60 "end-to-end Llama" "$py" -m bench --out-dir "$results" --name e2e "${e2e[@]}"
fi
rm -rf "$site"
pack
# GPU_CHECK_PACK_ONLY=1: leave only the log and results.tgz (a runner that returns few files).
[ "${GPU_CHECK_PACK_ONLY:-0}" = "1" ] && rm -rf "$results"
echo "== gpu_check exit status $status; files in $out" | tee -a "$log"
exit $status
