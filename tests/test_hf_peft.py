"""PEFT on pyqlora's 4-bit layers: get_peft_model, adapters, merging, modules_to_save, no LoRA inside LoRA;
pyqlora.lora.prepare_model with a peft.LoraConfig and on a model that is 4-bit already.

Oracles: PEFT's own LoRA layers on a dense copy of the model whose weights are the
decoded 4-bit weights (same adapters: same logits and gradients up to float32
rounding), closed-form parameter counts, the checkpoint's bytes.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from support import tiny_llama_config  # noqa: E402

import pyqlora.hf  # noqa: E402,F401
from pyqlora.hf import PeftLinear4bit, PyqloraConfig  # noqa: E402
from pyqlora.lora import LoraConfig, lora_layers, prepare_model, save_adapter  # noqa: E402
from pyqlora.nn import Linear4bit, dequantize_weight  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 7], [3, 4, 8, 16, 32, 63, 0, 11]])
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64), "gate_proj": (128, 64),
          "up_proj": (128, 64), "down_proj": (64, 128)}  # (out, in) of the tiny Llama below


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(transformers, hidden_size=64, intermediate_size=128))
    path = tmp_path_factory.mktemp("hf") / "dense"
    model.save_pretrained(path)
    return str(path)


def load(path, **kw):
    kw.setdefault("quantization_config", PyqloraConfig(compute_dtype="float32"))
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw)


def lora_count(r, names=SHAPES, layers=2):
    return layers * sum(r * (SHAPES[n][0] + SHAPES[n][1]) for n in names)


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def dense_twin(model4):
    """A dense copy of a 4-bit model: every Linear4bit an nn.Linear holding its decoded weight."""
    twin = transformers.LlamaForCausalLM(model4.config)
    four_bit = {n: m for n, m in model4.named_modules() if isinstance(m, Linear4bit)}
    twin.load_state_dict({k: v for k, v in model4.state_dict().items()
                          if not any(k.startswith(n + ".weight") for n in four_bit)}, strict=False)
    for name, m in four_bit.items():
        twin.get_submodule(name).weight.data = dequantize_weight(m.quantized, torch.float32)
    twin.tie_weights()
    return twin.eval()


def test_get_peft_model_wraps_every_linear4bit_with_peft_layers(dense_dir):
    model = load(dense_dir)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    wrapped = {n: m for n, m in pm.named_modules() if isinstance(m, PeftLinear4bit)}
    assert len(wrapped) == 14
    assert all(isinstance(m.base_layer, Linear4bit) for m in wrapped.values())
    assert type(pm.base_model.model.lm_head) is torch.nn.Linear  # the head is not a target
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == lora_count(4)
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, base)  # B = 0: the adapted model starts as the base
    listed = peft.get_peft_model(load(dense_dir), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert listed.get_nb_trainable_parameters()[0] == lora_count(2, ["q_proj", "v_proj"])
    assert {n.rsplit(".", 1)[1] for n, m in listed.named_modules() if isinstance(m, PeftLinear4bit)} == {"q_proj",
                                                                                                          "v_proj"}


def test_register_custom_module_with_the_peft_layer(dense_dir):
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"])
    cfg._register_custom_module({Linear4bit: PeftLinear4bit})
    pm = peft.get_peft_model(load(dense_dir), cfg)
    assert sum(isinstance(m, PeftLinear4bit) for m in pm.modules()) == 2


def test_adapters_compute_what_peft_computes_on_the_decoded_weights(dense_dir):
    """Forward, gradients, several adapters, set_adapter and disable_adapter against PEFT on a dense twin."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    other = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"])
    model = load(dense_dir)
    twin = dense_twin(model)
    pm, pt = peft.get_peft_model(model, cfg), peft.get_peft_model(twin, cfg)
    pm.add_adapter("other", other)
    pt.add_adapter("other", other)
    randomize_adapters(pm)
    pt.load_state_dict({k: v for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)
    for adapter in ("default", "other"):
        pm.set_adapter(adapter)
        pt.set_adapter(adapter)
        out, ref = pm(input_ids=IDS, labels=IDS), pt(input_ids=IDS, labels=IDS)
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-5)
        out.loss.backward()
        ref.loss.backward()
        grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
        ref_grads = {n: p.grad for n, p in pt.named_parameters() if p.requires_grad}
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4)
        pm.zero_grad()
        pt.zero_grad()
    with torch.no_grad(), pm.disable_adapter():
        plain = pm(input_ids=IDS).logits
    with torch.no_grad():
        assert torch.equal(plain, load(dense_dir)(input_ids=IDS).logits)


def test_merge_dequantizes_into_dense_layers_and_unmerge_restores_the_4bit_ones(dense_dir, tmp_path):
    pm = peft.get_peft_model(load(dense_dir), peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    randomize_adapters(pm)
    pm.eval()
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    base4, packed = layer.base_layer, layer.base_layer.quantized.packed.copy()
    with torch.no_grad():
        adapted = pm(input_ids=IDS).logits
        with pytest.warns(UserWarning, match="de-quantizes"):
            pm.merge_adapter()
        assert type(layer.base_layer) is torch.nn.Linear
        expected = dequantize_weight(base4.quantized, torch.float32) + layer.get_delta_weight("default")
        assert torch.equal(layer.base_layer.weight, expected)
        torch.testing.assert_close(pm(input_ids=IDS).logits, adapted, atol=2e-5, rtol=1e-5)
        pm.unmerge_adapter()
        assert layer.base_layer is base4 and np.array_equal(base4.quantized.packed, packed)
        assert torch.equal(pm(input_ids=IDS).logits, adapted)
        with pytest.warns(UserWarning, match="de-quantizes"):
            merged = pm.merge_and_unload()
        assert not any(isinstance(m, (Linear4bit, PeftLinear4bit)) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, atol=2e-5, rtol=1e-5)
    # a model with no 4-bit layer left saves as a dense model, which plain transformers loads
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, merged(input_ids=IDS).logits)


def test_modules_to_save_trains_and_saves(dense_dir, tmp_path):
    cfg = peft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(load(dense_dir), cfg)
    head = pm.base_model.model.lm_head
    before = head.modules_to_save["default"].weight.detach().clone()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert not torch.equal(head.modules_to_save["default"].weight, before)
    pm.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any("lm_head" in k for k in keys)
    again = peft.PeftModel.from_pretrained(load(dense_dir), tmp_path / "adapter")
    pm.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, pm(input_ids=IDS).logits)


def test_no_lora_inside_lora(dense_dir):
    prepared = load(dense_dir)
    prepare_model(prepared, LoraConfig(r=4))
    with pytest.raises(ValueError, match="already has pyqlora's LoRA"):
        peft.get_peft_model(prepared, peft.LoraConfig(r=4, target_modules="all-linear"))
    prepared = load(dense_dir)
    prepare_model(prepared, LoraConfig(r=4))
    with pytest.raises(ValueError, match="LoRA inside LoRA"):  # pyqlora's adapters are ModuleDict entries "default"
        peft.get_peft_model(prepared, peft.LoraConfig(r=4, target_modules=["default"]))
    with pytest.raises(ValueError, match="LoRA inside LoRA"):
        prepare_model(prepared, LoraConfig(r=4, target_modules=r".*lora_A.*"))
    with pytest.raises(ValueError, match="prepare_model was called"):
        prepare_model(prepared, LoraConfig(r=4))
    pm = peft.get_peft_model(load(dense_dir), peft.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="LoRA inside LoRA"):
        prepare_model(pm, LoraConfig(r=4, target_modules=["lora_A.default"]))


def test_prepare_model_takes_a_peft_lora_config(dense_dir):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["k_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                          lora_dropout=0.1, task_type="CAUSAL_LM")
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    report = prepare_model(model, cfg)
    assert len(report.replaced) == 12 and not report.already_4bit
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.mlp.down_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.q_proj"].lora_alpha["default"] == 3
    assert layers["model.layers.0.self_attn.q_proj"].lora_alpha["default"] == 8
    assert isinstance(layers["model.layers.0.mlp.up_proj"].lora_dropout["default"], torch.nn.Dropout)
    # the same config through PEFT on the same model loaded 4-bit: the same adapters
    pm = peft.get_peft_model(load(dense_dir), cfg)
    assert report.trainable_params == pm.get_nb_trainable_parameters()[0]
    for field, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("init_lora_weights", "pissa"),
                         ("bias", "all"), ("layers_to_transform", [0])):
        kw = {"layers_pattern": "layers"} if field == "layers_to_transform" else {}
        bad = peft.LoraConfig(r=4, target_modules=["q_proj"], **{field: value}, **kw)
        with pytest.raises(ValueError, match=field):
            prepare_model(transformers.AutoModelForCausalLM.from_pretrained(dense_dir), bad)


def test_prepare_model_adapts_layers_that_are_4bit_already(dense_dir, tmp_path):
    """A model loaded from a 4-bit checkpoint gets adapters on its Linear4bit layers, which are not re-quantized."""
    model = load(dense_dir)
    bases = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    bytes_before = {n: m.quantized.packed.copy() for n, m in bases.items()}
    report = prepare_model(model, LoraConfig(r=4, lora_alpha=8, codebook="fp4"))  # codebook: for dense layers only
    assert sorted(report.already_4bit) == sorted(bases) == sorted(report.replaced)
    assert report.trainable_params == lora_count(4)
    for name, layer in lora_layers(model):
        assert layer.base_layer is bases[name]
        assert np.array_equal(layer.base_layer.quantized.packed, bytes_before[name])
    assert "already 4-bit" in str(report)
    # the command line's loader of a 4-bit checkpoint (pyqlora quantize) gives such a model too
    from pyqlora.app.checkpoint import load_model, quantize_checkpoint

    quantize_checkpoint(dense_dir, tmp_path / "q4")
    loaded, _, info = load_model(str(tmp_path / "q4"), tokenizer=False)
    assert info["quantized"]
    from safetensors.torch import load_file

    written = load_file(tmp_path / "q4" / "model.safetensors")
    report = prepare_model(loaded, LoraConfig(r=4))
    assert len(report.already_4bit) == 14
    for name, layer in lora_layers(loaded):
        assert np.array_equal(layer.base_layer.quantized.packed, written[name + ".weight"].numpy().reshape(-1))
    with pytest.raises(ValueError, match="LoftQ"):
        prepare_model(load(dense_dir), LoraConfig(r=4, init_lora_weights="loftq"))


def test_save_adapter_writes_a_config_auto_peft_model_reloads(dense_dir, tmp_path):
    """save_adapter's adapter_config.json is complete: AutoPeftModelForCausalLM rebuilds base + adapter."""
    model = load(dense_dir)
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == dense_dir and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["peft_type"] == "LORA" and cfg["revision"] is None and cfg["modules_to_save"] is None
    assert sorted(cfg["target_modules"]) == sorted(SHAPES)
    again = peft.AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "adapter", quantization_config=PyqloraConfig(compute_dtype="float32"))
    assert sum(isinstance(m, PeftLinear4bit) for m in again.modules()) == 14
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)
    # save_pretrained of a prepared transformers model (what Trainer.save_model calls) writes the adapter
    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["adapter_config.json", "adapter_model.safetensors"]
