#!/usr/bin/env bash
# The GPU check: what to run on a machine with an NVIDIA GPU (sm_90 for the TMA kernels) to
# see that fused_lora is correct there and how fast it is. It needs python3 with torch, triton,
# peft, transformers, pytest (pytest-xdist and pytest-timeout used where present), matplotlib; no network. The package is used
# from this tree, without pip and without the C++ extension (FUSED_LORA_SKIP_EXT=1).
#
#   GPU_CHECK_STAGE=first bash bench/gpu_check.sh  # the first run on a lent GPU: at most 345 s (below)
#   bash bench/gpu_check.sh                        # everything but first (not yet run on a GPU; caps 20 min)
#   GPU_CHECK_STAGE=check bash bench/gpu_check.sh  # tests, kernels, latency, headline sweep
#   GPU_CHECK_STAGE=sweep bash bench/gpu_check.sh  # the full sweep and the end-to-end row
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh    # on a CPU machine: same plumbing, tiny work
#
# Switches, checked before anything runs (a typo is an error, exit 2, not a wasted loan):
# GPU_CHECK_STAGE all|check|sweep|first (any case; empty = all); GPU_CHECK_DRY_RUN and
# GPU_CHECK_PACK_ONLY 1/0, true/false, yes/no, on/off (any case; empty = 0);
# GPU_CHECK_BUDGET_S, the first stage's wall-time budget in seconds (default 345).
#
# Each step has its own time cap; a step that fails or runs out marks the run failed and the
# next step still runs. Every result lands in $OUT (default bench/results/scratch/gpu-check-<date>/,
# untracked; copy what you publish to bench/results/):
# gpu-check.log, and the CSV/JSON/PNG/txt files of each step, also packed as results.tgz.
#
# Kernels compile on first use (1-20 s each on a fresh machine): the first step compiles the
# variants the later steps use in parallel processes into Triton's cache, while the tests run.
#
# The first stage (GPU_CHECK_STAGE=first) decides the defaults in one short run. Its files, in
# the order written (caps in seconds; a step gets at most what is left of the budget, 345 s,
# and none starts with under 5 s left: with the 5 s kill grace and the packing, under 6 min):
#   0 (90)  compile the variants in 12 parallel processes; the CUDA graph tests start beside it
#   1 (50)  1-tune.txt, tuning.json (python -m bench.tune: 3 shapes, T=8192, r=16, p 0 and 0.1,
#           both mask modes), 1-correctness.{json,txt}: fwd+bwd against fp64, bf16, T=8192,
#           4096x4096, r=16, fp32 adapters, p 0 and 0.1, mask modes bits and seed, untuned
#           and tuned (python -m bench.first_run correctness)
#   2 (20)  2-registers.{csv,txt}: registers and spills of every kernel variant as loaded
#   3 (40)  3-gemm.{json,txt}: each GEMM strategy against torch.mm, 4096x4096, 4096x14336,
#           14336x4096, T=8192 (python -m bench.gpu_kernels --parts gemm --configs tuned)
#   4 (25)  4-profile.{json,txt}: per-kernel torch.profiler table of one step, each skinny
#           pass against its read floor
#   5 (20)  5-memory.{json,txt}: torch.cuda.memory_allocated after steps at 5 T (flat)
#   7 (200 from the start, in the background) 7-cuda-graphs.log: tests/test_cuda_graphs.py
#   6 (20)  6-latency.csv: host latency at T=16 (after the tests, so nothing competes)
#   8 (55)  8-headline.{csv,json,png}: T=8192, r=16, p 0 and 0.1, against PEFT with fp32 and
#           with bf16 adapters (the tuned choices: FUSED_LORA_TUNING_FILE=<results>/tuning.json)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

flag() {  # flag NAME DEFAULT: 1 or 0 for a boolean switch; anything but a boolean is an error
    local value="${!1:-}"
    case "${value,,}" in
        "") echo "$2" ;;
        1|true|yes|on) echo 1 ;;
        0|false|no|off) echo 0 ;;
        *) echo "gpu_check.sh: $1=$value: expected 1/0, true/false, yes/no or on/off (any case), or empty for $2" >&2
           return 1 ;;
    esac
}
stage="${GPU_CHECK_STAGE:-all}"
stage="${stage,,}"
case "$stage" in
    all|check|sweep|first) ;;
    *) echo "gpu_check.sh: GPU_CHECK_STAGE=${GPU_CHECK_STAGE}: expected all, check, sweep or first (empty: all)" >&2
       exit 2 ;;
esac
dry=$(flag GPU_CHECK_DRY_RUN 0) || exit 2
pack_only=$(flag GPU_CHECK_PACK_ONLY 0) || exit 2
budget="${GPU_CHECK_BUDGET_S:-345}"
if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 60 ]; then
    echo "gpu_check.sh: GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-}: expected whole seconds >= 60 (default 345)" >&2
    exit 2
fi

stamp="$(date -u +%Y-%m-%d)"
out="${OUT:-$root/bench/results/scratch/gpu-check-$stamp}"
results="$out/r"
mkdir -p "$results"
py="${PYTHON:-python3}"
log="$out/gpu-check.log"
deadline=""  # the first stage's: SECONDS at which its budget is spent
[ "$stage" = "first" ] && deadline=$((SECONDS + budget))

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
step() {  # step SECONDS TITLE COMMAND...: one capped command, logged (capped by the budget's rest too)
    local seconds=$1 title=$2
    shift 2
    if [ -n "$deadline" ]; then
        local left=$((deadline - SECONDS))
        if [ "$left" -lt 5 ]; then
            echo "== $title: not run, ${left}s left of the ${budget}s budget" | tee -a "$log"
            status=1
            return
        fi
        [ "$seconds" -gt "$left" ] && seconds=$left
    fi
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
    timeout 120 "$py" -c "import torch, triton, fused_lora; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), 'triton', triton.__version__, 'backends', fused_lora.available_backends())"
} 2>&1 | tee "$log"

# Every stage reads (and bench.tune writes) the run's own tuning file, never the user's.
tuning="$results/tuning.json"
export FUSED_LORA_TUNING_FILE="$tuning"
if [ "$stage" = "first" ]; then
    if [ "$dry" = "1" ]; then  # Triton's interpreter on CPU, fp16, shapes of a few dozen
        export TRITON_INTERPRET=1 FUSED_LORA_FORCE_TMA=1
        small=(--device cpu --shape 32x32 --tokens 32 --rank 4)
        kernels=(--device cpu --shapes 32x32 --tokens 32 --rank 4)
        latency=(--device cpu --repeats 2 --providers linear,fused_lora)
        graphs=(tests/test_cuda_graphs.py -k "seed_tensor_is_saved and cpu-triton")
        headline=(--device cpu --shapes 32x32 --tokens 32 --ranks 4 --dropout 0.1 --providers linear,fused_lora,peft
                  --repeats 2 --no-e2e --no-plot)
        memory=(--device cpu --shape 32x32 --rank 4 --memory-tokens 16,32)
        parts=1
        graphs_cap=120
    else
        small=()
        kernels=()
        latency=()
        graphs=(tests/test_cuda_graphs.py)
        headline=(--shapes 4096x4096,4096x14336,14336x4096 --tokens 8192 --ranks 16 --dropout 0,0.1
                  --providers linear,fused_lora,peft,peft_bf16 --no-e2e --repeats 10)
        memory=()
        parts=12
        graphs_cap=200
    fi
    "$py" -c "import pytest_timeout" 2>/dev/null && graphs=(--timeout 150 "${graphs[@]}")
    (timeout -k 5 "$graphs_cap" "$py" -m pytest -q -p no:cacheprovider "${graphs[@]}" > "$results/7-cuda-graphs.log" 2>&1
     echo "exit $?" >> "$results/7-cuda-graphs.log") &
    graphs_pid=$!
    step 90 "0 compile in parallel (warm Triton's cache; the CUDA graph tests run beside it)" \
        "$py" -m bench.warm --parts "$parts" --no-sweep --latency \
        --kernel-args "--parts gemm,profile --configs tuned --shapes 4096x4096 ${kernels[*]}" \
        --latency-args "--tokens 16 ${latency[*]}"
    step 50 "1 tuning file, then correctness against fp64 (untuned and tuned)" \
        "$py" -m bench.first_run correctness --tune "$tuning" --out-dir "$results" "${small[@]}"
    step 20 "2 registers and spills as loaded" "$py" -m bench.first_run registers --out-dir "$results" "${small[@]}"
    step 40 "3 each GEMM strategy against torch.mm" env FUSED_LORA_AUTOTUNE=0 "$py" -m bench.gpu_kernels \
        --parts gemm --configs tuned --name 3-gemm --out-dir "$results" "${kernels[@]}"
    step 25 "4 per-kernel profile of one step, skinny passes against their read floor" env FUSED_LORA_AUTOTUNE=1 \
        "$py" -m bench.gpu_kernels --parts profile --shapes 4096x4096 --name 4-profile --out-dir "$results" \
        "${kernels[@]}"
    step 20 "5 memory after steps at 5 T" "$py" -m bench.first_run memory --out-dir "$results" "${memory[@]}"
    wait "$graphs_pid"
    echo "== 7 tests/test_cuda_graphs.py (ran in the background since the start, cap ${graphs_cap}s):" | tee -a "$log"
    tail -n 15 "$results/7-cuda-graphs.log" | tee -a "$log"
    grep -q "^exit 0" "$results/7-cuda-graphs.log" || status=1
    pack
    step 20 "6 host latency at T=16" "$py" -m bench --latency --tokens 16 --name 6-latency --out-dir "$results" \
        "${latency[@]}"
    step 55 "8 headline sweep against PEFT (fp32 and bf16 adapters)" "$py" -m bench --name 8-headline \
        --out-dir "$results" "${headline[@]}"
elif [ "$dry" = "1" ]; then
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
    # What bench.tune times for the same cases (the sweep then runs the tuned choices).
    tune_headline=(--shapes 4096x4096,4096x14336,14336x4096 --tokens 8192 --ranks 16 --dropout 0,0.1)
    tune_full=(--shapes 4096x4096,4096x1024,4096x14336,14336x4096 --tokens 2048,8192 --ranks 16,64 --dropout 0,0.1)
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
    if [ "$parts" -gt 0 ]; then
        step 60 "tuning file for the headline cases" "$py" -m bench.tune "${tune_headline[@]}" --out "$tuning"
    fi
    step 120 "headline sweep (T=8192, r=16)" "$py" -m bench --out-dir "$results" --name headline "${headline[@]}"
fi
if [ "$stage" = "all" ] || [ "$stage" = "sweep" ]; then
    if [ "$parts" -gt 0 ]; then
        step 150 "compile in parallel (warm Triton's cache)" "$py" -m bench.warm --parts "$parts" --no-kernels \
            "${full[@]}"
        step 150 "tuning file for the sweep's cases" "$py" -m bench.tune "${tune_full[@]}" --out "$tuning"
    fi
    step 240 "full sweep" "$py" -m bench --out-dir "$results" --name sweep "${full[@]}"
    step 60 "end-to-end Llama" "$py" -m bench --out-dir "$results" --name e2e "${e2e[@]}"
fi
rm -rf "$site"
pack
# GPU_CHECK_PACK_ONLY=1: leave only the log and results.tgz (a runner that returns few files).
[ "$pack_only" = "1" ] && rm -rf "$results"
echo "== gpu_check exit status $status after ${SECONDS}s; files in $out" | tee -a "$log"
exit $status
