"""QLoRA with the real libraries: PEFT's bnb.Linear4bit LoRA layer over bitsandbytes NF4, through from_peft,
apply_lora on a 4-bit model, PEFT's save_pretrained / from_pretrained, and the transformers Trainer."""

import os

import pytest
import torch
import torch.nn as nn

from fused_lora import FusedLoRALinear, apply_lora, dropout_mask, from_peft, load_adapter, lora_linear_reference
from fused_lora.dropout import draw_seed

from tiny_models import TINY_LLAMA_4BIT, linear_4bit, randomise_parameters, tiny_llama, tiny_llama_4bit, token_batch
from tolerances import assert_close_scaled, lora_reductions

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402


def _peft_layer(dtype=torch.float32, nested=True, p=0.0, r=4, seed=0, compute_dtype="same", N=48, K=128):
    base = linear_4bit(N, K, nested=nested, dtype=dtype, seed=seed,
                       compute_dtype=dtype if compute_dtype == "same" else compute_dtype)
    layer = PeftLinear4bit(base, "default", config=peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p),
                           r=r, lora_alpha=2 * r, lora_dropout=p)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, K, generator=gen) * K ** -0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=gen) * 0.3)
    return layer.train()


def _twin(layer):
    """A second PEFT layer over the same Linear4bit with copies of the adapters, converted by from_peft."""
    twin = PeftLinear4bit(layer.base_layer, "default", config=peft.LoraConfig(
        r=layer.r["default"], lora_alpha=layer.lora_alpha["default"], lora_dropout=0.0),
        r=layer.r["default"], lora_alpha=layer.lora_alpha["default"])
    twin.lora_dropout = layer.lora_dropout
    twin.lora_A["default"].weight = nn.Parameter(layer.lora_A["default"].weight.detach().clone())
    twin.lora_B["default"].weight = nn.Parameter(layer.lora_B["default"].weight.detach().clone())
    return from_peft(nn.Sequential(twin))[0].train(layer.training)


def _run(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y = layer(x)
    return [y] + list(torch.autograd.grad(y, (x, A, B), dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_from_peft_matches_peft_bnb_linear4bit(dtype, nested):
    peft_layer = _peft_layer(dtype, nested)
    fused = _twin(peft_layer)
    assert type(fused).__name__ == "FusedPeftLinear4bit" and isinstance(fused, PeftLinear4bit)
    assert fused.base_layer is peft_layer.base_layer  # the same 4-bit weight, in place
    x = torch.randn(3, 7, 128).to(dtype)
    assert fused.fused_adapter(x) == ("default", None)
    dy = torch.randn(3, 7, 48).to(dtype)
    expected, got = _run(peft_layer, x, dy), _run(fused, x, dy)
    reductions = lora_reductions(21, 128, 48, 4)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert g.dtype == e.dtype, (name, g.dtype, e.dtype)
        assert_close_scaled(name, g, e, reductions[name], dtype=dtype)


def test_from_peft_with_dropout_follows_the_mask_contract():
    peft_layer = _peft_layer(p=0.3, seed=4)
    fused = from_peft(nn.Sequential(peft_layer))[0]
    torch.manual_seed(1234)
    seed = int(draw_seed())  # the seed fused_lora_linear draws next
    x = torch.randn(5, 128)
    torch.manual_seed(1234)
    y = fused(x)
    A, B = fused.lora_A["default"].weight, fused.lora_B["default"].weight
    expected = lora_linear_reference(x, fused.base_layer.weight, fused.base_layer.bias, A, B,
                                     fused.scaling["default"], keep_mask=dropout_mask(seed, 5, 128, 0.3),
                                     dropout_p=0.3)
    assert_close_scaled("y", y, expected, lora_reductions(5, 128, 48, 4)["y"])


def test_fused_adapter_says_why_peft_runs_instead():
    layer = from_peft(nn.Sequential(_peft_layer(compute_dtype=torch.bfloat16)))[0]
    x = torch.randn(2, 128)
    adapter, reason = layer.fused_adapter(x)
    assert adapter is None and "compute_dtype" in reason
    expected = PeftLinear4bit.forward(layer, x)
    assert torch.equal(layer(x), expected)  # PEFT's own forward

    layer = from_peft(nn.Sequential(_peft_layer()))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapter, reason = layer.fused_adapter(x)
    assert adapter is None and "autocast" in reason
    layer.base_layer.register_forward_hook(lambda *args: None)
    adapter, reason = layer.fused_adapter(x)
    assert adapter is None and "hooks" in reason


def test_after_bitsandbytes_repacks_for_its_cpu_kernel_peft_s_forward_runs():
    """On CPUs with AVX512-BF16, Linear4bit.forward in eval mode repacks the weight for bitsandbytes' CPU kernel
    (another layout); the fused path then steps aside, saying why, and the layer computes PEFT's result."""
    functional = bnb.functional
    layer = from_peft(nn.Sequential(_peft_layer(N=64)))[0].eval()
    base = layer.base_layer
    base.weight.data, base.weight.quant_state = functional._convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state)
    x = torch.randn(2, 128)
    adapter, reason = layer.fused_adapter(x)
    assert adapter is None and "packing_format_for_cpu" in reason
    with torch.no_grad():
        assert torch.equal(layer(x), PeftLinear4bit.forward(layer, x))


def _tiny_peft_4bit(p=0.0, seed=0, targets=("q_proj", "v_proj", "down_proj")):
    model = peft.get_peft_model(tiny_llama_4bit(seed), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                        target_modules=list(targets)))
    return randomise_parameters(model, "lora_B", seed=seed + 1)


def test_a_4bit_llama_through_from_peft_matches_peft():
    reference = _tiny_peft_4bit()
    fused = _tiny_peft_4bit()
    peft.set_peft_model_state_dict(fused, peft.get_peft_model_state_dict(reference))
    from_peft(fused)
    kinds = {type(m).__name__ for m in fused.modules()}
    assert "FusedPeftLinear4bit" in kinds and "Linear4bit" in kinds  # untargeted layers stay bitsandbytes'
    ids = token_batch()
    losses = []
    for model in (reference, fused):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    assert_close_scaled("loss", losses[1].detach(), losses[0].detach(), 2000)
    grads = {n: q.grad for n, q in reference.named_parameters() if q.grad is not None}
    for name, q in fused.named_parameters():
        if q.grad is not None:
            assert_close_scaled(name, q.grad, grads[name], 2000)
    assert set(grads) == {n for n, q in fused.named_parameters() if q.grad is not None}


def test_peft_save_pretrained_round_trip_after_from_peft(tmp_path):
    model = from_peft(_tiny_peft_4bit(p=0.1))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    ids = token_batch()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = from_peft(peft.PeftModel.from_pretrained(tiny_llama_4bit(0), tmp_path))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    saved = peft.get_peft_model_state_dict(model)
    for key, value in peft.get_peft_model_state_dict(loaded).items():
        assert torch.equal(value, saved[key]), key


def test_apply_lora_targets_linear4bit_layers():
    # NOTE: train mode (no dropout in this model): eval mode under no_grad would let bitsandbytes repack the
    # weights for its CPU kernel on AVX512-BF16 CPUs, a layout fused_lora refuses (test_quantized.py).
    model = tiny_llama_4bit(0).train()
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    packed = {name: m.weight for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    apply_lora(model, "all-linear", r=4, lora_alpha=8)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    assert set(layers) == set(packed) and "lm_head" not in layers  # every Linear4bit, not the output head
    for name, layer in layers.items():
        assert layer.weight is packed[name] and layer.is_4bit
    with torch.no_grad():
        assert_close_scaled("logits", model(input_ids=ids).logits, before, 2000)  # lora_B = 0: the same model
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _save_tiny_llama(directory):
    tiny_llama(0, **TINY_LLAMA_4BIT).save_pretrained(directory)
    return directory


def test_trainer_with_a_4bit_model(tmp_path):
    """transformers loads a 4-bit model (BitsAndBytesConfig, on the CPU), PEFT puts LoRA on it, from_peft routes
    it through fused_lora, and the Trainer trains it: the adapters move as in PEFT's own run, the 4-bit weights
    do not move at all."""
    source = _save_tiny_llama(tmp_path / "base")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = torch.randint(0, 96, (12, 10), generator=torch.Generator().manual_seed(3))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, index):
            return {"input_ids": self.ids[index], "labels": self.ids[index]}

    def train(fused):
        base = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu",
                                                                 dtype=torch.float32)
        assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        torch.manual_seed(0)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "up_proj"]))
        if fused:
            from_peft(model)
        packed = {n: q.detach().clone() for n, q in model.named_parameters() if q.dtype == torch.uint8}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / ("fused" if fused else "peft")), per_device_train_batch_size=4, max_steps=3,
            learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0, seed=0, use_cpu=True, report_to=[],
            logging_steps=1, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
        trainer.train()
        for name, q in model.named_parameters():
            if name in packed:
                assert torch.equal(q.detach(), packed[name]), f"{name}: the 4-bit weight changed"
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return model, losses

    fused_model, fused_losses = train(True)
    assert any(type(m).__name__ == "FusedPeftLinear4bit" for m in fused_model.modules())
    peft_model, peft_losses = train(False)
    assert len(fused_losses) == 3 and all(map(torch.isfinite, torch.tensor(fused_losses)))
    assert fused_losses == pytest.approx(peft_losses, rel=1e-4)
    expected = peft.get_peft_model_state_dict(peft_model)
    for key, value in peft.get_peft_model_state_dict(fused_model).items():
        assert_close_scaled(key, value, expected[key], 4000, c=64)


def test_load_adapter_into_a_4bit_model(tmp_path):
    # Before: load_adapter took a Linear4bit's uint8 storage dtype for its base dtype and refused the file
    # ("holds torch.uint8 adapters"); a 4-bit base takes fp32 adapters (PEFT's default), as apply_lora makes.
    peft_model = _tiny_peft_4bit()
    peft_model.save_pretrained(tmp_path)
    saved = peft.get_peft_model_state_dict(peft_model)
    model = load_adapter(tiny_llama_4bit(0).train(), tmp_path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    assert len(layers) == 6 and all(layer.is_4bit for layer in layers.values())
    for name, layer in layers.items():
        assert layer.lora_A.dtype == torch.float32
        assert torch.equal(layer.lora_A, saved[f"base_model.model.{name}.lora_A.weight"]), name
        assert torch.equal(layer.lora_B, saved[f"base_model.model.{name}.lora_B.weight"]), name
    ids = token_batch()
    with torch.no_grad():
        expected = peft_model.train()(input_ids=ids).logits
        assert_close_scaled("logits", model(input_ids=ids).logits, expected, 2000)
