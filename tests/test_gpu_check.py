"""bench/gpu_check.sh, what a session with a lent GPU runs first: its switches are checked before
any work, and the first stage's dry run (Triton's interpreter on CPU, tiny shapes) goes through
every step and writes every file, in order."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def _run(tmp_path, timeout, **switches):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(switches, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("variable,value", [
    ("GPU_CHECK_STAGE", "frist"), ("GPU_CHECK_STAGE", "check,sweep"),
    ("GPU_CHECK_DRY_RUN", "maybe"), ("GPU_CHECK_DRY_RUN", "2"), ("GPU_CHECK_PACK_ONLY", "y"),
    ("GPU_CHECK_BUDGET_S", "5min"), ("GPU_CHECK_BUDGET_S", "10"),
])
def test_a_mistyped_stage_or_switch_stops_before_any_work(tmp_path, variable, value):
    # A typo used to run nothing and exit 0 (a stage), or start the full GPU workload
    # (GPU_CHECK_DRY_RUN=true counted as not dry): on a 15-minute loan, the whole loan.
    done = _run(tmp_path, 30, **{"GPU_CHECK_DRY_RUN": "1", variable: value})
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert f"{variable}={value}" in done.stderr and "expected" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists(), "work started before the switches were checked"


def test_first_stage_dry_run_writes_every_step_in_order(tmp_path):
    # GPU_CHECK_DRY_RUN=TRUE: the boolean spellings all count (this one used to mean "not dry").
    done = _run(tmp_path, 900, GPU_CHECK_STAGE="First", GPU_CHECK_DRY_RUN="TRUE")
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert done.returncode == 0, log[-6000:] + done.stderr[-2000:]
    assert "stage first" in log and "dry run: 1" in log
    steps = [line for line in log.splitlines() if line.startswith("== ") and ": exit " in line]
    numbers = [line.split()[1] for line in steps]
    assert numbers == ["0", "1", "2", "3", "4", "5", "6", "8"], steps
    assert all(": exit 0 after " in line for line in steps), steps
    assert "== 7 tests/test_cuda_graphs.py" in log and "1 passed" in log

    results = tmp_path / "out" / "r"
    for name in ["tuning.json", "1-tune.txt", "1-correctness.json", "2-registers.csv", "2-registers.txt",
                 "3-gemm.json", "3-gemm.txt", "4-profile.json", "4-profile.txt", "5-memory.json",
                 "6-latency.csv", "7-cuda-graphs.log", "8-headline.csv", "8-headline.json"]:
        assert (results / name).is_file(), f"{name} missing: {sorted(os.listdir(results))}"
    assert (tmp_path / "out" / "results.tgz").is_file()

    correctness = json.loads((results / "1-correctness.json").read_text())
    cases = [row["case"] for row in correctness["rows"]]
    assert cases == ["untuned p=0.0 -", "untuned p=0.1 bits", "untuned p=0.1 seed",
                     "tuned p=0.0 -", "tuned p=0.1 bits", "tuned p=0.1 seed"]
    assert all(not row["verdict"].startswith("FAIL") and row["mask_equal"] for row in correctness["rows"])
    assert all(set(row["errors"]) == {"y", "dx", "dA", "dB"} for row in correctness["rows"])
    tuned = [row for row in correctness["rows"] if row["tuned"]]
    assert all(source.startswith("tuning file") for row in tuned for _, source in row["choices"].values())
    tuning = json.loads((results / "tuning.json").read_text())
    (machine, entries), = tuning["machines"].items()
    assert "Triton interpreter" in machine and len(entries) == 4  # forward, dx without dropout, bits, seed

    gemm = json.loads((results / "3-gemm.json").read_text())
    assert {row["item"] for row in gemm["gemm"]} == {"fwd 32->32", "dx 32->32 mask=none", "dx 32->32 mask=bits",
                                                     "dx 32->32 mask=seed"}
    assert all(row["status"] == "ok" for row in gemm["gemm"]), gemm["gemm"]
    memory = json.loads((results / "5-memory.json").read_text())
    assert [row["T"] for row in memory["rows"]] == [16, 32, 16] and not memory["flat"]["x_alive"]
    assert "fused_lora" in (results / "6-latency.csv").read_text()
