"""Adapter files from outside (issue 18): load_adapter checks adapter_config.json and
adapter_model.safetensors against each other and against the model before it changes
anything, and a failed load leaves the model exactly as it was.

The regression tests name the defect they pin; the property test corrupts a valid
adapter folder at random and asks for success with a consistent adapter, or a
ValueError / TypeError / OSError and an unchanged model.
"""
import json
import math
import os
import re
import tempfile

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import pyqlora.nn  # noqa: E402
from pyqlora.lora import LoraConfig, load_adapter, lora_layers, prepare_model, save_adapter  # noqa: E402
from pyqlora.nn import dequantize_weight  # noqa: E402

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


# ------------------------------------------------------------------ helpers
def make_model(r=4, alpha=8, seed=0):
    """Two adapted layers: '0' (16 -> 8) and '1' (8 -> 16)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16))
    prepare_model(model, LoraConfig(r=r, lora_alpha=alpha))
    return model


def trained(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapters in (layer.lora_A, layer.lora_B):
                for lin in adapters.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.2)
    return model


def saved_adapter(directory, r=4, alpha=8):
    """Save a trained-looking adapter of rank r; (config dict, tensors dict) as written."""
    save_adapter(trained(make_model(r, alpha, seed=1), seed=2), directory)
    with open(os.path.join(directory, CONFIG)) as f:
        cfg = json.load(f)
    return cfg, load_file(os.path.join(directory, WEIGHTS))


def write(directory, cfg=None, tensors=None, raw_config=None, raw_weights=None):
    os.makedirs(directory, exist_ok=True)
    if raw_config is not None or cfg is not None:
        with open(os.path.join(directory, CONFIG), "wb") as f:
            f.write(raw_config if raw_config is not None else json.dumps(cfg).encode())
    if raw_weights is not None:
        with open(os.path.join(directory, WEIGHTS), "wb") as f:
            f.write(raw_weights)
    elif tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS))


def snapshot(model):
    """Everything load_adapter could change: parameters and buffers (values, identity, dtype,
    requires_grad), and per LoRA layer its adapters, r, lora_alpha, scaling, dropout, active list."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {n: (id(p), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    layers = {name: dict(A=list(layer.lora_A), B=list(layer.lora_B),
                         dropout={k: repr(v) for k, v in layer.lora_dropout.items()},
                         r=dict(layer.r), alpha=dict(layer.lora_alpha), scaling=dict(layer.scaling),
                         active=list(layer.active_adapters))
              for name, layer in lora_layers(model)}
    return state, params, layers


def assert_unchanged(before, model):
    state, params, layers = snapshot(model)
    assert list(state) == list(before[0])
    for k, v in before[0].items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert params == before[1]
    assert layers == before[2]


def expect_failure(model, directory, match, adapter_name="default", exc=ValueError):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        load_adapter(model, directory, adapter_name=adapter_name)
    assert_unchanged(before, model)


@pytest.fixture
def adapter(tmp_path):
    """A valid r=4, lora_alpha=8 adapter saved by pyqlora: (folder, config, tensors)."""
    cfg, tensors = saved_adapter(tmp_path / "src")
    return tmp_path / "src", cfg, tensors


# ------------------------------------------ item 2: the config against the tensors
@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_config_r_larger_than_the_tensors_r_is_refused(adapter, tmp_path, adapter_name):
    # was: r=8 for r=4 tensors loaded into the r=4 'default' adapter, silently with scaling alpha/8
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "r": 8}, tensors)
    expect_failure(make_model(4), tmp_path / "bad",
                   r"'base_model\.model\.0\.lora_A\.weight' of module '0' has shape \(4, 16\), expected \(8, 16\): "
                   r"the tensor has r=4, adapter_config.json gives r = 8", adapter_name)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_config_r_smaller_than_the_tensors_r_is_refused(adapter, tmp_path, adapter_name):
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "r": 2}, tensors)
    expect_failure(make_model(4), tmp_path / "bad", r"the tensor has r=4, adapter_config.json gives r = 2",
                   adapter_name)


def test_missing_r_means_peft_default_8_and_must_agree_with_the_tensors(adapter, tmp_path):
    _, cfg, tensors = adapter
    del cfg["r"]
    write(tmp_path / "r4", cfg, tensors)
    expect_failure(make_model(4), tmp_path / "r4", r"the tensor has r=4, .*r \(absent: PEFT's default\) = 8")
    # r=8 tensors and no r: what PEFT loads (its default r is 8), so it loads here too
    _, tensors8 = saved_adapter(tmp_path / "src8", r=8)
    write(tmp_path / "r8", cfg, tensors8)
    model = make_model(4)
    load_adapter(model, tmp_path / "r8", adapter_name="eight")
    for name, layer in lora_layers(model):
        assert layer.r["eight"] == 8 and layer.scaling["eight"] == 8 / 8
        assert torch.equal(layer.lora_A["eight"].weight, tensors8[f"{PREFIX}{name}.lora_A.weight"])


@pytest.mark.parametrize("value", [-4, 0, None, "4", 4.0, True, False, [4], {"r": 4}, 10**30])
def test_bad_r_is_refused_with_file_field_and_value(adapter, tmp_path, value):
    # was: r=-4 loaded (negative scaling), r=0 ZeroDivisionError, r=null TypeError
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "r": value}, tensors)
    path = os.path.join(tmp_path / "bad", CONFIG)
    if value == 10**30:  # a positive integer: refused because the tensors say r=4
        match = r"the tensor has r=4, adapter_config.json gives r = 1000000000000000000000000000000"
    else:
        match = (rf"^adapter_config.json: r must be a positive integer, got {re.escape(repr(value))} "
                 rf"\({re.escape(path)}\)$")
    expect_failure(make_model(4), tmp_path / "bad", match)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -8, 0, 0.0, "16", None, True,
                                   [8], 10**400])
def test_bad_lora_alpha_is_refused(adapter, tmp_path, value):
    # was: lora_alpha NaN accepted, a string lora_alpha TypeError
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "lora_alpha": value}, tensors)
    expect_failure(make_model(4), tmp_path / "bad", r"^adapter_config.json: lora_alpha must be a finite positive "
                                                    r"number, got .*adapter_config.json\)$")
    expect_failure(make_model(4), tmp_path / "bad", "lora_alpha", adapter_name="other")


@pytest.mark.parametrize("alpha, rslora", [(16.5, False), (12, True), (3, False)])
def test_float_alpha_and_rslora_give_pefts_scaling(adapter, tmp_path, alpha, rslora):
    _, cfg, tensors = adapter
    write(tmp_path / "ok", {**cfg, "lora_alpha": alpha, "use_rslora": rslora}, tensors)
    model = make_model(4)
    load_adapter(model, tmp_path / "ok")
    for _, layer in lora_layers(model):
        assert layer.lora_alpha["default"] == alpha and type(layer.lora_alpha["default"]) is type(alpha)
        assert layer.scaling["default"] == alpha / (math.sqrt(4) if rslora else 4)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1, float("nan"), float("inf"), "0.1", None, True, [0.1]])
def test_bad_lora_dropout_is_refused(adapter, tmp_path, value):
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "lora_dropout": value}, tensors)
    expect_failure(make_model(4), tmp_path / "bad", r"^adapter_config.json: lora_dropout must be a number in "
                                                    r"\[0, 1\), got ", adapter_name="other")


def test_lora_dropout_of_a_new_adapter_comes_from_the_config(adapter, tmp_path):
    _, cfg, tensors = adapter
    write(tmp_path / "ok", {**cfg, "lora_dropout": 0.25}, tensors)
    model = make_model(4)
    load_adapter(model, tmp_path / "ok", adapter_name="other")
    for _, layer in lora_layers(model):
        assert isinstance(layer.lora_dropout["other"], nn.Dropout) and layer.lora_dropout["other"].p == 0.25


@pytest.mark.parametrize("field, value, match", [
    ("use_rslora", "true", "use_rslora must be true or false"),
    ("use_rslora", 1, "use_rslora must be true or false"),
    ("use_rslora", None, "use_rslora must be true or false"),
    ("peft_type", "LOHA", "peft_type must be 'LORA'"),
    ("peft_type", None, "peft_type must be 'LORA'"),
    ("peft_type", ["LORA"], "peft_type must be 'LORA'"),
    ("use_dora", True, r"use_dora must be absent, null or false \(DoRA is not supported\), got True"),
    ("use_dora", "yes", "use_dora must be absent"),
    ("lora_bias", True, "lora_bias must be absent"),
    ("use_qalora", True, "use_qalora must be absent"),
    ("alora_invocation_tokens", [1, 2], "alora_invocation_tokens must be absent"),
    ("layer_replication", [[0, 1]], "layer_replication must be absent"),
    ("kasa_config", {"x": 1}, "kasa_config must be absent"),
    ("rank_pattern", [["1", 2]], "rank_pattern must be an object"),
    ("rank_pattern", {"1": 0}, r"rank_pattern\['1'\] must be a positive integer, got 0"),
    ("rank_pattern", {"1": "2"}, r"rank_pattern\['1'\] must be a positive integer"),
    ("rank_pattern", {"(": 2}, r"rank_pattern key '\(' is not a valid regular expression"),
    ("alpha_pattern", {"0": float("nan")}, r"alpha_pattern\['0'\] must be a finite positive number"),
    ("alpha_pattern", "0", "alpha_pattern must be an object"),
])
def test_bad_fields_are_refused(adapter, tmp_path, field, value, match):
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, field: value}, tensors)
    path = os.path.join(tmp_path / "bad", CONFIG)
    expect_failure(make_model(4), tmp_path / "bad", rf"^adapter_config.json: {match}.*\({re.escape(path)}\)$")


def test_neutral_values_of_refused_features_and_unknown_fields_are_accepted(adapter, tmp_path):
    _, cfg, tensors = adapter
    cfg.update(use_dora=None, lora_bias=False, layer_replication=[], alora_invocation_tokens=None,
               rank_pattern=None, alpha_pattern={}, something_new={"nested": [1, 2]}, task_type="CAUSAL_LM",
               target_modules="whatever", bias="none", fan_in_fan_out=True, modules_to_save=None)
    write(tmp_path / "ok", cfg, tensors)
    model = make_model(4)
    load_adapter(model, tmp_path / "ok")
    assert all(layer.r["default"] == 4 for _, layer in lora_layers(model))


def test_shape_message_gives_the_tensors_r_and_the_configs_r(adapter, tmp_path):
    # was: "expects (8, 64) (r=4)": the existing adapter's shape with the config's r
    _, cfg, tensors = adapter
    tensors[f"{PREFIX}1.lora_B.weight"] = tensors[f"{PREFIX}1.lora_B.weight"][:, :3]
    write(tmp_path / "bad", cfg, tensors)
    expect_failure(make_model(4), tmp_path / "bad", r"tensor 'base_model\.model\.1\.lora_B\.weight' of module '1' "
                                                    r"has shape \(16, 3\), expected \(16, 4\): the tensor has r=3, "
                                                    r"adapter_config.json gives r = 4$")


def test_an_existing_adapter_of_another_rank_is_not_overwritten(tmp_path):
    cfg, tensors = saved_adapter(tmp_path / "r2", r=2)
    model = make_model(4)
    expect_failure(model, tmp_path / "r2", r"module '0' has an adapter 'default' with r=4, the adapter in .* has r=2: "
                                           "load it under another adapter_name")
    load_adapter(model, tmp_path / "r2", adapter_name="two")
    assert all(layer.r == {"default": 4, "two": 2} for _, layer in lora_layers(model))


def test_feature_mismatch_names_the_module(adapter, tmp_path):
    _, cfg, tensors = adapter
    model = torch.nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 12))
    prepare_model(model, LoraConfig(r=4))
    write(tmp_path / "bad", cfg, tensors)
    expect_failure(model, tmp_path / "bad", r"module '1' has out_features=12")


# --------------------------------------------------- rank_pattern and alpha_pattern
def dense_twin(model):
    twin = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16))
    with torch.no_grad():
        for (_, layer), dense in zip(lora_layers(model), twin):
            dense.weight.copy_(dequantize_weight(layer.base_layer.quantized))
            dense.bias.copy_(layer.base_layer.bias)
    return twin


def test_rank_and_alpha_patterns_saved_by_peft_load_as_peft_reads_them(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model(4)
    pm = peft.get_peft_model(dense_twin(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0", "1"], rank_pattern={"1": 2}, alpha_pattern={"0": 3}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path))
    load_adapter(model, tmp_path, adapter_name="peft")
    layers = dict(lora_layers(model))
    assert (layers["0"].r["peft"], layers["0"].lora_alpha["peft"]) == (4, 3)
    assert (layers["1"].r["peft"], layers["1"].lora_alpha["peft"]) == (2, 8)
    for layer in layers.values():
        layer.set_adapter("peft")
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), pm(x), rtol=1e-5, atol=1e-5)


def test_mixed_ranks_and_alphas_are_saved_as_peft_patterns(tmp_path):
    """save_adapter on layers with different r / lora_alpha writes rank_pattern / alpha_pattern: PEFT builds
    the same adapters from the file (same shapes and outputs), and load_adapter reads them back."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 16))
    prepare_model(model, LoraConfig(r=4, lora_alpha=8, rank_pattern={"1": 2}, alpha_pattern={"2": 3}))
    trained(model)
    layers = dict(lora_layers(model))
    assert [(layers[n].r["default"], layers[n].lora_alpha["default"]) for n in "012"] == [(4, 8), (2, 8), (4, 3)]
    save_adapter(model, tmp_path)
    with open(tmp_path / CONFIG) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 8, {"1": 2}, {"2": 3})
    twin = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 16))
    with torch.no_grad():
        for dense, (_, layer) in zip(twin, lora_layers(model)):
            dense.weight.copy_(dequantize_weight(layer.base_layer.quantized))
            dense.bias.copy_(layer.base_layer.bias)
    pm = peft.PeftModel.from_pretrained(twin, str(tmp_path))
    x = torch.randn(5, 16)
    torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)
    again = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 16))
    prepare_model(again, LoraConfig(r=1))
    load_adapter(again, tmp_path, adapter_name="saved")
    assert {n: (m.r["saved"], m.lora_alpha["saved"]) for n, m in lora_layers(again)} == {
        "0": (4, 8), "1": (2, 8), "2": (4, 3)}
    # the most common rank and alpha are the defaults, whatever prepare_model was given
    for _, layer in lora_layers(model):
        layer.r["default"], layer.lora_alpha["default"] = 2, 5  # scaling is what save_adapter checks: keep it
        layer.scaling["default"] = 5 / 2
    layers["2"].r["default"], layers["2"].scaling["default"] = 4, 5 / 4
    model[2].lora_A["default"] = nn.Linear(16, 4, bias=False)
    model[2].lora_B["default"] = nn.Linear(4, 16, bias=False)
    model[1].lora_A["default"] = nn.Linear(8, 2, bias=False)
    model[1].lora_B["default"] = nn.Linear(2, 16, bias=False)
    model[0].lora_A["default"] = nn.Linear(16, 2, bias=False)
    model[0].lora_B["default"] = nn.Linear(2, 8, bias=False)
    save_adapter(model, tmp_path / "b")
    with open(tmp_path / "b" / CONFIG) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (2, 5, {"2": 4}, {})


def test_save_adapter_refuses_a_scaling_peft_cannot_express(tmp_path):
    model = make_model()
    dict(lora_layers(model))["1"].scaling["default"] = 0.3
    with pytest.raises(ValueError, match="scaling"):
        save_adapter(model, tmp_path)


def test_save_adapter_config_is_complete_for_peft(tmp_path):
    model = make_model()
    save_adapter(model, tmp_path, base_model_name_or_path="org/base", task_type="CAUSAL_LM", revision="v1")
    with open(tmp_path / CONFIG) as f:
        cfg = json.load(f)
    assert (cfg["base_model_name_or_path"], cfg["task_type"], cfg["revision"]) == ("org/base", "CAUSAL_LM", "v1")
    assert (cfg["peft_type"], cfg["modules_to_save"], cfg["rank_pattern"], cfg["alpha_pattern"]) == ("LORA", None, {},
                                                                                                     {})
    peft = pytest.importorskip("peft")
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (loaded.base_model_name_or_path, loaded.task_type, loaded.r) == ("org/base", "CAUSAL_LM", 4)


def test_rank_pattern_is_checked_against_the_tensors(adapter, tmp_path):
    _, cfg, tensors = adapter
    write(tmp_path / "bad", {**cfg, "rank_pattern": {"1": 3}}, tensors)
    expect_failure(make_model(4), tmp_path / "bad", r"'base_model\.model\.1\.lora_A\.weight' of module '1' has "
                                                    r"shape \(4, 8\), expected \(3, 8\): the tensor has r=4, "
                                                    r"adapter_config.json gives rank_pattern\['1'\] = 3$",
                   adapter_name="other")


# ------------------------------------- item 3: a failed load changes nothing
@pytest.mark.parametrize("adapter_name", ["default", "other"])
@pytest.mark.parametrize("spoil, match", [
    (lambda t: t.fill_(float("nan")), r"'base_model\.model\.1\.lora_B\.weight' holds NaN or Inf"),
    (lambda t: t[:, :2], r"'base_model\.model\.1\.lora_B\.weight' of module '1' has shape \(16, 2\)"),
    (lambda t: t.to(torch.int32), r"'base_model\.model\.1\.lora_B\.weight' has dtype torch.int32"),
    (lambda t: t.double().fill_(1e300), r"'base_model\.model\.1\.lora_B\.weight' holds NaN or Inf \(once converted "
                                        r"to torch.float32\)"),
])
def test_a_later_bad_tensor_leaves_the_model_unchanged(adapter, tmp_path, adapter_name, spoil, match):
    # was: module '0' got its weights (and a new adapter) before module '1' raised
    _, cfg, tensors = adapter
    key = f"{PREFIX}1.lora_B.weight"
    tensors[key] = spoil(tensors[key].clone())
    write(tmp_path / "bad", cfg, tensors)
    model = trained(make_model(4), seed=7)
    expect_failure(model, tmp_path / "bad", match, adapter_name)


def test_a_failure_while_assigning_is_undone(adapter, monkeypatch):
    directory, _, _ = adapter
    model = trained(make_model(4), seed=7)
    before = snapshot(model)
    real, calls = pyqlora.nn.LoraLinear4bit.add_adapter, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer: the first has its new adapter already
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pyqlora.nn.LoraLinear4bit, "add_adapter", flaky)
    with pytest.raises(KeyboardInterrupt):
        load_adapter(model, directory, adapter_name="other")
    assert_unchanged(before, model)
    # and with an existing adapter: the copied weights are restored
    monkeypatch.setattr(torch.Tensor, "copy_", _failing_copy(torch.Tensor.copy_, after=3))
    with pytest.raises(RuntimeError, match="copy failed"):
        load_adapter(model, directory)
    monkeypatch.undo()
    assert_unchanged(before, model)


def _failing_copy(real, after):
    count = []

    def copy_(self, *args, **kwargs):
        count.append(1)
        if len(count) == after:
            raise RuntimeError("copy failed")
        return real(self, *args, **kwargs)
    return copy_


@pytest.mark.parametrize("name, exc", [(".", ValueError), ("", ValueError), ("a.b", ValueError),
                                       ("keys", ValueError), ("training", ValueError), (3, TypeError)])
def test_bad_adapter_name_is_refused_first(adapter, name, exc):
    directory, _, _ = adapter
    expect_failure(make_model(4), directory, "adapter_name", adapter_name=name, exc=exc)


# ------------------------------------------------------------- file level
def test_missing_files(adapter, tmp_path):
    directory, cfg, tensors = adapter
    expect_failure(make_model(4), tmp_path / "none", f"adapter file not found: .*{CONFIG}", exc=FileNotFoundError)
    write(tmp_path / "no_weights", cfg)
    expect_failure(make_model(4), tmp_path / "no_weights", f"adapter file not found: .*{WEIGHTS}",
                   exc=FileNotFoundError)
    os.makedirs(tmp_path / "dir" / CONFIG)
    write(tmp_path / "dir", tensors=tensors)
    expect_failure(make_model(4), tmp_path / "dir", "not a regular file", exc=FileNotFoundError)


@pytest.mark.parametrize("raw, match", [
    (b"{broken", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b'{"r": 4, "lora_alpha": 8', "is not valid JSON"),
    (b'{"r": 4, "task_type": "caf\xe9"}', "is not UTF-8 text"),
    (b"\xff\xfe{\x00}\x00", "is not UTF-8 text"),
    (b"[1, 2]", "must hold a JSON object .*got an array"),
    (b"4", "must hold a JSON object .*got a number"),
    (b'"LORA"', "must hold a JSON object .*got a string"),
    (b"null", "must hold a JSON object .*got null"),
    (b"[" * 100000, "is not valid JSON"),
    (b'{"r": ' + b"9" * 5000 + b"}", "is not valid JSON"),
])
def test_config_file_that_is_not_a_json_object(adapter, tmp_path, raw, match):
    # was: a JSON list raised AttributeError
    _, _, tensors = adapter
    write(tmp_path / "bad", tensors=tensors, raw_config=raw)
    expect_failure(make_model(4), tmp_path / "bad", f"{re.escape(os.path.join(tmp_path / 'bad', CONFIG))} {match}")


def test_config_with_a_utf8_bom_loads(adapter, tmp_path):
    _, cfg, tensors = adapter
    write(tmp_path / "ok", tensors=tensors, raw_config=b"\xef\xbb\xbf" + json.dumps(cfg).encode())
    load_adapter(make_model(4), tmp_path / "ok")


@pytest.mark.parametrize("cut", [0, 7, 8, 40, -1, -9])
def test_truncated_or_corrupt_safetensors(adapter, tmp_path, cut):
    directory, cfg, _ = adapter
    data = (directory / WEIGHTS).read_bytes()
    write(tmp_path / "bad", cfg, raw_weights=data[:cut])
    expect_failure(make_model(4), tmp_path / "bad", f"{re.escape(os.path.join(tmp_path / 'bad', WEIGHTS))} is not a "
                                                    "readable safetensors file")
    write(tmp_path / "bad", cfg, raw_weights=b"not a safetensors file")
    expect_failure(make_model(4), tmp_path / "bad", "not a readable safetensors file")


def test_safetensors_without_tensors(adapter, tmp_path):
    _, cfg, _ = adapter
    write(tmp_path / "bad", cfg, {})
    expect_failure(make_model(4), tmp_path / "bad", r"no weights for \['0.lora_A', '0.lora_B', '1.lora_A'")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64, torch.bool])
def test_tensors_that_are_not_floating_point(adapter, tmp_path, dtype):
    _, cfg, tensors = adapter
    key = f"{PREFIX}0.lora_A.weight"
    tensors[key] = tensors[key].to(dtype)
    write(tmp_path / "bad", cfg, tensors)
    expect_failure(make_model(4), tmp_path / "bad",
                   rf"'{re.escape(key)}' has dtype {dtype}; LoRA weights must be floating point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name(adapter, tmp_path, bad):
    _, cfg, tensors = adapter
    key = f"{PREFIX}0.lora_A.weight"
    tensors[key][1, 3] = bad
    write(tmp_path / "bad", cfg, tensors)
    expect_failure(make_model(4), tmp_path / "bad", rf"tensor '{re.escape(key)}' holds NaN or Inf$")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_converted(adapter, tmp_path, dtype):
    _, cfg, tensors = adapter
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write(tmp_path / "ok", cfg, tensors)
    model = make_model(4)
    load_adapter(model, tmp_path / "ok", adapter_name="other")
    for name, layer in lora_layers(model):
        assert layer.lora_A["other"].weight.dtype == torch.float32
        assert torch.equal(layer.lora_B["other"].weight, tensors[f"{PREFIX}{name}.lora_B.weight"].float())


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({f"{PREFIX}0.bias": torch.zeros(8)}), r"unexpected tensor 'base_model\.model\.0\.bias'"),
    (lambda t: t.update({f"{PREFIX}2.lora_A.weight": torch.zeros(4, 8)}), r"names module '2', which is not a LoRA"),
    (lambda t: t.update({"1.lora_A.weight": t[f"{PREFIX}1.lora_A.weight"].clone()}),
     r"tensors '1\.lora_A\.weight' and 'base_model\.model\.1\.lora_A\.weight' are both lora_A of module '1'"),
    (lambda t: t.pop(f"{PREFIX}1.lora_B.weight"), r"no weights for \['1\.lora_B'\]$"),
])
def test_unexpected_duplicate_and_missing_tensors(adapter, tmp_path, change, match):
    _, cfg, tensors = adapter
    change(tensors)
    write(tmp_path / "bad", cfg, tensors)
    expect_failure(make_model(4), tmp_path / "bad", match)


def test_peft_key_with_an_adapter_name_segment_loads(adapter, tmp_path):
    _, cfg, tensors = adapter
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    write(tmp_path / "ok", cfg, tensors)
    model = make_model(4)
    load_adapter(model, tmp_path / "ok")
    assert torch.equal(model[0].lora_A["default"].weight, tensors[f"{PREFIX}0.lora_A.default.weight"])


# ------------------------------------------------------------ property test
_BASE = {}


def _base_adapter():
    """The valid adapter the property test corrupts (built once): config dict and tensors."""
    if not _BASE:
        with tempfile.TemporaryDirectory() as d:
            cfg, tensors = saved_adapter(d)
            _BASE.update(cfg=cfg, tensors={k: v.clone() for k, v in tensors.items()})
    return json.loads(json.dumps(_BASE["cfg"])), {k: v.clone() for k, v in _BASE["tensors"].items()}


FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "peft_type", "use_dora", "rank_pattern", "alpha_pattern",
          "lora_bias", "layer_replication", "target_modules", "task_type"]
WILD = st.one_of(
    st.none(), st.booleans(), st.integers(-6, 10), st.sampled_from([2**31, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 2.0, 4.0, 1e308, 1e-308, -0.0]),
    st.text(max_size=4), st.sampled_from(["LORA", "4", "NaN"]),
    st.lists(st.integers(-2, 5), max_size=3),
    st.dictionaries(st.sampled_from(["0", "1", ".*", "(", "x", "0|1"]), st.one_of(st.integers(-1, 6), st.floats()),
                    max_size=2),
)
KEY_NAMES = ["base_model.model.0.lora_A.weight", "base_model.model.1.lora_B.weight", "0.lora_B.weight",
             "base_model.model.0.lora_A.default.weight", "base_model.model.2.lora_A.weight",
             "base_model.model.0.lora_magnitude_vector", "junk", "base_model.model.1.lora_A.x.y.weight"]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool]
# values a real adapter could hold: some examples must load, to check what a success gives
BENIGN = st.sampled_from([("r", 4), ("lora_alpha", 16), ("lora_alpha", 0.5), ("lora_alpha", 2**40),
                          ("lora_dropout", 0.3), ("use_rslora", True), ("use_dora", False), ("rank_pattern", {}),
                          ("rank_pattern", {"0|1": 4}), ("alpha_pattern", {"1": 3.5}), ("alpha_pattern", {".*": 2}),
                          ("peft_type", "LORA"), ("task_type", None), ("layer_replication", None)])
OPS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), WILD),
    BENIGN.map(lambda fv: ("set",) + fv),
    st.tuples(st.just("retype"), st.integers(0, 7), st.sampled_from([torch.float16, torch.bfloat16, torch.float64])),
    st.tuples(st.just("del"), st.sampled_from(FIELDS)),
    st.tuples(st.just("config_bytes"), st.sampled_from([b"{broken", b"", b"[1]", b"null", b'{"r": "\xe9"}', b"\xff"])),
    st.tuples(st.just("cut_config"), st.integers(0, 400)),
    st.tuples(st.just("drop"), st.integers(0, 7)),
    st.tuples(st.just("rename"), st.integers(0, 7), st.sampled_from(KEY_NAMES)),
    st.tuples(st.just("reshape"), st.integers(0, 7), st.sampled_from(["T", "narrow", "pad", "flat", "3d", "empty"])),
    st.tuples(st.just("retype"), st.integers(0, 7), st.sampled_from(DTYPES)),
    st.tuples(st.just("poison"), st.integers(0, 7), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300,
                                                                      0.0, 70000.0])),
    st.tuples(st.just("extra"), st.sampled_from(KEY_NAMES)),
    st.tuples(st.just("cut_weights"), st.integers(0, 2000)),
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(0, 255)),
)


def _reshape(t, how):
    if how == "T":
        return t.transpose(0, 1).contiguous() if t.ndim >= 2 else t
    if how == "narrow":
        return t[:-1] if t.ndim and t.shape[0] > 1 else t
    if how == "pad":
        return torch.cat([t, t[:1]]) if t.ndim else t
    if how == "flat":
        return t.flatten()
    if how == "3d":
        return t.unsqueeze(0)
    return t[:0]


def _corrupt(ops):
    """Apply `ops` to the valid adapter: (config bytes, safetensors bytes)."""
    from safetensors.torch import save

    cfg, tensors = _base_adapter()
    raw_config = cut_config = cut_weights = None
    flips = []
    for op in ops:
        kind, args = op[0], op[1:]
        keys = sorted(tensors)
        key = keys[args[0] % len(keys)] if keys and kind in ("drop", "rename", "reshape", "retype", "poison") else None
        if kind == "set":
            cfg[args[0]] = args[1]
        elif kind == "del":
            cfg.pop(args[0], None)
        elif kind == "config_bytes":
            raw_config = args[0]
        elif kind == "cut_config":
            cut_config = args[0]
        elif kind == "cut_weights":
            cut_weights = args[0]
        elif kind == "flip":
            flips.append(args)
        elif kind == "extra":
            tensors[args[0]] = torch.zeros(4, 16)
        elif key is None:
            continue
        elif kind == "drop":
            del tensors[key]
        elif kind == "rename":
            tensors[args[1]] = tensors.pop(key)
        elif kind == "reshape":
            tensors[key] = _reshape(tensors[key], args[1]).contiguous()
        elif kind == "retype":
            tensors[key] = tensors[key].to(args[1])
        elif kind == "poison" and tensors[key].numel() and tensors[key].is_floating_point():
            t = tensors[key].double() if args[1] == 1e300 else tensors[key].clone()
            t.view(-1)[0] = args[1]
            tensors[key] = t
    if raw_config is None:
        raw_config = json.dumps(cfg).encode()
        if cut_config is not None:
            raw_config = raw_config[:cut_config]
    weights = bytearray(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    for pos, byte in flips:
        if weights:
            weights[pos % len(weights)] = byte
    if cut_weights is not None:
        weights = weights[:cut_weights]
    return raw_config, bytes(weights), cfg


@given(ops=st.lists(OPS, max_size=4), adapter_name=st.sampled_from(["default", "other"]),
       model_r=st.sampled_from([4, 2]))
def test_corrupted_adapter_folders_load_consistently_or_change_nothing(ops, adapter_name, model_r):
    raw_config, weights, cfg = _corrupt(ops)
    model = trained(make_model(model_r), seed=5)
    before = snapshot(model)
    with tempfile.TemporaryDirectory() as d:
        write(d, raw_config=raw_config, raw_weights=weights)
        try:
            load_adapter(model, d, adapter_name=adapter_name)
        except Exception as exc:  # noqa: BLE001 - the type is the assertion
            assert isinstance(exc, (ValueError, TypeError, OSError)), repr(exc)
            assert_unchanged(before, model)
            return
        tensors = load_file(os.path.join(d, WEIGHTS))
    # loaded: every layer's adapter agrees with the tensors and with the config
    cfg = json.loads(raw_config.decode("utf-8-sig"))
    patterns = cfg.get("rank_pattern") or cfg.get("alpha_pattern")
    rslora = cfg.get("use_rslora", False)
    files = {}
    for key, value in tensors.items():
        parts = key.removeprefix(PREFIX).split(".")
        files[parts[0], parts[1]] = value
    for name, layer in lora_layers(model):
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        assert a.shape == (r, layer.in_features) and b.shape == (layer.out_features, r)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a, files[name, "lora_A"].to(a.dtype)) and torch.equal(b, files[name, "lora_B"].to(b.dtype))
        assert layer.scaling[adapter_name] == alpha / (math.sqrt(r) if rslora else r)
        assert alpha > 0 and math.isfinite(alpha)
        if not patterns:
            assert r == cfg.get("r", 8) and alpha == cfg.get("lora_alpha", 8)
    assert all(adapter_name in layer.active_adapters for _, layer in lora_layers(model))
    # nothing else moved: the base layers and any other adapter
    state = model.state_dict()
    for key, value in before[0].items():
        if f".{adapter_name}." not in key:
            assert torch.equal(state[key], value), key
