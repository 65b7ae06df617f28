"""`pyqlora quantize --calibration FILE` and `pyqlora finetune --calibration FILE` (issue 22), run as a user would."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_cli import run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("calib")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "dense")
    vocab = {"<unk>": 0, **{chr(32 + i): i + 1 for i in range(95)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(tmp / "dense")
    rng = np.random.default_rng(0)
    (tmp / "calib.txt").write_text(" ".join(chr(33 + int(v)) for v in rng.integers(0, 90, 3000)))
    return tmp


def test_quantize_with_calibration_writes_a_standard_checkpoint(dense_folder, tmp_path):
    out = tmp_path / "q4"
    proc = run("quantize", str(dense_folder / "dense"), str(out), "--calibration", str(dense_folder / "calib.txt"),
               "--calibration-tokens", "2048")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated rounding: 2,048 tokens" in proc.stdout and "peak memory" in proc.stdout
    assert "calibrating [" in proc.stderr and "block 2/2" in proc.stderr  # the progress bar
    assert "quantized 14 linear-layer weights" in proc.stdout
    proc = run("quantize", str(dense_folder / "dense"), str(tmp_path / "rtn"), "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run("quantize", str(dense_folder / "dense"), str(tmp_path / "q4b"), "--json", "--calibration",
               str(dense_folder / "calib.txt"), "--calibration-tokens", "2048")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["calibration"]["tokens"] == 2048 and stats["calibration"]["blocks"] == 2
    assert stats["calibration"]["seconds"] > 0 and stats["calibration"]["peak_rss_bytes"] > 0

    # transformers + bitsandbytes read it in a process that never imports pyqlora
    script = textwrap.dedent(f"""
        import json, sys, torch, transformers, bitsandbytes as bnb
        out = {{}}
        for name in ("q4", "rtn"):
            m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name, dtype=torch.float32)
            layer = m.model.layers[1].mlp.down_proj
            assert isinstance(layer, bnb.nn.Linear4bit)
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            out[name] = w.flatten().tolist()
        assert "pyqlora" not in sys.modules
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs = {k: np.array(v, np.float32) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}

    import pyqlora as pq
    from pyqlora.app.checkpoint import load_model

    ours, _, info = load_model(str(out), tokenizer=False)
    assert info["quantized"]
    q = ours.model.layers[1].mlp.down_proj.quantized
    assert np.array_equal(pq.dequantize(q).reshape(-1), theirs["q4"])
    assert not np.array_equal(theirs["q4"], theirs["rtn"])  # calibration chose other codes
    # the same bytes as the library's calibration on the same tokens
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["quantization_config"]


def test_quantize_calibration_errors(dense_folder, tmp_path):
    proc = run("quantize", str(dense_folder / "dense"), str(tmp_path / "a"), "--calibration",
               str(tmp_path / "missing.txt"))
    assert proc.returncode != 0 and "--calibration file not found" in proc.stderr
    proc = run("quantize", str(dense_folder / "dense"), str(tmp_path / "b"), "--calibration",
               str(dense_folder / "calib.txt"), "--calibration-tokens", "0")
    assert proc.returncode == 2 and "positive whole number" in proc.stderr
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    proc = run("quantize", str(dense_folder / "dense"), str(tmp_path / "c"), "--calibration", str(tmp_path / "bin.txt"))
    assert proc.returncode != 0 and "UTF-8" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_finetune_with_calibration(dense_folder, tmp_path):
    """The calibrated base is used for training and written to OUT/base (a standard 4-bit checkpoint)."""
    rng = np.random.default_rng(1)
    with open(tmp_path / "data.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"text": " ".join(chr(33 + int(v)) for v in rng.integers(0, 90, 40))}) + "\n")
    out = tmp_path / "run"
    proc = run("finetune", "--model", str(dense_folder / "dense"), "--data", str(tmp_path / "data.jsonl"),
               "--output", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--r", "4",
               "--eval-text", "none", "--sample-tokens", "0", "--dtype", "fp32", "--warmup", "0",
               "--calibration", str(dense_folder / "calib.txt"), "--calibration-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated base: 1,024 tokens" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["tokens"] == 1024 and report["calibration"]["peak_rss_bytes"] > 0
    assert "base/" in report["outputs"]

    from pyqlora.app.checkpoint import load_model

    base, _, info = load_model(str(out / "base"), tokenizer=False)
    rtn, _, _ = load_model(str(dense_folder / "dense"), tokenizer=False)
    import pyqlora as pq

    w = rtn.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert info["quantized"]
    assert base.model.layers[0].self_attn.q_proj.quantized.packed.tobytes() != pq.quantize(w).packed.tobytes()
    proc = run("finetune", "--model", str(dense_folder / "dense"), "--base", "bf16", "--calibration",
               str(dense_folder / "calib.txt"), "--output", str(tmp_path / "x"))
    assert proc.returncode != 0 and "--base 4bit" in proc.stderr


def _run_in(cwd, *args):
    return subprocess.run([sys.executable, "-m", "pyqlora", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_finetune_calibrates_on_its_training_examples(dense_folder, tmp_path):
    """--calibration train: the base is calibrated on the training examples' tokens, packed end to end (never the
    held-out ones): the same codes as prepare_model's calibration on those tokens; a file named train in the
    working folder makes the option ambiguous, and pyqlora quantize has no training examples."""
    rng = np.random.default_rng(2)
    with open(tmp_path / "data.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"text": " ".join(chr(33 + int(v)) for v in rng.integers(0, 90, 40))}) + "\n")
    args = ["--model", str(dense_folder / "dense"), "--data", str(tmp_path / "data.jsonl"), "--steps", "1",
            "--seq-len", "32", "--batch-size", "2", "--r", "4", "--eval-text", "none", "--sample-tokens", "0",
            "--dtype", "fp32", "--warmup", "0", "--heldout", "4", "--calibration", "train"]
    out = tmp_path / "run"
    proc = _run_in(tmp_path, "finetune", *args, "--output", str(out), "--calibration-tokens", "700")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated base: 512 tokens of the training examples" in proc.stderr  # whole 512-token rows
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["tokens"] == 512 and report["calibration"]["file"] == "train"

    from pyqlora.app.calibration import training_batches
    from pyqlora.app.checkpoint import load_model
    from pyqlora.app.finetune.examples import encode_records, split_chunks
    from pyqlora.lora import LoraConfig, prepare_model

    model, tok, _ = load_model(str(dense_folder / "dense"))
    records = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    train, held = split_chunks(encode_records(tok, records, 32)[0], 4)
    assert len(held) == 4 and sum(len(ids) for ids, _ in train) > 700
    batches, used = training_batches(train, 700)
    assert used == 512 and torch.cat(batches).reshape(-1).tolist() == [t for ids, _ in train for t in ids][:512]
    prepare_model(model, LoraConfig(r=4), calibration=batches)
    base, _, _ = load_model(str(out / "base"), tokenizer=False)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert (base.get_submodule(name).quantized.packed.tobytes()
                == model.get_submodule(name).base_layer.quantized.packed.tobytes()), name

    (tmp_path / "train").write_text("a file named train")
    proc = _run_in(tmp_path, "finetune", *args, "--output", str(tmp_path / "x"))
    assert proc.returncode != 0 and "write ./train for the file" in proc.stderr
    proc = _run_in(dense_folder, "quantize", str(dense_folder / "dense"), str(tmp_path / "y"), "--calibration", "train")
    assert proc.returncode != 0 and "option of pyqlora finetune" in proc.stderr
