"""The benchmark harness: every provider computes the same layer, and a quick sweep writes its files."""

import csv
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import cli, e2e, plot, report
from bench.providers import Weights, build, trainable_parameters
from fused_lora import lora_linear_reference

from tolerances import assert_close_scaled, lora_reductions


def _check_provider(provider, K, base_weight=None, lora=True):
    """The provider's layer (K -> 24, r = 4, no dropout) against the reference over
    ``base_weight(w)`` (default: the dense weight): y, dx and, where ``lora``, dA and dB; without
    ``lora`` the layer has no trainable parameters and the reference no adapter."""
    w = Weights.random(K, 24, 4, torch.float32, torch.float32, torch.device("cpu"))
    module, _ = build(provider, w, r=4, p=0.0)
    x = torch.randn(3, 7, K, requires_grad=True)
    y = module(x)
    dy = torch.randn_like(y)
    params = trainable_parameters(module)
    if lora:
        assert len(params) == 2 and {tuple(q.shape) for q in params} == {(4, K), (24, 4)}
    else:
        assert params == []
    got = torch.autograd.grad(y, [x] + params, dy)
    weight = w.weight if base_weight is None else base_weight(w)
    A = (w.lora_A if lora else torch.zeros_like(w.lora_A)).clone().requires_grad_(True)
    B = w.lora_B.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = lora_linear_reference(x_ref, weight, w.bias, A, B, w.scaling)
    expected = torch.autograd.grad(y_ref, [x_ref, A, B], dy)
    reductions = lora_reductions(T=21, K=K, N=24, r=4)
    assert_close_scaled("y", y, y_ref, reductions["y"])
    assert_close_scaled("dx", got[0], expected[0], reductions["dx"])
    if lora:
        by_shape = {tuple(g.shape): g for g in got[1:]}
        assert_close_scaled("dA", by_shape[(4, K)], expected[1], reductions["dA"])
        assert_close_scaled("dB", by_shape[(24, 4)], expected[2], reductions["dB"])


@pytest.mark.parametrize("provider", ["fused_lora", "fused_lora_torch", "peft", "addmm_composite"])
def test_providers_compute_the_same_lora_layer(provider):
    _check_provider(provider, K=40)


def test_addmm_composite_refuses_dropout():
    w = Weights.random(8, 8, 2, torch.float32, torch.float32, torch.device("cpu"))
    with pytest.raises(NotImplementedError):
        build("addmm_composite", w, r=2, p=0.1)


def test_quick_sweep_writes_table_csv_json_png(tmp_path, capsys):
    assert cli.main(["--device", "cpu", "--shapes", "64x48", "--tokens", "32", "--providers", "linear,fused_lora,peft",
                     "--repeats", "2", "--no-e2e", "--out-dir", str(tmp_path), "--name", "t"]) == 0
    printed = capsys.readouterr().out
    assert "fused_lora" in printed and "peft" in printed
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3  # two dropout values x three providers x three modes
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["ratio_to_linear"]) == 1.0 for r in rows if r["provider"] == "linear")
    meta = json.loads((tmp_path / "t.json").read_text())
    assert {"device_name", "threads", "torch", "triton", "peft", "git_commit", "date"} <= set(meta)
    assert (tmp_path / "t.png").stat().st_size > 0


def test_end_to_end_rows_compare_the_same_model():
    rows = e2e.run(torch.device("cpu"), "cpu-quick", r=4, p=0.1, dtype=torch.float32, repeats=1)
    assert [r["provider"] for r in rows] == ["fused_lora", "peft"]
    assert all(r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 for r in rows)
    size = e2e.SIZES["cpu-quick"]
    fused = e2e.fused_model(size, 4, 8, 0.0, torch.float32, "cpu")
    peft_model = e2e.peft_model(size, 4, 8, 0.0, torch.float32, "cpu")
    count = lambda m: sum(q.numel() for q in m.parameters() if q.requires_grad)  # noqa: E731
    assert count(fused) == count(peft_model) > 0


TINY_RUN = ["--device", "cpu", "--shapes", "16x8", "--tokens", "4", "--providers", "linear,fused_lora",
            "--repeats", "1", "--no-e2e"]


def test_results_go_to_the_untracked_scratch_folder_unless_published(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    assert cli.parse_args([]).out_dir == cli.SCRATCH_DIR
    assert cli.parse_args(["--publish"]).out_dir == cli.RESULTS_DIR
    assert cli.parse_args(["--out-dir", str(tmp_path)]).out_dir == str(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert cli.parse_args([]).out_dir == str(tmp_path / "out")
    with pytest.raises(SystemExit):
        cli.parse_args(["--publish", "--out-dir", str(tmp_path)])
    assert "--publish: writes to bench/results/" in capsys.readouterr().err

    root = os.path.dirname(cli.RESULTS_DIR)
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(cli.SCRATCH_DIR, "cpu-2026-01-01.csv")],
                             cwd=root)
    assert ignored.returncode == 0, "bench/results/scratch/ is not ignored by git"
    tracked = subprocess.run(["git", "check-ignore", "-q", os.path.join(cli.RESULTS_DIR, "cpu-2026-01-01.csv")],
                             cwd=root)
    assert tracked.returncode == 1

    monkeypatch.delenv("OUT")
    monkeypatch.setattr(cli, "SCRATCH_DIR", str(tmp_path / "scratch"))
    assert cli.main(TINY_RUN + ["--quick", "--no-plot"]) == 0
    stem = f"cpu-{datetime.date.today().isoformat()}-quick"
    assert sorted(os.listdir(tmp_path / "scratch")) == [f"{stem}.csv", f"{stem}.json"]


def test_without_matplotlib_or_tqdm_the_numbers_are_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli.main(TINY_RUN + ["--out-dir", str(tmp_path), "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert "no plot: matplotlib is not installed (pip install matplotlib, or pass --no-plot)" in out
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.json"]


def _row(provider, mode, median, p20, p80, ratio, status="ok"):
    return dict(K=16, N=8, T=4, r=2, p=0.0, provider=provider, mode=mode, status=status, median_ms=median,
                p20_ms=p20, p80_ms=p80, ratio_to_linear=ratio)


def test_noisy_rows_are_named():
    rows = [_row("linear", "fwd", 10.0, 9.9, 10.05, 1.0),
            _row("fused_lora", "fwd", 10.0, 9.0, 11.5, 1.1),   # 25% spread
            _row("peft", "bwd", 7.3, 7.25, 7.35, 0.73),         # faster than the frozen linear
            _row("peft", "fwd", 10.0, 9.7, 10.2, 1.2),          # 5%: fine
            _row("addmm_composite", "fwd", None, None, None, None, status="n/a: no dropout")]
    assert cli.noisy_rows(rows) == [
        "16x8 T=4 r=2 p=0.0 fused_lora fwd: p20-p80 spread 25% of the median",
        "16x8 T=4 r=2 p=0.0 peft bwd: 0.73x the frozen linear, below the limit"]


def test_printed_memory_columns_are_in_mib():
    """The printed tables divide bytes by 2**20, so their headers say MiB (they said MB)."""
    saved = 3 * 2 ** 20
    rows = [dict(_row("fused_lora", mode, 1.0, 1.0, 1.0, 1.0), dtype="fp32", backend="cpu:fused", tflops=0.1,
                 saved_bytes=saved) for mode in ("fwd", "bwd", "fwd+bwd")]
    header, _, line = report.format_table(rows).splitlines()
    assert header.split()[-2:] == ["saved", "MiB"]
    assert line.split()[-1] == "3.0"
    e2e_row = dict(model="Llama", r=16, p=0.1, provider="peft", backend="", tokens_per_s=1.0, tokens_per_s_p20=1.0,
                   tokens_per_s_p80=1.0, memory_bytes=saved, memory_kind="saved_bytes")
    header, line = e2e.format_rows([e2e_row]).splitlines()
    assert header.split()[-2:] == ["memory", "MiB"]
    assert line.split()[-2:] == ["3.0", "(saved_bytes)"]


def _write_csv(path, rows):
    columns = ["K", "N", "T", "r", "p", "dtype", "provider", "backend", "mode", "status", "median_ms", "p20_ms",
               "p80_ms", "ratio_to_linear", "device_name"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def test_plot_names_backends_shows_the_spread_and_keeps_the_legend_clear(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for p in ("0.0", "0.1"):
        for K, N in ((1024, 1024), (2048, 5632), (4096, 1024)):
            for provider, backend, ratio in (("linear", "", 1.0), ("fused_lora", "cpu", 1.08),
                                             ("fused_lora_torch", "torch", 1.9), ("peft", "", 1.7)):
                rows.append(dict(K=K, N=N, T=1024, r=16, p=p, dtype="fp32", provider=provider, backend=backend,
                                 mode="fwd+bwd", status="ok", median_ms=20.0, p20_ms=19.0, p80_ms=23.0,
                                 ratio_to_linear=ratio, device_name="test CPU"))
    path = tmp_path / "r.csv"
    _write_csv(path, rows)
    fig = plot.draw(plot.load_rows(str(path)))
    fig.canvas.draw()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["linear", "fused_lora (cpu)", "fused_lora_torch (torch)",
                                                          "peft"]
    legend_box = legend.get_window_extent()
    for ax in fig.axes:
        assert "lower is better" in ax.get_ylabel() and "p20-p80" in ax.get_title()
        assert not legend_box.overlaps(ax.get_window_extent()), "the legend covers a panel"
        bars = [c for c in ax.containers if hasattr(c, "errorbar")]
        assert len(bars) == 4
        fused = bars[1]
        assert [round(b.get_height(), 6) for b in fused.patches] == [1.08] * 3
        whiskers = fused.errorbar.lines[2][0].get_segments()
        for (_, low), (_, high) in whiskers:
            assert (round(low, 6), round(high, 6)) == (round(1.08 * 19 / 20, 6), round(1.08 * 23 / 20, 6))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[1] == "2048x5632\nT=1024 r=16"  # in_features x out_features, as the calculator writes it
    plot.plot(str(path), str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("argv,option", [
    (["--shapes", "0x5"], "--shapes"),       # once ZeroDivisionError in the sweep
    (["--shapes", "abc"], "--shapes"),       # once a raw int() ValueError
    (["--tokens", "-1"], "--tokens"),        # once torch's negative-dimension RuntimeError
    (["--ranks", "0"], "--ranks"),           # once ZeroDivisionError
    (["--dropout", "1.0"], "--dropout"),
    (["--repeats", "0"], "--repeats"),       # once silently the default
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),       # once torch's device-string RuntimeError
    (["--warm-part", "0/0"], "--warm-part"),  # once "slice step cannot be zero"
    (["--warm-part", "3/2"], "--warm-part"),  # once silently no case
    (["--name", "../x"], "--name"),          # once wrote outside --out-dir
])
def test_bad_command_line_values_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --base nf4: the same layer over bitsandbytes' 4-bit weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["fused_lora_nf4", "peft_nf4", "linear_nf4"])
def test_nf4_providers_compute_the_same_4bit_layer(provider):
    pytest.importorskip("bitsandbytes")
    from bench.providers import linear_4bit

    # quantized from the same weights: the same bytes; linear_nf4 has no adapter
    _check_provider(provider, K=64, base_weight=lambda w: linear_4bit(w).weight, lora=provider != "linear_nf4")


def test_nf4_sweep_writes_weight_and_memory_rows(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert cli.main(["--device", "cpu", "--base", "nf4", "--shapes", "128x32", "--tokens", "8", "--repeats", "1",
                     "--no-e2e", "--no-plot", "--out-dir", str(tmp_path), "--name", "q"]) == 0
    printed = capsys.readouterr().out
    assert "weights MiB" in printed and "peft_nf4" in printed
    with open(tmp_path / "q.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "fwd+bwd"]
    assert [r["provider"] for r in rows] == ["linear", "fused_lora_nf4", "peft_nf4", "linear_nf4"]
    assert all(r["status"] == "ok" and r["p"] == "0.1" for r in rows)
    weights = {r["provider"]: int(r["weight_bytes"]) for r in rows}
    assert weights["linear"] == (128 * 32 + 32) * 4  # the dense fp32 weight and bias
    assert weights["fused_lora_nf4"] == weights["peft_nf4"] == weights["linear_nf4"] < weights["linear"] / 4


def test_nf4_end_to_end_rows_compare_the_same_4bit_model():
    pytest.importorskip("bitsandbytes")
    rows = e2e.run(torch.device("cpu"), "cpu-quick", r=4, p=0.1, dtype=torch.float32, repeats=1, base="nf4")
    assert [r["provider"] for r in rows] == ["fused_lora_nf4", "peft_nf4"]
    assert all(r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 for r in rows)
    assert rows[0]["weight_bytes"] == rows[1]["weight_bytes"] and rows[0]["model"].startswith("Llama nf4")


# ---------------------------------------------------------------------------------------------
# bench.gpu_kernels --configs tuned: what GPU_CHECK_STAGE=first warms (step 0) and times (step 3)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["none", "bits", "seed"])
@pytest.mark.parametrize("tma_ok,K", [(True, 4096), (False, 4096), (False, 4100)], ids=["tma", "pointer", "pointer-odd-K"])
def test_gpu_kernels_tuned_strategies_on_sm90_are_the_tuners_plus_its_pointer_kernel(monkeypatch, tma_ok, K, mask):
    # The strategies as an H100/H200 (bf16, T=8192) sees them, answered by the tuning tables without a
    # GPU: the tuner's candidates, and where those are TMA configs, the pointer kernel the launcher
    # would fall back to for the same mask (it once looked the pointer config up under a stale key
    # of TUNED_POINTER: a KeyError, so no GEMM of the first stage's steps 0 and 3 ran).
    from bench import gpu_kernels
    from fused_lora.kernels.common import rank_block
    from fused_lora.ops.triton_ops import tuning

    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_device_facts", lambda index: (132, 9, 232448))
    monkeypatch.setattr(tuning, "_index", lambda device: 0)
    monkeypatch.setattr(gpu_kernels, "DEVICE", "cuda")
    device = torch.device("cuda", 0)
    got = gpu_kernels._strategies(tma_ok, K, 4096, mask, "tuned", device)
    tuner_mask = None if mask == "none" else "seed-odd" if mask == "seed" and K % 8 else mask
    candidates = tuning._gemm_candidates(device, torch.bfloat16, rank_block(16), tma_ok, 8192, tuner_mask)
    pointer_default = tuning._gemm_candidates(device, torch.bfloat16, rank_block(16), False, 8192, tuner_mask)[0]
    assert pointer_default[1] == "pointer"
    assert got[:len(candidates)] == candidates
    assert got[len(candidates):] == ([pointer_default] if tma_ok else [])
