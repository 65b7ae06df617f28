"""``pyqlora generate`` on the real SmolLM2-135M: its text is transformers' greedy text for the same weights.

The oracle is an independent path to the same numbers: a dense transformers model whose
linear weights are the dequantized NF4 + DQ weights (and, with an adapter, PEFT's merge of
the adapter into them), decoded by transformers' own ``generate`` in float32. pyqlora's side
runs its 4-bit layers (fused GEMV per decode step) and its own KV-cache loop.
"""
import copy
import json
import subprocess
import sys
import tempfile

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import pyqlora as pq  # noqa: E402
from pyqlora.app import generate as gen_app  # noqa: E402

PROMPT = "Write a Python function that adds two numbers."
NEW = 8


def _gguf_or_skip():
    from pyqlora.app.models import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def run_cli(*args, stdin=None):
    with tempfile.TemporaryDirectory() as cwd:  # outside the source tree: the installed package runs
        return subprocess.run([sys.executable, "-m", "pyqlora", *args], capture_output=True, text=True, timeout=300,
                              cwd=cwd, input=stdin)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process generation on one thread: on a 2-core machine shared with other work, a fork-join per 4-bit
    product (210 per token) waits for a second core each time (the CLI test runs with --threads 2)."""
    saved = torch.get_num_threads(), pq.get_num_threads()
    torch.set_num_threads(1)
    pq.set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    pq.set_num_threads(saved[1])


@pytest.fixture(scope="module")
def dense():
    """SmolLM2-135M-Instruct, dense float32, and its tokenizer."""
    _gguf_or_skip()
    from pyqlora.app.checkpoint import load_model

    model, tok, _ = load_model(None, dtype=torch.float32)
    return model, tok


def dequantized_copy(model):
    """The model with each linear weight but the head's replaced by its NF4 + DQ round trip (blocksize 64)."""
    oracle = copy.deepcopy(model)
    head = oracle.get_output_embeddings()
    with torch.no_grad():
        for module in oracle.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                q = pq.quantize(module.weight.numpy(), codebook="nf4", blocksize=64, double_quant=True)
                module.weight.copy_(torch.from_numpy(pq.dequantize(q)))
    return oracle


def greedy(model, tok, ids, n=NEW):
    """transformers' greedy tokens after `ids`."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, x.shape[1]:].tolist()


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def base_oracle(dense):
    model, tok = dense
    oracle = dequantized_copy(model)
    return oracle, greedy(oracle, tok, chat_ids(tok, [{"role": "user", "content": PROMPT}]))


R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def adapter(dense, base_oracle, tmp_path_factory):
    """(folder, expected tokens): a LoRA adapter in PEFT's files (r=4 on every linear layer but the head, A and B
    drawn from N(0, 0.1^2) so the text changes), and transformers' greedy tokens of the dequantized model with
    the adapter merged by hand: W + (lora_alpha / r) B A."""
    from safetensors.torch import save_file

    model, tok = dense
    gen = torch.Generator().manual_seed(0)
    merged = copy.deepcopy(base_oracle[0])
    head = merged.get_output_embeddings()
    tensors, targets = {}, set()
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                a = torch.randn(R, module.in_features, generator=gen) * 0.1
                b = torch.randn(module.out_features, R, generator=gen) * 0.1
                tensors[f"base_model.model.{name}.lora_A.weight"] = a
                tensors[f"base_model.model.{name}.lora_B.weight"] = b
                module.weight += (ALPHA / R) * (b @ a)
                targets.add(name.rpartition(".")[2])
    path = tmp_path_factory.mktemp("adapter")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": ALPHA,
                                                          "target_modules": sorted(targets)}))
    expected = greedy(merged, tok, chat_ids(tok, [{"role": "user", "content": PROMPT}]))
    assert expected != base_oracle[1]  # the adapter changes the text: the comparisons with it can fail
    return str(path), expected


@pytest.fixture(scope="module")
def ours(dense):
    """pyqlora generate's model: SmolLM2 with NF4 + DQ linear layers, float32 compute."""
    _gguf_or_skip()
    return gen_app.load(dtype="float32")


def test_generate_equals_transformers_greedy_on_the_dequantized_weights(ours, base_oracle):
    model, tok, info = ours
    oracle, expected = base_oracle
    assert info["layers4bit"] == 210 and not info["quantized"]  # 30 blocks x 7 projections; the head stays dense
    ids = chat_ids(tok, [{"role": "user", "content": PROMPT}])
    out, stats = gen_app.Generator(model, tok).generate(ids, max_new_tokens=NEW)
    assert out == expected, (tok.decode(out), tok.decode(expected))
    assert stats["prefill_tokens"] == len(ids) and stats["decode_tokens"] == len(out) - 1


def test_generate_with_adapter_equals_greedy_on_the_merged_weights(ours, adapter):
    model, tok, _ = ours
    model = copy.deepcopy(model)
    assert gen_app.attach_adapter(model, adapter[0]) == 210
    ids = chat_ids(tok, [{"role": "user", "content": PROMPT}])
    out, _ = gen_app.Generator(model, tok).generate(ids, max_new_tokens=NEW)
    assert out == adapter[1], (tok.decode(out), tok.decode(adapter[1]))


def test_generate_from_a_4bit_checkpoint(dense, base_oracle, tmp_path):
    """A folder written by ``pyqlora quantize`` holds the same NF4 + DQ codes: the same text."""
    from pyqlora.app.checkpoint import quantize_checkpoint

    _, tok = dense
    quantize_checkpoint(None, str(tmp_path / "q"))
    model, tok, info = gen_app.load(str(tmp_path / "q"), dtype="float32")
    assert info["quantized"] and info["layers4bit"] == 210
    out, _ = gen_app.Generator(model, tok).generate(chat_ids(tok, [{"role": "user", "content": PROMPT}]),
                                                    max_new_tokens=NEW)
    assert out == base_oracle[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_steps_use_the_fused_gemv_only(ours, monkeypatch, dtype):
    """Every 4-bit layer's product on a decode step is nf4core's fused one: no tile, no dense weight."""
    import pyqlora.nn as qnn

    model, tok, info = ours
    if dtype == "bfloat16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    calls = {"fused": 0, "tiled": 0, "dense": 0}

    def spy(name, real):
        def wrapped(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(qnn, "fused_product", spy("fused", qnn.fused_product))
    monkeypatch.setattr(qnn, "fused_linear", spy("fused", qnn.fused_linear))  # the no-autograd path
    monkeypatch.setattr(qnn, "tiled_product_torch", spy("tiled", qnn.tiled_product_torch))
    monkeypatch.setattr(qnn, "dequantize_weight", spy("dense", qnn.dequantize_weight))
    seen = {}

    def on_token(tokens):
        if len(tokens) == 1:  # prefill done: count the decode steps only
            seen.update(calls)
            calls.update(fused=0, tiled=0, dense=0)

    ids = chat_ids(tok, [{"role": "user", "content": PROMPT}])
    out, stats = gen_app.Generator(model, tok).generate(ids, max_new_tokens=4, on_token=on_token, stop=False)
    assert seen["tiled"] + seen["fused"] == info["layers4bit"]  # prefill: many rows, still no whole dense weight
    assert seen["dense"] == 0
    assert stats["decode_tokens"] == 3
    assert calls == {"fused": 3 * info["layers4bit"], "tiled": 0, "dense": 0}


def test_chat_keeps_the_conversation_and_its_cache(ours, base_oracle, capsys):
    """Two turns of the ``--chat`` loop: each reply is transformers' greedy reply to the whole conversation."""
    model, tok, _ = ours
    oracle, first = base_oracle
    lines = iter([f"{PROMPT}\n", "\n", "And three numbers?\n", ""])
    generator = gen_app.Generator(model, tok)
    messages = gen_app.chat(generator, lambda: next(lines), gen_app.Printer(tok, sys.stdout), max_new_tokens=NEW)
    captured = capsys.readouterr()
    reply = tok.decode(first, skip_special_tokens=True)
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "And three numbers?"}]
    second = greedy(oracle, tok, chat_ids(tok, history))
    assert captured.out == f"{reply}\n{tok.decode(second, skip_special_tokens=True)}\n"
    assert messages == history + [{"role": "assistant", "content": tok.decode(second, skip_special_tokens=True)}]
    stats = [line for line in captured.err.splitlines() if line.startswith("prefill:")]
    assert len(stats) == 2
    # the second turn feeds only what follows the cached first turn
    assert int(stats[1].split()[1]) < len(chat_ids(tok, history)) - 10


def test_pick_samples_from_the_top_p_set():
    """Sampling: softmax(logits / T) restricted to the smallest set reaching top-p (closed-form frequencies)."""
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0]))
    pick = gen_app.Generator.pick
    assert pick(logits) == 2
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.bincount(torch.tensor([pick(logits, 1.0, 1.0, g) for _ in range(n)]), minlength=3).double()
    assert torch.allclose(counts / n, torch.tensor([1, 2, 3]).double() / 6, atol=0.025)
    counts = torch.bincount(torch.tensor([pick(logits, 1.0, 0.6, g) for _ in range(n)]), minlength=3).double()
    assert counts[0] == 0 and abs(counts[2] / n - 0.6) < 0.03  # {2, 1}: renormalized 3/5, 2/5
    assert {pick(logits, 1.0, 0.5, g) for _ in range(50)} == {2}  # the top token alone holds 1/2
    # a high temperature flattens: all three appear; the same seed gives the same draws
    draws = [pick(logits, 100.0, 1.0, torch.Generator().manual_seed(1)) for _ in range(3)]
    assert draws == [pick(logits, 100.0, 1.0, torch.Generator().manual_seed(1)) for _ in range(3)]


def test_cli_prints_the_text_on_stdout_and_the_speeds_on_stderr(dense, adapter):
    _, tok = dense
    proc = run_cli("generate", "--prompt", PROMPT, "--adapter", adapter[0], "--max-new-tokens", str(NEW),
                   "--dtype", "fp32", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tok.decode(adapter[1], skip_special_tokens=True) + "\n"
    assert "NF4 + DQ" in proc.stderr and "on 210 layers" in proc.stderr and "compute float32" in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("prefill:")][0]
    assert "tokens/s); decode: 7 tokens in" in line and line.endswith("tokens/s)")


def test_cli_bad_paths_exit_2(tmp_path, capsys):
    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert proc.returncode == 2 and "pyqlora: error: model not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    from pyqlora.app.cli import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "adapter_config.json").write_text("{}")
    for argv, message in [(["--adapter", str(tmp_path / "missing")], "adapter not found"),
                          (["--adapter", str(tmp_path / "folder")], "adapter_model.safetensors"),
                          (["--adapter", str(tmp_path / "folder" / "adapter_config.json")], "is a file"),
                          (["--top-p", "0"], "--top-p must be in (0, 1]"),
                          (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1")]:
        assert main(["generate", "--prompt", "hi", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyqlora: error: ") and message in err, (argv, err)
    with pytest.raises(SystemExit) as exc:  # neither --prompt nor --chat: argparse's usage error
        main(["generate"])
    assert exc.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_damaged_adapter_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        gen_app.load(adapter=str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        gen_app.adapter_ranks(str(tmp_path))
