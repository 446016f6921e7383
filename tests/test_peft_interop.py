"""apply_lora and from_peft against the real PEFT package on a small transformers Llama."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import FusedLoRALinear, apply_lora, from_peft, print_trainable_parameters

from tiny_models import reduction_length, tiny_llama, token_batch
from tolerances import assert_close_scaled

peft = pytest.importorskip("peft")


def set_backend(model, backend):
    for module in model.modules():
        if isinstance(module, FusedLoRALinear):
            module.backend = backend
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the arguments of every fused_lora_linear call that a converted PEFT module makes."""
    import fused_lora.integrations.peft as interop

    calls = []
    original = interop.fused_lora_linear

    def recording(x, weight, bias, lora_A, lora_B, scaling, dropout_p, **kwargs):
        calls.append(dict(lora_A=lora_A, lora_B=lora_B, scaling=scaling, dropout_p=dropout_p, **kwargs))
        return original(x, weight, bias, lora_A, lora_B, scaling, dropout_p, **kwargs)

    monkeypatch.setattr(interop, "fused_lora_linear", recording)
    return calls


def peft_targeted_names(model, target_modules):
    """Qualified names of the modules PEFT wraps (relative to the plain model)."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=target_modules))
    from peft.tuners.lora import LoraLayer
    prefix = "base_model.model."
    return sorted(name[len(prefix):] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("target_modules", [
    ["q_proj", "v_proj"],
    ["down_proj", "model.layers.0.self_attn.k_proj"],
    r".*\.layers\.1\.self_attn\.(q|o)_proj",
    "all-linear",
], ids=["suffixes", "suffix-and-full-name", "regex", "all-linear"])
def test_apply_lora_targets_what_peft_targets(target_modules):
    model = tiny_llama()
    expected = peft_targeted_names(model, target_modules)
    assert expected, "PEFT matched nothing: the test would prove nothing"
    apply_lora(model, target_modules, r=2)
    ours = sorted(name for name, m in model.named_modules() if isinstance(m, FusedLoRALinear))
    assert ours == expected
    if target_modules == "all-linear":
        assert "lm_head" not in ours and len(ours) == 14


def test_apply_lora_keeps_outputs_freezes_the_rest_and_counts_like_peft(capsys):
    model = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=["q_proj", "v_proj"]))
    returned = set_backend(apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8), "torch")
    assert returned is model
    with torch.no_grad():
        assert_close_scaled("logits", model(ids).logits, before, reduction_length())  # B = 0 at init
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"model.layers.{i}.self_attn.{proj}.{ab}" for i in range(2)
                               for proj in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B"))
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.r, layer.scaling, layer.lora_A.shape, layer.lora_B.shape) == (4, 2.0, (4, 32), (32, 4))
    peft_model.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    print_trainable_parameters(model)
    assert capsys.readouterr().out == peft_line
    # q_proj 32->32 and v_proj 32->16 in 2 layers at r=4: 2 * 4 * (64 + 48).
    assert peft_line.startswith("trainable params: 896 || all params: ")


def test_apply_lora_sets_rslora_and_dropout():
    model = apply_lora(tiny_llama(), ["o_proj"], r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True)
    layer = model.model.layers[1].self_attn.o_proj
    assert layer.scaling == 4.0 and layer.lora_dropout == 0.1 and layer.use_rslora


def test_apply_lora_no_match_lists_the_names_it_saw():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules: \['query'\] matched no module.*"
                                         r"model\.layers\.0\.self_attn\.q_proj"):
        apply_lora(model, ["query"])
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


def test_apply_lora_bad_arguments():
    model = tiny_llama()
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(model, 3)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, [])
    with pytest.raises(ValueError, match="target_modules.*not a valid regular expression"):
        apply_lora(model, "(q_proj")
    with pytest.raises(ValueError, match="r: expected an int >= 1"):
        apply_lora(model, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_lora(model, ["q_proj"], lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_lora(model, ["q_proj"], lora_alpha=float("nan"))
    with pytest.raises(TypeError, match="model"):
        apply_lora("model", ["q_proj"])
    with pytest.raises(ValueError, match="'model.embed_tokens' is a Embedding"):
        apply_lora(model, ["embed_tokens"])
    apply_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already is a FusedLoRALinear"):
        apply_lora(model, ["q_proj"])


def _peft_llama(use_rslora=False, lora_dropout=0.0, **config):
    model = tiny_llama()
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, use_rslora=use_rslora,
                                  target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], **config)
    peft_model = peft.get_peft_model(model, lora_config)
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)
    return peft_model


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grads[name] = param.grad.clone()
    return logits.detach(), grads


@pytest.mark.parametrize("use_rslora", [False, True])
def test_from_peft_matches_peft_outputs_and_all_gradients(device_backend, use_rslora, fused_calls):
    device, backend = device_backend
    peft_model = _peft_llama(use_rslora=use_rslora).to(device)
    reference = copy.deepcopy(peft_model)
    ids = token_batch().to(device)
    logits_peft, grads_peft = _loss_and_grads(reference, ids)

    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    lora_A_before = q_proj.lora_A["default"].weight
    names_before = [name for name, _ in peft_model.named_parameters()]
    converted = from_peft(peft_model, backend=backend)
    assert converted is peft_model
    from peft.tuners.lora import Linear as PeftLoraLinear
    layers = [m for m in converted.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 8 and all(type(m) is fused_lora.integrations.peft.FusedPeftLinear for m in layers)
    assert converted.base_model.model.model.layers[0].self_attn.q_proj is q_proj  # the same module, same tensors
    assert q_proj.lora_A["default"].weight is lora_A_before
    assert [name for name, _ in converted.named_parameters()] == names_before
    assert q_proj.fused_adapter(torch.randn(3, 32, device=device)) == ("default", None)
    assert q_proj.fused_adapter(ids)[1] == "the input is not a (..., in_features) tensor"

    logits, grads = _loss_and_grads(converted, ids)
    assert len(fused_calls) == 8  # every LoRA layer took the fused path, once
    assert {c["scaling"] for c in fused_calls} == {8 / 2 if use_rslora else 8 / 4}
    assert {c["backend"] for c in fused_calls} == {backend}
    assert_close_scaled("logits", logits, logits_peft, reduction_length())
    assert sorted(grads) == sorted(grads_peft) and len(grads) == 16
    for name in grads:
        assert_close_scaled(f"grad {name}", grads[name], grads_peft[name], reduction_length(tokens=20))


def test_from_peft_keeps_the_dropout_probability_and_training_mode(fused_calls):
    peft_model = from_peft(_peft_llama(lora_dropout=0.1).train(), backend="torch")
    peft_model(token_batch())
    assert len(fused_calls) == 8
    assert all(c["dropout_p"] == 0.1 and c["training"] is True for c in fused_calls)
    fused_calls.clear()
    peft_model.eval()
    peft_model(token_batch())
    assert len(fused_calls) == 8 and all(c["training"] is False for c in fused_calls)


def _unchanged(peft_model):
    from peft.tuners.lora import LoraLayer
    return (not any(type(m).__name__ == "FusedPeftLinear" for m in peft_model.modules())
            and sum(isinstance(m, LoraLayer) for m in peft_model.modules()) > 0)


def test_from_peft_strict_refuses_dora():
    peft_model = _peft_llama(use_dora=True)
    with pytest.raises(ValueError, match=r"module '.*q_proj' uses DoRA"):
        from_peft(peft_model, strict=True)
    assert _unchanged(peft_model)


def test_from_peft_strict_refuses_lora_bias():
    peft_model = _peft_llama(lora_bias=True)
    with pytest.raises(ValueError, match=r"module '.*q_proj' uses lora_bias=True"):
        from_peft(peft_model, strict=True)
    assert _unchanged(peft_model)


def _gpt2_style(with_linear=False):
    from transformers.pytorch_utils import Conv1D

    class GPT2Style(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(12, 8)  # (in, out) weight: PEFT sets fan_in_fan_out=True
            self.proj = nn.Linear(12, 8) if with_linear else None

        def forward(self, x):
            y = self.c_attn(x)
            return self.proj(torch.tanh(y)) if self.proj is not None else y

    torch.manual_seed(4)
    targets = ["c_attn", "proj"] if with_linear else ["c_attn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out set to False for the nn.Linear
        peft_model = peft.get_peft_model(GPT2Style(), peft.LoraConfig(r=2, target_modules=targets,
                                                                       fan_in_fan_out=True))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    return peft_model


def test_from_peft_strict_refuses_fan_in_fan_out():
    peft_model = _gpt2_style()
    with pytest.raises(ValueError, match=r"module '.*c_attn' uses fan_in_fan_out=True"):
        from_peft(peft_model, strict=True)
    assert _unchanged(peft_model)


def _int8_base(peft_model):
    # bitsandbytes stands in: an int8 weight, as a quantised base layer holds.
    q_proj = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    base = q_proj.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach().to(torch.int8), requires_grad=False)
    return peft_model


def test_from_peft_strict_refuses_quantised_base_layers():
    peft_model = _int8_base(_peft_llama())
    with pytest.raises(ValueError, match=r"module '.*layers\.1\.self_attn\.q_proj'.*quantised base layers"):
        from_peft(peft_model, strict=True)
    assert _unchanged(peft_model)


# --------------------------------------------------------------------------- from_peft fuses what it can

def _outputs_and_grads_equal_peft(peft_model, run, n):
    """run(model) -> (output, {name: grad}) on peft_model converted and on an unconverted twin."""
    reference = copy.deepcopy(peft_model)
    expected, expected_grads = run(reference)
    converted = from_peft(peft_model, backend="torch")
    got, grads = run(converted)
    assert_close_scaled("output", got, expected, n)
    assert sorted(grads) == sorted(expected_grads) and grads
    for name in grads:
        assert_close_scaled(f"grad {name}", grads[name], expected_grads[name], n + 20)
    return converted


LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_from_peft_fuses_the_linear_layers_beside_an_embedding_lora(fused_calls, caplog):
    # Before: the Embedding LoRA made from_peft refuse the whole model; no layer was fused.
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=LINEAR_TARGETS + ["embed_tokens"]))
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            nn.init.normal_(param, std=0.2)
    caplog.set_level("INFO", logger="fused_lora.integrations.peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "none fused" warning
        converted = _outputs_and_grads_equal_peft(peft_model, _loss_and_grads_of, reduction_length(tokens=20))
    assert len(fused_calls) == 14  # every linear LoRA layer took the fused path
    summary = converted.fused_lora_summary
    assert len(summary.fused) == 14 and summary.total == 15
    (reason, names), = summary.not_fused.items()
    assert names == ("base_model.model.model.embed_tokens",)
    assert reason.startswith("is a peft.tuners.lora.layer.Embedding over a Embedding")
    embedding = converted.base_model.model.model.embed_tokens
    assert type(embedding).__name__ == "Embedding" and type(embedding).__module__ == "peft.tuners.lora.layer"
    assert "from_peft: 14 of 15 PEFT LoRA modules take the fused path; 1 keep PEFT's own forward" in caplog.text
    # A partly converted model's adapter cannot be written by save_adapter without the Embedding's.
    with pytest.raises(ValueError, match="'model.embed_tokens' is a PEFT LoRA module that from_peft left to PEFT"):
        fused_lora.save_adapter(converted, "/nonexistent")


def _loss_and_grads_of(model):
    return _loss_and_grads(model, token_batch())


def _squares_and_grads_of(model):
    """(y, {name: grad}) of sum(y * y) over a fixed (3, 5, 8) input (the small 8-feature models)."""
    model.zero_grad()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    y = model(x)
    (y * y).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_from_peft_keeps_a_conv1d_lora_and_fuses_the_linear_beside_it(fused_calls):
    converted = _outputs_and_grads_equal_peft(_gpt2_style(with_linear=True), _squares_and_grads_of, 8 + 12 + 2)
    assert len(fused_calls) == 1
    summary = converted.fused_lora_summary
    assert summary.fused == ("base_model.model.proj",)
    assert summary.not_fused == {"uses fan_in_fan_out=True (Conv1D-style weights)": ("base_model.model.c_attn",)}


class _AttentionAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.mha(x, x, x, need_weights=False)[0])


def test_from_peft_keeps_a_multihead_attention_lora_and_its_out_proj(fused_calls):
    # PEFT wraps the attention's out_proj as a lora.Linear, which nn.MultiheadAttention never calls (it
    # reads out_proj.weight; PEFT merges the adapter around the call). Before, from_peft counted that
    # out_proj as fused, and called the attention "a quantised base layer" (it has no .weight).
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_AttentionAndLinear(), peft.LoraConfig(r=2, target_modules=["mha", "proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.2)

    converted = _outputs_and_grads_equal_peft(peft_model, _squares_and_grads_of, 8 * 3 + 5)
    summary = converted.fused_lora_summary
    assert summary.fused == ("base_model.model.proj",) and len(fused_calls) == 1
    assert summary.not_fused == {
        "is a peft.tuners.lora.layer.MultiheadAttention over a MultiheadAttention (fused_lora fuses "
        "peft.tuners.lora.Linear over torch.nn.Linear only)": ("base_model.model.mha",),
        "is the out_proj of a MultiheadAttention, which reads its weight directly (PEFT merges the adapter "
        "around each call; a fused forward would never run)": ("base_model.model.mha.base_layer.out_proj",)}


def test_a_converted_model_prints_as_peft_s():
    # PEFT's repr of a LoRA layer is "lora." + the class name; from_peft's class used to show there
    # ("lora.FusedPeftLinear(", which PEFT's own test_repr_lora_linear refuses).
    peft_model = _peft_llama()
    expected = repr(peft_model)
    converted = from_peft(peft_model, backend="torch")
    assert type(converted.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "FusedPeftLinear"
    assert repr(converted) == expected
    assert repr(converted.base_model.model.model.layers[0].self_attn.q_proj).startswith("lora.Linear(")


def test_from_peft_warns_when_nothing_can_be_fused(fused_calls):
    with pytest.warns(UserWarning, match=r"(?s)from_peft: 0 of 1 PEFT LoRA modules.*fan_in_fan_out.*no module "
                                         r"could be fused"):
        converted = from_peft(_gpt2_style())
    assert converted.fused_lora_summary.fused == () and _unchanged(converted)
    peft_model = _peft_llama(use_dora=True)
    reference = copy.deepcopy(peft_model)
    with pytest.warns(UserWarning, match="no module could be fused"):
        converted = _outputs_and_grads_equal_peft(peft_model, _loss_and_grads_of, reduction_length(tokens=20))
    assert converted.fused_lora_summary.not_fused == {"uses DoRA (use_dora=True)": tuple(
        name for name, m in reference.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))}
    assert len(converted.fused_lora_summary.not_fused["uses DoRA (use_dora=True)"]) == 8
    assert not fused_calls and _unchanged(converted)


@pytest.mark.parametrize("change,reason", [
    (_int8_base, "has a base layer Linear with weight dtype torch.int8"),
    (lambda m: m, None),
], ids=["quantised-base", "none"])
def test_from_peft_summary_counts_and_reasons(change, reason, fused_calls):
    peft_model = change(_peft_llama())
    converted = from_peft(peft_model, backend="torch")
    summary = converted.fused_lora_summary
    if reason is None:
        assert len(summary.fused) == 8 and summary.not_fused == {}
        assert str(summary) == "from_peft: 8 of 8 PEFT LoRA modules take the fused path"
    else:
        assert len(summary.fused) == 7
        (got, names), = summary.not_fused.items()
        assert got.startswith(reason) and "quantised base layers are not supported" in got
        assert names == ("base_model.model.model.layers.1.self_attn.q_proj",)
        assert repr(summary) == f"FromPeftSummary(fused=7, not_fused={{{got!r}: 1}})"
        return  # the int8 stand-in cannot run (PEFT's forward neither)
    converted(token_batch())
    assert len(fused_calls) == len(summary.fused)


def test_from_peft_bad_arguments():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        from_peft(tiny_llama())
    with pytest.raises(TypeError, match="peft_model"):
        from_peft(None)
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        from_peft(_peft_llama(), backend="cuda")
    with pytest.raises(TypeError, match="strict: expected a bool"):
        from_peft(_peft_llama(), strict=1)


def test_converted_model_pickles_and_deep_copies(tmp_path, fused_calls):
    peft_model = from_peft(_peft_llama(), backend="torch")
    ids = token_batch()
    with torch.no_grad():
        expected = peft_model(ids).logits
    path = tmp_path / "model.pt"
    torch.save(peft_model, path)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(peft_model)):
        assert type(other.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "FusedPeftLinear"
        fused_calls.clear()
        with torch.no_grad():
            assert torch.equal(other(ids).logits, expected), "a pickled or copied model computes otherwise"
        assert len(fused_calls) == 8


def test_public_names():
    for name in ("apply_lora", "from_peft", "save_adapter", "load_adapter", "print_trainable_parameters"):
        assert callable(getattr(fused_lora, name)), name


# --------------------------------------------------------------------------- what apply_lora refuses or skips

class _Half(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_apply_lora_refuses_subclass_forwards_and_hooks():
    # The reproducer: before, apply_lora dropped both, and the output moved by 100.
    torch.manual_seed(0)
    model = nn.Sequential(_Half(8, 8), nn.Linear(8, 8))
    model[1].register_forward_hook(lambda module, args, out: out + 100)
    x = torch.randn(3, 8)
    before = model(x)
    with pytest.raises(ValueError, match=r"target_modules: module '0' is a .*_Half, a subclass of torch.nn.Linear "
                                         r"with its own forward"):
        apply_lora(model, ["0", "1"], r=2)
    with pytest.raises(ValueError, match=r"target_modules: module '1' has 1 forward hooks"):
        apply_lora(model, ["1"], r=2)
    assert type(model[0]) is _Half and type(model[1]) is nn.Linear and model[1].weight.requires_grad
    assert torch.equal(model(x), before)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
        self.hooked = nn.Linear(16, 16)
        self.hooked.register_forward_pre_hook(lambda module, args: None)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.attention(x, x, x, need_weights=False)[0]
        return self.head(self.hooked(self.block(x)))


def test_weights_read_by_the_parent_are_refused_by_name_and_skipped_by_all_linear():
    model = _Encoder()
    with pytest.raises(ValueError, match=r"module 'attention.out_proj' is read directly by its parent "
                                         r"MultiheadAttention .*would get no gradient"):
        apply_lora(model, ["out_proj"])
    with pytest.raises(ValueError, match=r"module 'block.linear1' is read directly by its parent "
                                         r"TransformerEncoderLayer"):
        apply_lora(model, r"block\.linear\d")
    # Before: all-linear took block.linear1 and block.linear2, which the layer's inference fast
    # path reads as weights (the adapter would change nothing there).
    apply_lora(model, "all-linear", r=2)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)) == ["head"]
    assert type(model.block.linear1) is nn.Linear and type(model.hooked) is nn.Linear


def test_a_fused_layer_where_the_parent_reads_the_weight_would_do_nothing():
    """Why the rule above: a FusedLoRALinear put there by hand gets no gradient and changes no output."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    before = attention(x, x, x, need_weights=False)[0]
    layer = FusedLoRALinear.from_linear(attention.out_proj, r=2)
    nn.init.normal_(layer.lora_B)
    attention.out_proj = layer
    y = attention(x, x, x, need_weights=False)[0]
    assert torch.equal(y, before)
    y.sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None


def test_apply_lora_adapter_dtype():
    model = apply_lora(tiny_llama().to(torch.bfloat16), ["q_proj"], r=2)
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    model = apply_lora(tiny_llama().to(torch.bfloat16), ["q_proj"], r=2, adapter_dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.lora_B.dtype == torch.bfloat16
    model = tiny_llama()
    with pytest.raises(TypeError, match="adapter_dtype"):
        apply_lora(model, ["q_proj"], adapter_dtype=torch.float16)
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
