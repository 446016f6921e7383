"""The benchmark harness: every provider computes the same layer, and a quick sweep writes its files."""

import csv
import json

import pytest
import torch

from bench import cli, e2e
from bench.providers import Weights, build, trainable_parameters
from fused_lora import lora_linear_reference

from tolerances import assert_close_scaled, lora_reductions


@pytest.mark.parametrize("provider", ["fused_lora", "fused_lora_torch", "peft", "addmm_composite"])
def test_providers_compute_the_same_lora_layer(provider):
    w = Weights.random(40, 24, 4, torch.float32, torch.float32, torch.device("cpu"))
    module, _ = build(provider, w, r=4, p=0.0)
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = module(x)
    dy = torch.randn_like(y)
    params = trainable_parameters(module)
    assert len(params) == 2 and {tuple(q.shape) for q in params} == {(4, 40), (24, 4)}
    got = torch.autograd.grad(y, [x] + params, dy)
    A = w.lora_A.clone().requires_grad_(True)
    B = w.lora_B.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = lora_linear_reference(x_ref, w.weight, w.bias, A, B, w.scaling)
    expected = torch.autograd.grad(y_ref, [x_ref, A, B], dy)
    reductions = lora_reductions(T=21, K=40, N=24, r=4)
    assert_close_scaled("y", y, y_ref, reductions["y"])
    assert_close_scaled("dx", got[0], expected[0], reductions["dx"])
    by_shape = {tuple(g.shape): g for g in got[1:]}
    assert_close_scaled("dA", by_shape[(4, 40)], expected[1], reductions["dA"])
    assert_close_scaled("dB", by_shape[(24, 4)], expected[2], reductions["dB"])


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
