"""Loading straight into a QLoRA model: prepare_model(weights=) and load_gguf_llama(lora_config=).

Oracle: the same model loaded dense and then prepared (identical 4-bit weights and
logits), and the peak resident memory of both ways, each in its own process.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from pyqlora.lora import LoraConfig, empty_weights, prepare_model


def _gguf_or_skip():
    from pyqlora.app.models import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_streamed_prepare_equals_dense_prepare_on_real_weights():
    import transformers

    from pyqlora.app.models import gguf_weights

    weights = gguf_weights(_gguf_or_skip())
    cfg = transformers.LlamaConfig(**{**weights._cfg.to_dict(), "num_hidden_layers": 2})
    config = LoraConfig(r=4, lora_alpha=8)
    dense = transformers.LlamaForCausalLM(cfg)
    needed = {n for n, _ in dense.named_parameters()}
    dense.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights if k in needed}, strict=False)
    dense.tie_weights()
    torch.manual_seed(0)  # the adapters' initialisation
    rep_dense = prepare_model(dense, config)
    with empty_weights():
        streamed = transformers.LlamaForCausalLM(cfg)
    assert all(p.device.type == "meta" for p in streamed.parameters())
    assert all(b.device.type == "cpu" for b in streamed.buffers())  # rotary frequencies are real
    torch.manual_seed(0)
    rep = prepare_model(streamed, config, weights=weights)
    assert rep == rep_dense
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # re-tied
    sd_a, sd_b = dense.state_dict(), streamed.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.arange(1, 17).view(1, 16)
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, streamed(input_ids=ids).logits)


def test_prepare_model_weights_errors():
    with empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match="meta device: pass weights="):
        prepare_model(model, LoraConfig(r=2))
    w = {"0.weight": np.zeros((16, 8), np.float32), "0.bias": np.zeros(16, np.float32),
         "2.weight": np.zeros((4, 16), np.float32)}
    with pytest.raises(ValueError, match=r"no entry for '2.bias' \(module '2'\)"):
        prepare_model(model, LoraConfig(r=2), weights=w)
    with empty_weights():
        model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    with pytest.raises(ValueError, match=r"weights\['0.weight'\] has shape \(8, 16\), module '0' expects \(16, 8\)"):
        prepare_model(model, LoraConfig(r=2), weights={"0.weight": np.zeros((8, 16), np.float32),
                                                        "0.bias": np.zeros(16, np.float32)})


def test_empty_weights_restores_parameter_registration():
    with empty_weights():
        a = torch.nn.Linear(3, 3)
    b = torch.nn.Linear(3, 3)
    assert a.weight.device.type == "meta" and b.weight.device.type == "cpu"


_PEAK = """
import json, sys
import torch
from pyqlora.lora import LoraConfig, prepare_model
from pyqlora.app.models import load_smollm2
cfg = LoraConfig(r=16, lora_alpha=32)
if sys.argv[1] == "stream":
    m, _ = load_smollm2(tokenizer=False, lora_config=cfg)
else:
    m, _ = load_smollm2(tokenizer=False)
    prepare_model(m, cfg)
with torch.no_grad():
    logits = m(input_ids=torch.arange(1, 9).view(1, 8)).logits
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": hwm,
                  "logits": logits[0, -1, :16].tolist()}))
"""


@pytest.mark.slow
def test_loading_into_qlora_never_holds_the_dense_model(tmp_path):
    _gguf_or_skip()
    out = {}
    for mode in ("stream", "dense"):
        r = subprocess.run([sys.executable, "-c", _PEAK, mode], capture_output=True, text=True, timeout=600,
                           check=False, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stream"]["logits"] == out["dense"]["logits"]
    # the dense float32 model is 538 MB, its linear layers 425 MB of it
    saved_mb = (out["dense"]["peak_kib"] - out["stream"]["peak_kib"]) / 1024
    assert saved_mb > 300, out
