"""examples/finetune_llama.py: fused_lora's loss equals PEFT's step for step at p=0."""

import importlib.util
import os
import warnings

import pytest
import torch

from fused_lora import FusedLoRALinear
from fused_lora.ops.backends import _runs_on

from tolerances import assert_close_scaled

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune_llama.py")
BACKENDS = [b for b in ("torch", "cpu") if _runs_on(b, torch.device("cpu"))]


def _example():
    spec = importlib.util.spec_from_file_location("finetune_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--steps", "5", "--batch-size", "2", "--seq-len", "24", "--hidden-size", "32", "--layers", "2",
        "--r", "4", "--lora-alpha", "6", "--lr", "1e-2"]


@pytest.mark.parametrize("backend", BACKENDS, ids=[f"cpu-{b}" for b in BACKENDS])
def test_loss_matches_peft_step_for_step(backend):
    example = _example()
    args = example.parse_args(ARGS + ["--backend", backend])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, fused_model = example.build_pair(args)
        layers = [m for m in fused_model.modules() if isinstance(m, FusedLoRALinear)]
        assert len(layers) == 14 and all(m.backend == backend and m.scaling == 1.5 for m in layers)
        batches = example.make_batches(example.offline_text(), args.steps, args.batch_size, args.seq_len, 0)
        peft_result = example.train(peft_model, batches, args)
        fused_result = example.train(fused_model, batches, args)
    assert len(peft_result["losses"]) == len(fused_result["losses"]) == 5
    for step, (a, b) in enumerate(zip(peft_result["losses"], fused_result["losses"])):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), f"step {step}: fused {b} vs PEFT {a}"
    assert fused_result["losses"][-1] < fused_result["losses"][0] - 0.05  # it really trains
    # The adapters moved the same way: compare one trained lora_B with PEFT's.
    ours = fused_model.model.layers[1].mlp.down_proj.lora_B
    theirs = peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert ours.abs().max() > 0
    # AdamW divides by sqrt(v): a gradient's rounding difference moves an update by more
    # than the gradient's own relative error, so n counts the 5 steps over the model's chain.
    # The example's model: hidden 32, intermediate 85, 2 layers, 2 x 24 tokens a batch.
    assert_close_scaled("trained lora_B", ours, theirs, 5 * (2 * (3 * 32 + 85) + 32 + 2 * 24))
    assert fused_result["peak_bytes"] > 0 and fused_result["tokens_per_s"] > 0


def test_script_prints_losses_speed_and_memory(capsys):
    example = _example()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert example.main(ARGS[:1] + ["2"] + ARGS[2:] + ["--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "PEFT loss" in out and "fused loss" in out
    assert "peft:" in out and "fused_lora:" in out and "tokens/s" in out and "MiB" in out
