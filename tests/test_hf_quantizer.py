"""pyqlora.hf's transformers quantizer: from_pretrained(quantization_config=PyqloraConfig()).

Oracles: pyqlora.quantize on the checkpoint's dense weights (the bytes each layer must
hold), bitsandbytes' own 4-bit checkpoints (read byte for byte), stock transformers +
bitsandbytes in a subprocess that never imports pyqlora (it must load what we save,
decoding to the same weights), PEFT's prepare_model_for_kbit_training, and the peak
resident memory of a dense load, each in its own process.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from support import run_doctests, tiny_llama_config  # noqa: E402

import pyqlora as pq  # noqa: E402
import pyqlora.hf  # noqa: E402,F401
from pyqlora.hf import PyqloraConfig  # noqa: E402
from pyqlora.nn import Linear4bit, dequantize_weight  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name", ["pyqlora.hf.config", "pyqlora.hf.training"])
def test_docstring_examples(name):
    import importlib

    result = run_doctests(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0, result


def tiny_config(**overrides):
    # rows of 64 and 128 elements: bitsandbytes' CPU decoder misreads blocks that span rows (docs/format.md, 6)
    return tiny_llama_config(transformers, hidden_size=64, intermediate_size=128, **overrides)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A random two-layer Llama saved as a dense float32 Hugging Face folder."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config())
    path = tmp_path_factory.mktemp("hf") / "dense"
    model.save_pretrained(path)
    return str(path)


def load(path, **kw):
    kw.setdefault("quantization_config", PyqloraConfig(compute_dtype="float32"))
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw)


def dense_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 7]])


def test_from_pretrained_quantizes_every_linear_layer_but_the_head(dense_dir):
    model = load(dense_dir)
    weights = dense_weights(dense_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(layers) == sorted(f"model.layers.{i}.{'mlp' if p in LINEARS[4:] else 'self_attn'}.{p}"
                                    for i in range(2) for p in LINEARS)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.is_loaded_in_4bit and model.quantization_method == "pyqlora"
    for name, layer in layers.items():
        expected = pq.quantize(weights[name + ".weight"].numpy(), codebook="nf4", blocksize=64, double_quant=True)
        got = layer.quantized
        assert np.array_equal(got.packed, expected.packed), name
        assert np.array_equal(got.absmax, expected.absmax) and np.array_equal(got.nested_absmax,
                                                                              expected.nested_absmax)
        assert got.nested_offset == expected.nested_offset
        assert layer.compute_dtype == torch.float32
        assert not any(p.requires_grad for p in layer.parameters())
    # the same model quantized by hand, layer by layer, computes the same logits
    oracle = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    for name in layers:
        parent, _, child = name.rpartition(".")
        dense = oracle.get_submodule(name)
        setattr(oracle.get_submodule(parent), child, Linear4bit.from_linear(dense, compute_dtype=torch.float32))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, oracle(input_ids=IDS).logits)


def test_a_dict_with_quant_method_pyqlora_builds_pyqlora_layers(dense_dir):
    """{"quant_method": "pyqlora", "load_in_4bit": True} used to build bitsandbytes layers silently."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config={"quant_method": "pyqlora", "load_in_4bit": True, "compute_dtype": "float32"})
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model.quantization_method == "pyqlora"


def test_compute_dtype_none_follows_the_hardware_rule_and_options_apply(dense_dir):
    model = load(dense_dir, quantization_config=PyqloraConfig(codebook="fp4", blocksize=128, double_quant=False,
                                                              skip_modules=["down_proj"]))
    rule = getattr(torch, pq.default_compute_dtype()[0])
    q = model.model.layers[1].self_attn.o_proj
    assert isinstance(q, Linear4bit) and q.compute_dtype == rule
    assert (q.codebook, q.blocksize, q.double_quant) == ("fp4", 128, False)
    assert all(type(model.model.layers[i].mlp.down_proj) is torch.nn.Linear for i in range(2))
    cfg = json.loads(model.config.to_json_string())["quantization_config"]
    assert cfg["bnb_4bit_compute_dtype"] == str(rule).replace("torch.", "")
    assert cfg["llm_int8_skip_modules"] == sorted(["lm_head", "model.layers.0.mlp.down_proj",
                                                   "model.layers.1.mlp.down_proj"])


STOCK = textwrap.dedent("""
    import sys, torch, transformers, bitsandbytes as bnb
    from safetensors.torch import save_file
    for folder in sys.argv[1:]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                out[name] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().contiguous()
        save_file(out, folder + "/decoded_by_bnb.safetensors")
        print(len(out), type(model.lm_head).__name__)
    assert not [k for k in sys.modules if k.split(".")[0] == "pyqlora"], "pyqlora was imported"
""")


@pytest.mark.slow
def test_save_pretrained_loads_in_stock_transformers_and_bitsandbytes(dense_dir, tmp_path):
    """What we save is bitsandbytes' checkpoint: transformers + bitsandbytes, without pyqlora, decode the same."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    settings = {"nf4": ("nf4", True), "fp4": ("fp4", False)}
    models = {}
    for name, (codebook, double_quant) in settings.items():
        models[name] = load(dense_dir, quantization_config=PyqloraConfig(codebook=codebook, double_quant=double_quant,
                                                                         compute_dtype="float32"))
        models[name].save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"]
        assert (saved["bnb_4bit_quant_type"], saved["bnb_4bit_use_double_quant"]) == (codebook, double_quant)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", STOCK] + [str(tmp_path / n) for n in settings], capture_output=True,
                         text=True, cwd=str(tmp_path), env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["14", "Linear", "14", "Linear"]
    for name, model in models.items():
        decoded = load_file(tmp_path / name / "decoded_by_bnb.safetensors")
        for layer_name, layer in model.named_modules():
            if isinstance(layer, Linear4bit):
                assert torch.equal(decoded[layer_name], dequantize_weight(layer.quantized, torch.float32)), layer_name


@pytest.mark.parametrize("codebook,double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_byte_for_byte(dense_dir, tmp_path, codebook, double_quant):
    """A folder bitsandbytes wrote loads into Linear4bit layers holding its bytes, and saves back the same."""
    pytest.importorskip("bitsandbytes")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=codebook,
                                              bnb_4bit_use_double_quant=double_quant,
                                              bnb_4bit_compute_dtype=torch.float32)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_cfg)
    bnb_model.save_pretrained(tmp_path / "bnb")
    written = dense_weights(str(tmp_path / "bnb"))
    model = load(str(tmp_path / "bnb"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    state = model.state_dict()
    for name, layer in layers.items():
        keys = [k for k in written if k == name + ".weight" or k.startswith(name + ".weight.")]
        assert len(keys) == (6 if double_quant else 4)
        for k in keys:
            assert torch.equal(state[k].view(-1).view(torch.uint8), written[k].view(-1).view(torch.uint8)), k
        assert (layer.codebook, layer.double_quant) == (codebook, double_quant)
    # saving gives the same tensors again
    model.save_pretrained(tmp_path / "again")
    again = dense_weights(str(tmp_path / "again"))
    assert again.keys() == written.keys()
    assert all(torch.equal(again[k], written[k]) for k in written)


def test_our_folder_reloads_with_pyqlora_and_the_same_logits(dense_dir, tmp_path):
    model = load(dense_dir)
    model.save_pretrained(tmp_path / "q4")
    again = load(str(tmp_path / "q4"))
    assert isinstance(again.model.layers[0].mlp.up_proj, Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, again(input_ids=IDS).logits)
    # parameters counted by elements (the 4-bit weights as their weight matrices), without bitsandbytes
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    assert again.num_parameters() == dense.num_parameters()


def test_prepare_model_for_kbit_training(dense_dir):
    model = load(dense_dir, dtype=torch.bfloat16)
    before = {n: m.quantized.packed.copy() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    model = peft.prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    float_params = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert set(float_params.values()) == {torch.float32}  # norms, embeddings, head upcast as PEFT does
    assert model.is_gradient_checkpointing
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            assert np.array_equal(m.quantized.packed, before[n])
    # input gradients reach the embeddings' output (what checkpointing with frozen embeddings needs)
    out = model.get_input_embeddings()(IDS)
    assert out.requires_grad


def test_bad_configs_and_inputs_raise(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="codebook"):
        PyqloraConfig(codebook="int4")
    with pytest.raises(ValueError, match="blocksize"):
        PyqloraConfig(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        PyqloraConfig(compute_dtype="float64")
    with pytest.raises(TypeError, match="unexpected"):
        PyqloraConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="CPU only"):
        load(dense_dir, device_map={"": "cuda:0"})
    # a weight holding NaN cannot be quantized: loading fails instead of leaving a layer of zeros
    weights = dense_weights(dense_dir)
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    from safetensors.torch import save_file

    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((open(os.path.join(dense_dir, "config.json")).read()))
    with pytest.raises(RuntimeError, match="conversion"):  # transformers reports our ValueError and stops
        load(str(bad))
    # a checkpoint without some linear weight: the layer is not left uninitialized
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="received no weight.*model.layers.1.mlp.up_proj"):
        load(str(bad))
    # an 8-bit bitsandbytes checkpoint is not read as 4-bit
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="8-bit"):
        load(str(bad))


PEAK = textwrap.dedent("""
    import sys, threading, time, transformers
    import pyqlora.hf
    transformers.utils.logging.disable_progress_bar()

    def anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    peak, done = [0], threading.Event()

    def poll():  # the kernel keeps no peak of anonymous memory: sample it (nf4core releases the GIL)
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    base = anon()
    thread = threading.Thread(target=poll)
    thread.start()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        sys.argv[1], quantization_config=pyqlora.hf.PyqloraConfig(compute_dtype="float32"))
    done.set()
    thread.join()
    four_bit = sum(m.quantized.nbytes for m in model.modules() if isinstance(m, pyqlora.nn.Linear4bit))
    print(peak[0] - base, anon() - base, four_bit)
""")


@pytest.mark.slow
def test_peak_memory_is_the_4bit_model_not_the_dense_model(tmp_path):
    """Each weight is quantized as it is read: what the load allocates is the 4-bit model (the checkpoint is
    read through a memory map: file pages the kernel can drop), never the dense one. Sampled in its own process."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux)")
    torch.manual_seed(0)
    cfg = tiny_llama_config(transformers, vocab_size=64, hidden_size=512, intermediate_size=2048,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    model = transformers.LlamaForCausalLM(cfg)
    dense_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head")
    model.save_pretrained(tmp_path / "m")
    del model
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=600, cwd=HERE)
    assert out.returncode == 0, out.stderr[-3000:]
    peak, after, four_bit = map(int, out.stdout.split()[-3:])
    largest_layer = 512 * 2048 * 4
    assert four_bit < dense_bytes / 7
    # the 4-bit model, at most one dense layer in flight, and allocator slack; the dense model is 7.8x the 4-bit one
    assert peak < four_bit + largest_layer + (4 << 20), (peak, after, four_bit, dense_bytes)
    assert peak < 0.3 * dense_bytes
