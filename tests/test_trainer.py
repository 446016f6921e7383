"""A transformers.Trainer run on a PEFT model converted with from_peft: checkpoints hold the
trained adapter, and resuming from one gives what uninterrupted training gives.

A tiny random-init Llama built from a config (nothing downloaded), LoRA with dropout 0.1
(so the resumed run must also restore the RNG that draws the dropout seeds), AdamW.
"""

import copy
import os

import pytest
import torch

from fused_lora import from_peft

from tiny_models import reduction_length, tiny_llama
from tolerances import assert_close_scaled

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STEPS, SAVE_STEPS, BATCH, LENGTH = 6, 3, 4, 12


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count=STEPS * BATCH, length=LENGTH, vocab=96):
        gen = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, vocab, (count, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _model():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    return from_peft(model)


def _trainer(model, output_dir):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS, save_steps=SAVE_STEPS,
        learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=0,
        use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        save_only_model=False)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())


def _adapter(model):
    from peft import get_peft_model_state_dict
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _saved_adapter(directory):
    from safetensors.torch import load_file
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_trainer_checkpoints_hold_the_adapter_and_resume_matches(tmp_path, monkeypatch):
    import fused_lora.integrations.peft as interop

    calls = []
    original = interop.fused_lora_linear
    monkeypatch.setattr(interop, "fused_lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))

    model = _model()
    initial = _adapter(model)
    twin = copy.deepcopy(model)  # the same initial adapter, for the resumed run
    _trainer(model, tmp_path / "straight").train()
    assert calls, "the converted model never took the fused path"
    trained = _adapter(model)
    assert len(trained) == 2 * 2 * 3  # lora_A and lora_B of q, v, up in 2 layers

    final = _saved_adapter(tmp_path / "straight" / f"checkpoint-{STEPS}")
    middle = _saved_adapter(tmp_path / "straight" / f"checkpoint-{SAVE_STEPS}")
    assert sorted(final) == sorted(trained)
    for key in trained:
        assert torch.equal(final[key], trained[key]), f"checkpoint-{STEPS} {key} is not the trained adapter"
    assert any(not torch.equal(middle[k], initial[k]) for k in initial), "training changed nothing by step 3"
    assert any(not torch.equal(middle[k], final[k]) for k in final), "steps 4-6 changed nothing"

    _trainer(twin, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{SAVE_STEPS}"))
    resumed = _adapter(twin)
    for key in trained:
        assert_close_scaled(f"resumed {key}", resumed[key], trained[key], reduction_length(tokens=STEPS * BATCH * LENGTH))
