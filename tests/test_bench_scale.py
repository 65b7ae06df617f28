"""benchmarks/bench_scale.py on a tiny Llama, run as a subprocess: it runs, its report has its fields, and
its resident memory stays under bounds computed from the shapes (no timing is checked)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_scale.py")
MIB = 1 << 20
FIELDS = ("load_s", "peak_rss_load", "rss_loaded", "peak_rss_train", "step_s", "losses", "gflops_step",
          "dense_gemm_gflops", "fraction_of_dense", "quantized_weight_bytes", "bf16_weight_bytes", "model_bytes",
          "matmul_params", "trainable_params", "optimizer_state_bytes", "rss_start")


def _run(tmp_path, *args):
    out = tmp_path / f"report{len(list(tmp_path.iterdir()))}.json"
    done = subprocess.run([sys.executable, SCRIPT, *args, "--threads", "2", "--gemm-repeat", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(done.stdout)
    return report


def _check(report, layers, seq, steps):
    for key in FIELDS:
        assert key in report, key
    assert report["layers"] == layers and report["tokens"] == seq and len(report["step_s"]) == steps
    h, i, v = report["hidden"], report["intermediate"], report["vocab"]
    linear = layers * (4 * h * h + 3 * h * i)  # q k v o (kv heads = heads here), gate up down
    assert report["matmul_params"] == linear + v * h
    # NF4 + DQ: 4 bits per weight plus 8-bit scales per 64 and float32 scales per 64 * 256
    assert report["quantized_weight_bytes"] == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)), rel=1e-3)
    assert all(x > 0 for x in report["step_s"]) and all(0 < x < 20 for x in report["losses"])
    assert report["gflops_step"] > 0 and report["dense_gemm_gflops"] > 0
    # Loading: the 4-bit layers, the float32 embeddings, head and norms, and at most one dense layer's weight
    # being quantized (bfloat16 + its float32 random source) -- never the dense model (4 bytes a weight).
    rest = 4 * (2 * v * h + (2 * layers + 1) * h)
    one_layer = 6 * max(h * i, h * h)
    dense_fp32 = 4 * linear
    load_bound = report["quantized_weight_bytes"] + rest + one_layer + 48 * MIB
    assert load_bound < dense_fp32 + rest  # so the bound fails if the dense model ever exists
    assert report["peak_rss_load"] - report["rss_start"] <= load_bound
    # Training, above the loaded model: checkpointed layer inputs, one layer recomputed, the logits and the
    # loss's softmax and their gradients, the adapters with their gradients and AdamW moments, torch's and
    # nf4core's tiles; all float32.
    activations = 4 * seq * (layers * h + 16 * h + 8 * i + 6 * v)
    adapters = 4 * 4 * report["trainable_params"]
    train_bound = activations + adapters + 64 * MIB
    assert report["peak_rss_train"] - report["rss_loaded"] <= train_bound


def test_random_weights(tmp_path):
    report = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "64", "--steps", "2")
    _check(report, 6, 64, 2)
    assert report["heap_limited"] in (True, False)


def test_checkpoint_written_then_streamed(tmp_path):
    ckpt = tmp_path / "ckpt"
    written = subprocess.run([sys.executable, SCRIPT, "--shape", "tiny", "--layers", "6", "--write-checkpoint",
                              str(ckpt)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert written.returncode == 0, written.stderr[-3000:]
    info = json.loads(written.stdout)
    files = sorted(p.name for p in ckpt.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert info["bytes"] == 2 * json.loads((ckpt / "config.json").read_text())["vocab_size"] * 512 * 2 + 2 * (
        6 * (4 * 512 * 512 + 3 * 512 * 1376) + (2 * 6 + 1) * 512)
    report = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "32", "--steps", "1", "--model", str(ckpt))
    _check(report, 6, 32, 1)
    assert report["checkpoint_bytes"] >= info["bytes"] and report["disk_read_bytes_per_s"] > 0
    assert report["load_bytes_per_s"] > 0
    # the same seeded weights, from memory or from the file: the same first loss
    again = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "32", "--steps", "1")
    assert again["losses"][0] == pytest.approx(report["losses"][0], rel=1e-5)
