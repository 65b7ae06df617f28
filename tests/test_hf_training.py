"""transformers' Trainer and TRL's SFTTrainer on pyqlora's layers, and one run of the whole recipe on SmolLM2.

Oracles: an uninterrupted run (a resumed one must end bit-identical), the files PEFT
writes, the adapted model's logits before saving (the reloaded one must give the
same), closed-form adapter counts on the real model's shapes.
"""
import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from support import tiny_llama_config  # noqa: E402

import pyqlora.hf  # noqa: E402,F401
from pyqlora.hf import PeftLinear4bit, PyqloraConfig, paged_adamw  # noqa: E402
from pyqlora.lora import LoraConfig, prepare_model  # noqa: E402
from pyqlora.optim import PagedAdamW, PagedAdamW8bit  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 7]])


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(transformers, hidden_size=64, intermediate_size=128))
    path = tmp_path_factory.mktemp("hf") / "dense"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def peft_model(path, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=PyqloraConfig(compute_dtype="float32"))
    model = peft.prepare_model_for_kbit_training(model)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))


def training_args(out, steps, **kw):
    kw = {**dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                 save_steps=2, logging_steps=1, report_to=[], seed=0, use_cpu=True, warmup_steps=1,
                 gradient_checkpointing=True, disable_tqdm=True), **kw}
    return transformers.TrainingArguments(**kw)


def adapters(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_trainer_with_paged_adamw_resumes_bit_exactly(dense_dir, data, tmp_path):
    model = peft_model(dense_dir)
    opt = paged_adamw(model, lr=1e-2)
    assert isinstance(opt, PagedAdamW) and len(opt.param_groups[0]["params"]) == 28
    start = adapters(model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", 4), train_dataset=data,
                                   optimizers=(opt, None))
    trainer.train()
    full = adapters(model)
    assert any(not torch.equal(full[k], start[k]) for k in full)
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert "model.safetensors" not in files
    # a fresh run (other initial adapters) resumed from the checkpoint after step 2 ends where the full run ended
    again = peft_model(dense_dir, seed=5)
    resumed = transformers.Trainer(model=again, args=training_args(tmp_path / "run2", 4), train_dataset=data,
                                   optimizers=(paged_adamw(again, lr=1e-2), None))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = adapters(again)
    assert after.keys() == full.keys()
    assert all(torch.equal(after[k], full[k]) for k in full)
    # save_model writes the adapter (PEFT's files), which reloads on a pyqlora base with the same logits
    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "final"))
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(tmp_path / "final"), quantization_config=PyqloraConfig(compute_dtype="float32"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_paged_adamw_arguments():
    model = torch.nn.Linear(8, 8)
    assert isinstance(paged_adamw(model, bits=8), PagedAdamW8bit)
    with pytest.raises(ValueError, match="bits"):
        paged_adamw(model, bits=4)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        paged_adamw(model)


def test_trainer_save_model_of_a_pyqlora_prepared_model_writes_the_adapter(dense_dir, data, tmp_path):
    """Not a PEFT model: save_model must not write the 4-bit base under keys transformers reads as missing."""
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "run", 2, save_strategy="no",
                                                                    gradient_checkpointing=False),
                                   train_dataset=data, optimizers=(paged_adamw(model, lr=1e-2), None))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == dense_dir
    # the base named in the config, quantized as prepare_model quantized it, plus the adapter
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(tmp_path / "final"), quantization_config=PyqloraConfig(compute_dtype="float32"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
    # a 4-bit model prepared without PEFT: transformers refuses to train it rather than saving garbage later
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=PyqloraConfig(compute_dtype="float32"))
    prepare_model(quantized, LoraConfig(r=4))
    with pytest.raises(ValueError, match="adapters"):
        transformers.Trainer(model=quantized, args=training_args(tmp_path / "q", 1), train_dataset=data)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_sft_trainer_with_peft_config(dense_dir, tmp_path):
    trl = pytest.importorskip("trl")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=PyqloraConfig(compute_dtype="float32"))
    text = datasets.Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(10))
                                                for i in range(16)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, logging_steps=1, max_length=16, save_strategy="no", disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text, processing_class=tiny_tokenizer(),
                             peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sum(isinstance(m, PeftLinear4bit) for m in trainer.model.modules()) == 14
    before = adapters(trainer.model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = adapters(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    trainer.save_model(str(tmp_path / "out"))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "out")


@pytest.mark.slow
def test_the_recipe_on_smollm2(tmp_path):
    """The standard script on the real SmolLM2-135M: load 4-bit, PEFT all-linear, a Trainer step with
    pyqlora's paged AdamW (one step), save the adapter, reload base + adapter with the same logits."""
    from pyqlora.app.checkpoint import resolve_model

    try:
        folder, _ = resolve_model(None)
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"SmolLM2-135M is not available: {exc}")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=PyqloraConfig(compute_dtype="float32"))
    cfg = model.config
    assert sum(isinstance(m, pyqlora.nn.Linear4bit) for m in model.modules()) == 7 * cfg.num_hidden_layers
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size //
                                                                                   cfg.num_attention_heads)
    per_layer = 8 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert model.get_nb_trainable_parameters()[0] == per_layer * cfg.num_hidden_layers == 2_442_240
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(["def add(a, b):\n    return a + b\n"] * 4, return_tensors="pt")
    data = datasets.Dataset.from_dict({"input_ids": enc["input_ids"].tolist(), "labels": enc["input_ids"].tolist()})
    trainer = transformers.Trainer(model=model, train_dataset=data, optimizers=(paged_adamw(model, lr=1e-3), None),
                                   args=training_args(tmp_path / "run", 1, save_strategy="no", learning_rate=1e-3,
                                                      per_device_train_batch_size=1, gradient_checkpointing=False,
                                                      warmup_steps=0))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    trainer.train()
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "lora_B" in k)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(tmp_path / "adapter"), quantization_config=PyqloraConfig(compute_dtype="float32"))
    model.eval()
    ids = enc["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
