"""The triton backend's GEMM choice (fused_lora/ops/triton_ops/tuning.py, tuning_file.py):
failures reported by candidate, arguments allocated only where a candidate runs, nothing run
inside a graph capture, and the tuning file that makes the choice the same in every process.

The failing candidates are injected (a strategy that raises what Triton or CUDA would);
everything else runs the real kernels (the interpreter on CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_lora
from fused_lora.ops import backends
from fused_lora.ops.backends import backend_ops

from conftest import DEVICE_BACKENDS, make_inputs
from tolerances import assert_close_scaled, lora_reductions

TRITON_DEVICES = [d for d, b in DEVICE_BACKENDS if b == "triton"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ops(monkeypatch, tmp_path):
    if not TRITON_DEVICES:
        pytest.skip("triton cannot run here")
    ops = backend_ops("triton")
    from fused_lora.ops.triton_ops import tuning_file

    monkeypatch.setenv("FUSED_LORA_TUNING_FILE", str(tmp_path / "tuning.json"))
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "1")  # the default: read the tuning file (conftest turns it off)
    monkeypatch.setattr(tuning_file, "_WARNED", set())
    ops.clear_plans()
    yield ops
    ops.clear_plans()


def _device():
    return TRITON_DEVICES[0]


def _inject(monkeypatch, ops, failures: dict, calls: list | None = None):
    """Candidates: each label of ``failures`` (a strategy raising that error; None: runs fine, as a
    pointer kernel), then the real default. ``calls`` records which candidate ran."""
    from fused_lora.ops.triton_ops import plans, tuning

    original = tuning._gemm_candidates
    config = tuning.INTERPRETER_GEMM_CONFIG if _device().type == "cpu" else None

    def candidates(*args, **kwargs):
        real = [c for c in original(*args, **kwargs) if c[1] == "pointer"]
        return [(label, f"injected {label}", config or real[0][2]) for label in failures] + real

    def wrap(build):
        def patched(self, kind, config, *args):
            label = kind[len("injected "):] if kind.startswith("injected ") else None
            strategy = build(self, "pointer" if label else kind, config, *args)

            def run(*call_args):
                if calls is not None:
                    calls.append(label or kind)
                if label and failures[label] is not None:
                    raise failures[label]
                return strategy(*call_args)

            return run
        return patched

    monkeypatch.setattr(tuning, "_gemm_candidates", candidates)
    monkeypatch.setattr(plans._ForwardPlan, "_build", wrap(plans._ForwardPlan._build))
    monkeypatch.setattr(plans._BackwardPlan, "_build_dx", wrap(plans._BackwardPlan._build_dx))


def _layer_call(ops, T=40, K=24, N=20, r=4, p=0.0, dtype=torch.float32):
    """y, dx of one forward and backward through the triton launchers, and the fp64 expectations."""
    device = _device()
    x, weight, bias, lora_A, lora_B = make_inputs(T, K, N, r, dtype, device)
    dy = torch.randn(T, N, device=device, dtype=dtype)
    xa, bits = ops.lora_shrink(x, lora_A, 5, p)
    y = ops.lora_forward(x, weight, bias, lora_B, xa, 0.5)
    dx, _, _ = ops.lora_backward(dy, x, weight, lora_A, lora_B, xa, 0.5, 5, p, bits, True, False, False)
    x64, w64, a64, b64, dy64 = (t.double() for t in (x, weight, lora_A, lora_B, dy))
    expected = {"y": x64 @ w64.T + bias.double() + 0.5 * (x64 @ a64.T) @ b64.T,
                "dx": dy64 @ w64 + 0.5 * (dy64 @ b64) @ a64}
    n = lora_reductions(T, K, N, r)
    return {"y": y, "dx": dx}, expected, n


def _report_by_op(ops):
    return {key[0]: value for key, value in ops.tuning_report().items()}


# ----------------------------------------------------------------------------- failures

def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(262144, 232448, "shared memory")


@pytest.mark.parametrize("error", [_out_of_resources, lambda: RuntimeError("PassManager::run failed")],
                         ids=["OutOfResources", "lowering"])
def test_a_candidate_that_cannot_be_built_here_is_skipped_with_a_warning_naming_it(ops, monkeypatch, error):
    _inject(monkeypatch, ops, {"broken": error()})
    with pytest.warns(RuntimeWarning, match=r"candidate broken .* skipped: (OutOfResources|RuntimeError)"):
        got, expected, n = _layer_call(ops)
    for name in got:  # the next candidate ran, and right
        assert_close_scaled(name, got[name].double(), expected[name], n[name], dtype=torch.float32)
    report = _report_by_op(ops)
    for op in ("forward", "dx"):
        assert report[op]["choice"].startswith("pointer:")
        assert report[op]["failures"]["broken"].startswith(type(error()).__name__), report[op]


@pytest.mark.parametrize("message", ["CUDA error: an illegal memory access was encountered",
                                     "Triton Error [CUDA]: unspecified launch failure"])
def test_a_cuda_error_propagates_naming_the_candidate_and_no_other_runs(ops, monkeypatch, message):
    # After an illegal address the context is unusable: trying the next candidate would fail
    # too and hide the cause behind "no GEMM strategy could run".
    calls = []
    _inject(monkeypatch, ops, {"broken": RuntimeError(message)}, calls)
    with pytest.raises(RuntimeError, match=message.split(":")[1].strip()) as info:
        _layer_call(ops)
    assert any("candidate broken" in note for note in getattr(info.value, "__notes__", [])), info.value
    assert calls == ["broken"], f"other candidates ran after a CUDA error: {calls}"
    assert ops.tuned_choices() == {}, "a choice was recorded although nothing ran"


def test_when_no_candidate_runs_the_error_lists_each_failure(ops, monkeypatch):
    _inject(monkeypatch, ops, {"first": _out_of_resources(), "second": RuntimeError("ptxas fatal: too big")})
    from fused_lora.ops.triton_ops import tuning

    original = tuning._gemm_candidates
    monkeypatch.setattr(tuning, "_gemm_candidates", lambda *a, **k: [c for c in original(*a, **k)
                                                                     if c[1].startswith("injected")])
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no GEMM strategy could run") as info:
        _layer_call(ops)
    assert "first: OutOfResources" in str(info.value) and "second: RuntimeError: ptxas" in str(info.value)


def test_out_of_memory_while_timing_stops_the_timing_and_keeps_the_default(ops, monkeypatch):
    calls = []
    _inject(monkeypatch, ops, {"fine": None, "hungry": torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                              "allocate 256.00 MiB")}, calls)
    from fused_lora.ops.triton_ops import tuning

    monkeypatch.setattr(tuning, "_time_ms", lambda fn, device: (fn(), 1.0)[1])
    with ops.timing_runs(), pytest.warns(RuntimeWarning, match="out of memory while running hungry"):
        got, expected, n = _layer_call(ops)
    for name in got:
        assert_close_scaled(name, got[name].double(), expected[name], n[name], dtype=torch.float32)
    report = _report_by_op(ops)
    for op in ("forward", "dx"):
        assert report[op]["choice"] == "fine" and report[op]["source"].startswith("default (out of memory"), report
    assert "hungry" in calls and "pointer" not in calls, f"timing went on after running out of memory: {calls}"


def test_out_of_memory_in_the_first_trial_reaches_the_caller_as_out_of_memory(ops, monkeypatch):
    # Not "no GEMM strategy could run": the default stays the choice (untried), and its own
    # out-of-memory error is what the step raises.
    _inject(monkeypatch, ops, {"hungry": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 MiB")})
    with pytest.warns(RuntimeWarning, match="out of memory while running hungry.*hungry is used, untried"), \
            pytest.raises(torch.OutOfMemoryError):
        _layer_call(ops)
    assert _report_by_op(ops)["forward"]["choice"] == "hungry"


def test_timing_keeps_the_fastest_and_records_every_time(ops, monkeypatch):
    _inject(monkeypatch, ops, {"slow": None})
    from fused_lora.ops.triton_ops import tuning

    times = iter([5.0, 2.0, 7.0, 3.0])  # forward: slow, pointer; dx: slow, pointer

    monkeypatch.setattr(tuning, "_time_ms", lambda fn, device: (fn(), next(times))[1])
    with ops.timing_runs():
        _layer_call(ops)
    report = _report_by_op(ops)
    assert report["forward"]["source"] == "timed" and report["forward"]["choice"].startswith("pointer:")
    assert sorted(report["forward"]["timings_ms"].values()) == [2.0, 5.0]
    assert sorted(report["dx"]["timings_ms"].values()) == [3.0, 7.0]


def test_nothing_runs_or_is_timed_inside_a_graph_capture(ops, monkeypatch):
    # Stands in for torch.cuda.graph capture on CPU: the strategy must come without a trial
    # launch or timing, and is not remembered (it is tried at the first call outside).
    calls = []
    _inject(monkeypatch, ops, {"first": None}, calls)
    from fused_lora.ops.triton_ops import tuning

    monkeypatch.setattr(tuning, "_capturing", lambda device: True)
    monkeypatch.setattr(tuning, "_time_ms", lambda fn, device: pytest.fail("timed inside a capture"))
    with ops.timing_runs():
        got, expected, n = _layer_call(ops)
    assert calls == ["first", "first"], f"a trial or timing launch inside the capture: {calls}"
    assert ops.tuned_choices() == {}
    for name in got:
        assert_close_scaled(name, got[name].double(), expected[name], n[name], dtype=torch.float32)


def test_backward_allocates_trial_arguments_only_while_its_choice_is_open(ops, monkeypatch):
    # The dx trial arguments (mask bits, dxa, seed) once cost T * K / 8 + T * r * 4 bytes per
    # plan, even for a shape class already decided.
    from fused_lora.ops.triton_ops import plans

    allocations = []

    class CountingTorch:
        def __getattr__(self, name):
            value = getattr(torch, name)
            if name in ("zeros", "ones"):
                def counted(*args, **kwargs):
                    allocations.append(name)
                    return value(*args, **kwargs)
                return counted
            return value

    _inject(monkeypatch, ops, {"first": None})
    monkeypatch.setattr(plans, "torch", CountingTorch())
    _layer_call(ops, T=40, p=0.2)
    assert allocations, "the first plan of a shape class should try its default"
    allocations.clear()
    _layer_call(ops, T=50, p=0.2)  # a new plan, same shape class (64 rows)
    assert allocations == [], f"trial arguments allocated for a decided shape class: {allocations}"


# ----------------------------------------------------------------------------- the tuning file

def _force_tma(monkeypatch):
    """Two real candidates (TMA, pointer) for fp16 in the interpreter, TMA the default."""
    if _device().type == "cpu":
        monkeypatch.setenv("FUSED_LORA_FORCE_TMA", "1")
    elif torch.cuda.get_device_capability(_device())[0] < 9:
        pytest.skip("needs two GEMM candidates: TMA (sm_90) and pointer")


def test_tuning_file_round_trip(ops, tmp_path):
    from fused_lora.ops.triton_ops import tuning_file

    device = _device()
    key = ("forward", device, torch.bfloat16, torch.float32, 4096, 4096, 16, True, True, 8192)
    file = str(tmp_path / "deep" / "t.json")
    tuning_file.write(file, device, {key: dict(choice="hybrid", timings_ms={"hybrid": 1.5}, failures={})})
    data = json.load(open(file))
    machine = tuning_file.machine_key(device)
    assert f"torch {torch.__version__}" in machine and "triton" in machine
    assert data["machines"][machine]["forward bfloat16 float32 4096 4096 16 True True 8192"]["choice"] == "hybrid"
    os.environ["FUSED_LORA_TUNING_FILE"] = file  # restored by the fixture's monkeypatch
    assert tuning_file.lookup(key, device, ["tma:x", "hybrid"]) == ("hybrid", f"tuning file {file}")
    other = key[:-1] + (4096,)
    assert tuning_file.lookup(other, device, ["tma:x", "hybrid"])[0] is None


def test_bench_tune_choice_is_used_by_another_process_without_timing(ops, monkeypatch, tmp_path, capsys):
    # Process 1 (python -m bench.tune, here in-process) times TMA against pointer with a timer
    # that makes pointer win, the non-default; process 2 must run pointer, and time nothing.
    _force_tma(monkeypatch)
    if _device().type != "cpu":
        pytest.skip("the second process runs on CPU")
    from bench import tune
    from fused_lora.ops.triton_ops import tuning, tuning_file

    def time_ms(fn, device):  # pointer is faster; the label is in the strategy's closure
        fn()
        label = [c.cell_contents for c in fn.__closure__ if callable(c.cell_contents)][0].__qualname__
        return 1.0 if ".pointer" in label else 2.0

    monkeypatch.setattr(tuning, "_time_ms", time_ms)
    file = str(tmp_path / "tuning.json")
    argv = ["--device", _device().type, "--shapes", "32x24", "--tokens", "40", "--ranks", "4", "--dropout", "0,0.2",
            "--dtype", "fp16", "--mask-modes", "bits", "--out", file]
    assert tune.main(argv) == 0
    chosen = {tuning_file.entry_key(key): value["choice"] for key, value in ops.tuning_report().items()
              if value["source"] == "timed"}
    assert chosen and all(c.startswith("pointer:") for c in chosen.values()), chosen
    assert "3 timed choices merged" in capsys.readouterr().out

    script = textwrap.dedent("""
        import json, torch, fused_lora
        from fused_lora.ops.triton_ops import tuning, tuning_file
        def refuse(*args, **kwargs):
            raise AssertionError("this process timed or tried a candidate")
        tuning._time_ms = tuning._run_candidates = refuse
        layer = fused_lora.FusedLoRALinear(32, 24, r=4, lora_dropout=DROPOUT, dtype=torch.float16)
        layer.lora_A.data = layer.lora_A.data.float(); layer.lora_B.data = torch.randn(24, 4)
        layer.backend = "triton"
        for p in (0.0, DROPOUT):
            layer.lora_dropout = p
            layer(torch.randn(40, 32, dtype=torch.float16, requires_grad=True)).backward(
                torch.randn(40, 24, dtype=torch.float16))
        print(json.dumps({tuning_file.entry_key(k): [v["choice"], v["source"]]
                          for k, v in tuning.tuning_report().items()}))
    """).replace("DROPOUT", "0.2")
    env = dict(os.environ, FUSED_LORA_TUNING_FILE=file, FUSED_LORA_AUTOTUNE="1", FUSED_LORA_DROPOUT_MASK="bits",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert {key: choice for key, (choice, _) in seen.items()} == chosen
    assert all(source == f"tuning file {file}" for _, source in seen.values()), seen


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something else", "machines": {}}),
                                     json.dumps({"format": "fused_lora tuning 1", "machines": {"gpu": {"k": 3}}})],
                         ids=["not-json", "other-format", "bad-entry"])
def test_a_corrupt_tuning_file_is_an_error_naming_it(ops, tmp_path, content):
    file = tmp_path / "tuning.json"
    file.write_text(content)
    with pytest.raises(ValueError, match=f"{file}.*not a fused_lora tuning file.*bench.tune"):
        _layer_call(ops)


def test_a_corrupt_tuning_file_is_not_read_with_autotune_off(ops, monkeypatch, tmp_path):
    (tmp_path / "tuning.json").write_text("{not json")
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "0")
    got, expected, n = _layer_call(ops)
    assert all(v["source"] == "default (FUSED_LORA_AUTOTUNE=0)" for v in ops.tuning_report().values())


def test_entries_of_another_machine_or_an_unknown_choice_warn_and_take_the_default(ops, monkeypatch, tmp_path):
    from fused_lora.ops.triton_ops import tuning_file

    _force_tma(monkeypatch)
    file = tmp_path / "tuning.json"
    file.write_text(json.dumps({"format": tuning_file.FORMAT, "machines": {"another GPU | torch 0.1": {}}}))
    with pytest.warns(RuntimeWarning, match="no entries for this machine"):
        _layer_call(ops, K=32, N=24, dtype=torch.float16)
    assert all(v["choice"].startswith("tma:") for v in ops.tuning_report().values())

    ops.clear_plans()
    key = next(iter(ops.tuning_report()), None)
    assert key is None
    _layer_call(ops, K=32, N=24, dtype=torch.float16)
    keys = list(ops.tuning_report())
    entries = {tuning_file.entry_key(k): {"choice": "tma:999x999"} for k in keys}
    file.write_text(json.dumps({"format": tuning_file.FORMAT,
                                "machines": {tuning_file.machine_key(_device()): entries}}))
    ops.clear_plans()
    with pytest.warns(RuntimeWarning, match="'tma:999x999'.*does not offer"):
        _layer_call(ops, K=32, N=24, dtype=torch.float16)
    assert all(v["choice"].startswith("tma:") and "not offered" in v["source"] for v in ops.tuning_report().values())


def test_the_mask_mode_switch_is_restored_by_bench_tune(ops, monkeypatch, tmp_path):
    from bench import tune

    before = backends.TRITON_MASK_MODE
    assert tune.main(["--device", _device().type, "--shapes", "16x8", "--tokens", "8", "--ranks", "2", "--dropout",
                      "0.1", "--dtype", "fp32", "--adapter-dtypes", "fp32", "--mask-modes", "seed",
                      "--out", str(tmp_path / "t.json")]) == 0
    assert backends.TRITON_MASK_MODE == before
    assert fused_lora  # the package imported once here
