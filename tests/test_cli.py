"""The command line, run as a user would: a subprocess."""
import json
import os
import subprocess
import sys
import tempfile


def run(*args):
    # run outside the source tree, so the installed package is what runs
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "pyqlora", *args], capture_output=True, text=True, timeout=300,
                              cwd=cwd)


def test_demo_prints_the_comparison():
    proc = run("demo", "--rows", "256", "--cols", "512")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = {(l.split()[0], l.split()[1]): l.split() for l in lines if l.split()[:1] in (["nf4"], ["fp4"], ["int4"])}
    assert set(table) == {("nf4", "yes"), ("nf4", "no"), ("fp4", "no"), ("int4", "no")}
    assert float(table[("nf4", "yes")][2]) == 4.127 or abs(float(table[("nf4", "yes")][2]) - 4.127) < 2e-3
    assert float(table[("nf4", "no")][2]) == 4.5
    err = {k: float(v[3]) for k, v in table.items()}
    # on Gaussian weights NF4 is the most accurate 4-bit type (QLoRA, Sec. 3)
    assert err[("nf4", "no")] < err[("fp4", "no")] and err[("nf4", "no")] < err[("int4", "no")]
    assert "lowest error: nf4" in proc.stdout


def test_config_and_help():
    proc = run("config")
    assert proc.returncode == 0 and "nf4core" in proc.stdout
    assert run().returncode == 0
    bad = run("demo", "--blocksize", "48")
    assert bad.returncode == 2 and "blocksize must be one of" in bad.stderr


# ---------------------------------------------------------------- finetune / quantize / eval / bench
def test_finetune_errors_are_clear(tmp_path):
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc = run("finetune", "--data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "data file not found" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    proc = run("finetune", "--data", str(bad))
    assert proc.returncode == 2 and f"{bad}:2: not valid JSON" in proc.stderr
    notmodel = tmp_path / "weights.txt"
    notmodel.write_text("not a model")
    proc = run("finetune", "--model", str(notmodel), "--data", str(tmp_path / "weights.txt"))
    assert proc.returncode == 2 and "cannot read model" in proc.stderr
    proc = run("finetune", "--optimizer", "sgd")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run("finetune", "--heldout", "1.5")
    assert proc.returncode == 2 and "--heldout" in proc.stderr


def test_quantize_eval_bench_errors(tmp_path):
    proc = run("quantize", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "model not found" in proc.stderr
    proc = run("quantize", str(tmp_path), str(tmp_path / "out"), "--codebook", "int4")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run("eval", "--text", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "--text file not found" in proc.stderr
    proc = run("bench", "--dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    proc = run("bench", "--dir", benchmarks, "--only", "bench_everything")
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_quantize_then_eval_a_checkpoint(tmp_path):
    """`pyqlora quantize` a dense Hugging Face folder, then `pyqlora eval` the 4-bit folder: its window
    losses equal those of the dense model with the same weights dequantized (computed here)."""
    import pytest

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pyqlora.app.evaluate import fake_quantize_linears, perplexity

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "dense")
    vocab = {"<unk>": 0, **{chr(32 + i): i + 1 for i in range(95)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    tok.save_pretrained(tmp_path / "dense")
    text = " ".join(chr(33 + (i * 31) % 90) for i in range(3000))
    (tmp_path / "text.txt").write_text(text)

    proc = run("quantize", str(tmp_path / "dense"), str(tmp_path / "q4"))
    assert proc.returncode == 0, proc.stderr
    assert "quantized 14 linear-layer weights" in proc.stdout
    assert (tmp_path / "q4" / "tokenizer.json").exists()
    proc = run("eval", "--model", str(tmp_path / "q4"), "--text", str(tmp_path / "text.txt"), "--window", "64",
               "--windows", "4", "--json", str(tmp_path / "q4.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "q4.json").read_text())
    dense = perplexity(model, tok, text, window=64, windows=4)
    fake_quantize_linears(model)
    expected = perplexity(model, tok, text, window=64, windows=4)
    assert got["tokens"] == 256
    assert got["window_losses"] == pytest.approx(expected["window_losses"], rel=1e-5)
    assert got["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-4)  # quantization changed the model
