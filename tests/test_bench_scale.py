"""benchmarks/bench_scale.py on a tiny Llama, run as a subprocess: it runs, its report has its fields, and
its resident memory stays under bounds computed from the shapes (no timing is checked)."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_scale.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
from bench_scale import llama_config, meta_model, nf4_bytes, parse_size, plot, shape_sizes, table  # noqa: E402
MIB = 1 << 20
FIELDS = ("load_s", "peak_rss_load", "rss_loaded", "peak_rss_train", "step_s", "losses", "gflops_step",
          "dense_gemm_gflops", "dense_gemm_gflops_before", "dense_gemm_gflops_after", "fraction_of_dense",
          "quantized_weight_bytes", "bf16_weight_bytes", "model_bytes",
          "matmul_params", "trainable_params", "optimizer_state_bytes", "rss_start")


def _run(tmp_path, *args):
    out = tmp_path / f"report{len(list(tmp_path.iterdir()))}.json"
    threads = () if "--threads" in args else ("--threads", "2")
    # every large block mapped afresh and returned on free, so that resident memory is live memory and the
    # bounds below catch a dense model; the default policy (bound_heap) keeps freed heap up to its bound
    heap = () if any(a.startswith("--heap") for a in args) else ("--heap", "mapped")
    done = subprocess.run([sys.executable, SCRIPT, *args, *threads, *heap, "--gemm-repeat", "1", "--json", str(out)],
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
    # the fraction is taken of the faster of the two dense measurements (the conservative one)
    assert report["dense_gemm_gflops"] == max(report["dense_gemm_gflops_before"], report["dense_gemm_gflops_after"])
    assert report["fraction_of_dense"] == pytest.approx(report["gflops_step"] / report["dense_gemm_gflops"])
    # Loading: the 4-bit layers, the float32 embeddings, head and norms, and at most one dense layer's weight
    # being quantized (bfloat16 + its float32 random source) -- never the dense model (4 bytes a weight).
    rest = 4 * (2 * v * h + (2 * layers + 1) * h)
    one_layer = 6 * max(h * i, h * h)
    dense_fp32 = 4 * linear
    load_bound = report["quantized_weight_bytes"] + rest + one_layer + 48 * MIB
    assert load_bound < dense_fp32 + rest  # so the bound fails if the dense model ever exists
    # --heap bound lets glibc keep up to retain_bytes of freed heap (and what grows within one 10 ms poll)
    retained = report["heap_trims"]["retain_bytes"] + 16 * MIB if report["heap"] == "bound" else 0
    assert report["peak_rss_load"] - report["rss_start"] <= load_bound + retained
    # Training, above the loaded model: checkpointed layer inputs, one layer recomputed, the logits and the
    # loss's softmax and their gradients, the adapters with their gradients and AdamW moments, torch's and
    # nf4core's tiles; all float32.
    activations = 4 * seq * (layers * h + 16 * h + 8 * i + 6 * v)
    adapters = 4 * 4 * report["trainable_params"]
    train_bound = activations + adapters + 64 * MIB + retained
    assert report["peak_rss_train"] - report["rss_loaded"] <= train_bound


def test_random_weights(tmp_path):
    report = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "64", "--steps", "2")
    _check(report, 6, 64, 2)
    assert report["heap"] == "mapped" and report["heap_limited"] in (True, False) and report["heap_trims"] is None
    # the default heap policy: the same losses bit for bit, memory within the bound plus what it may keep
    bound = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "64", "--steps", "2", "--heap-retain-mib", "16")
    assert bound["heap"] == "bound"
    if bound["heap_limited"]:  # glibc 2.33 or later
        assert bound["heap_trims"]["retain_bytes"] == 16 * MIB and bound["heap_trims"]["trims"] >= 0
        _check(bound, 6, 64, 2)
    assert bound["losses"] == report["losses"]


def test_profile_splits_the_last_step_and_counts_the_recomputed_forward(tmp_path):
    """--profile: the last step's time by part, and the 4-bit products' calls, which gradient checkpointing
    fixes: each of the 7 linears of a layer runs forward twice (forward, recomputed forward) and backward once.
    Profiling changes no number of the training."""
    plain = _run(tmp_path, "--shape", "tiny", "--layers", "2", "--seq", "32", "--steps", "2")
    report = _run(tmp_path, "--shape", "tiny", "--layers", "2", "--seq", "32", "--steps", "2", "--profile")
    prof = report["step_profile"]
    assert prof["calls"] == {"nf4_forward": 2 * 7 * 2, "nf4_backward": 7 * 2}
    assert set(prof["seconds"]) == {"4-bit products", "head", "attention", "optimizer", "adapters",
                                    "elementwise and other", "unattributed"}
    assert all(v >= 0 for v in prof["seconds"].values()) and prof["seconds"]["4-bit products"] > 0
    assert prof["step_s"] == report["step_s"][-1]
    assert report["losses"] == plain["losses"]
    assert "step_profile" not in plain


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
    # streamed from the file into a base paged with 30 % of its bytes in RAM
    report = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "32", "--steps", "1", "--model", str(ckpt),
                  "--base-budget", "0.3x", "--spill-dir", str(tmp_path))
    _check(report, 6, 32, 1)
    assert report["checkpoint_bytes"] >= info["bytes"] and report["disk_read_bytes_per_s"] > 0
    assert report["load_bytes_per_s"] > 0
    paging = report["base_paging"]
    # the pager holds the arrays: quantized_weight_bytes also counts each layer's 4-byte nested offset
    assert paging["base_bytes"] == report["quantized_weight_bytes"] - 4 * 6 * 7
    assert report["base_budget_bytes"] == int(0.3 * shape_sizes("tiny", 6)["nf4_bytes"]) == paging["budget_bytes"]
    assert paging["spilled_bytes"] > 0 and paging["resident_bytes"] <= paging["budget_bytes"] + paging["page_bytes"]
    (step,) = paging["per_step"]
    assert step["page_ins"] > 0 and step["layer_calls"] >= 2 * 6 * 7  # forward, recomputed forward, backward
    assert 0 <= step["wait_fraction"] <= 1
    # the same seeded weights, from memory into a resident base or from the file into a paged one: the same loss
    again = _run(tmp_path, "--shape", "tiny", "--layers", "6", "--seq", "32", "--steps", "1")
    assert "base_paging" not in again
    assert again["losses"][0] == report["losses"][0]
    # docs/scale.md's table and plot from these reports
    rows = table([again, report]).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| tiny, 6 layers | 1x32 |") and "| all |" in rows[2]
    assert "budget" in rows[3] and rows[3].endswith("%) |")
    pytest.importorskip("matplotlib")
    png = tmp_path / "scale.png"
    plot(str(png), [again, report])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_4bit_checkpoint_written_once_then_paged_from_its_files(tmp_path):
    ckpt = tmp_path / "nf4"
    # two steps: the second one's loss depends on the first update and on the seeded adapters
    args = ("--shape", "tiny", "--layers", "6", "--seq", "32", "--steps", "2")
    first = _run(tmp_path, *args, "--checkpoint", str(ckpt), "--base-budget", "0.3x", "--spill-dir", str(tmp_path))
    _check(first, 6, 32, 2)
    written = first["checkpoint_written"]
    assert written["bytes"] == first["checkpoint_bytes"] > 0 and not (tmp_path / "nf4.partial").exists()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and cfg["num_hidden_layers"] == 6
    # bitsandbytes' keys, readable by pyqlora's checkpoint reader as any transformers checkpoint
    from safetensors import safe_open

    with safe_open(str(next(ckpt.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "model.layers.0.mlp.down_proj.weight.nested_absmax" in keys and "lm_head.weight" in keys
    paging = first["base_paging"]
    # paged from the checkpoint's own file: nothing copied into a spill file
    assert paging["spill_file_bytes"] == 0 and paging["mapped_from_checkpoint_bytes"] >= paging["base_bytes"]
    assert paging["spilled_bytes"] > 0 and paging["per_step"][0]["page_ins"] > 0
    # reused, resident; and the same seeded weights streamed from memory: the same model, the same losses,
    # bit for bit. All three at the same thread count: nf4core's products give the same bits at any count
    # (tests/test_matmul.py), torch's own are not bound to (on an Intel Xeon with AVX-512, torch's float32 ops moved
    # the second loss by 5e-7 between 1 and 2 torch threads)
    again = _run(tmp_path, *args, "--checkpoint", str(ckpt))
    assert "checkpoint_written" not in again and "base_paging" not in again
    streamed = _run(tmp_path, *args)
    assert len(first["losses"]) == 2 and first["losses"][0] != first["losses"][1]
    assert first["losses"] == again["losses"] == streamed["losses"]
    assert first["quantized_weight_bytes"] == streamed["quantized_weight_bytes"]
    # a folder holding another shape is refused, not trained
    other = subprocess.run([sys.executable, SCRIPT, "--shape", "tiny", "--layers", "5", "--checkpoint", str(ckpt)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode != 0 and "holds another model" in other.stderr


def test_shape_sizes_match_the_model_and_the_papers():
    """The size arithmetic (used for 33b/65b, which are not run here) against the parameters of the model
    transformers builds for the shape (on the meta device) and the sizes the LLaMA papers give."""
    import torch

    from pyqlora.nn import Linear4bit

    for shape in ("tiny", "1b", "7b", "13b", "33b", "65b"):
        sizes = shape_sizes(shape)
        model = meta_model(llama_config(shape))
        assert sizes["params"] == sum(p.numel() for p in model.parameters()), shape
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
        assert sizes["linear_params"] == linear, shape
        assert sizes["bf16_weight_bytes"] == 2 * sizes["params"]
    # LLaMA: 6.7B, 13.0B, 32.5B, 65.2B parameters; 33B's bf16 weights 60.6 GiB (issue 23)
    for shape, billions in (("7b", 6.74), ("13b", 13.0), ("33b", 32.5), ("65b", 65.3)):
        assert shape_sizes(shape)["params"] / 1e9 == pytest.approx(billions, abs=0.05)
    assert shape_sizes("33b")["bf16_weight_bytes"] / 2**30 == pytest.approx(60.6, abs=0.05)
    # NF4 + DQ bytes of one layer: what pyqlora's quantizer produces
    lin = torch.nn.Linear(200, 96, bias=False)
    assert Linear4bit.from_linear(lin, blocksize=64, double_quant=True).quantized.nbytes == nf4_bytes(96, 200)
    # 4.13 bits a weight for the big shapes
    assert 8 * shape_sizes("65b")["nf4_bytes"] / shape_sizes("65b")["linear_params"] == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("text, expected", [("3G", 3 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("100", 100),
                                            ("64KiB", 64 << 10), ("0.5x", 500), ("2X", 2000)])
def test_parse_size(text, expected):
    assert parse_size(text, 1000) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "3Q", "0.1", "1e9", "0x"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text, 1000)


def test_bad_base_budget_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--shape", "tiny", "--base-budget", "lots"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "--base-budget" in done.stderr and "0.5x" in done.stderr


def _printed_by_mode(code, modes):
    """{mode: the words `python -c code mode` printed}, each in a fresh interpreter (glibc's heap state is
    process-wide), run outside the source tree (`-c` puts the working directory first on sys.path)."""
    out = {}
    for how in modes:
        done = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120,
                              cwd=tempfile.gettempdir())
        assert done.returncode == 0, done.stderr
        out[how] = done.stdout.split()
    return out


def test_bound_heap_returns_the_free_heap_and_no_other_memory():
    """pyqlora._glue.memory.bound_heap (what bench_scale.py and finetune --base-budget call): bad arguments are
    refused; on glibc, blocks freed inside the heap (pinned by small blocks after them, so that the heap's top
    cannot shrink) go back to the kernel once more than the bound of them is resident, where glibc's default keeps
    them; memory outside malloc (an anonymous mapping) costs at most one trim, not one per poll."""
    from pyqlora._glue.memory import bound_heap, heap_bound_stats

    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="retain_bytes"):
            bound_heap(bad)
    for bad in (0, -1, 11, True):
        with pytest.raises(ValueError, match="interval"):
            bound_heap(1 << 20, interval=bad)
    assert heap_bound_stats() is None  # no thread in this process
    code = ("import ctypes, mmap, sys, time\n"
            "from pyqlora._glue.memory import bound_heap, heap_bound_stats, _anon_rss\n"
            "libc = ctypes.CDLL('libc.so.6')\n"
            "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "big, keep = [], []\n"
            "for _ in range(2048):\n"  # 96 KiB: under glibc's smallest mmap threshold, so from the heap
            "    p = libc.malloc(96 << 10); ctypes.memset(p, 1, 96 << 10); big.append(p)\n"
            "    keep.append(libc.malloc(64))\n"
            "ok = bound_heap(32 << 20, interval=0.005) if sys.argv[1] == 'bound' else None\n"
            "time.sleep(0.1)\n"
            "before = _anon_rss()\n"
            "for p in big: libc.free(p)\n"
            "end = time.time() + (10 if ok else 1)\n"
            "while time.time() < end and _anon_rss() > before - (150 << 20): time.sleep(0.01)\n"
            "dropped = before - _anon_rss()\n"
            "m = mmap.mmap(-1, 256 << 20)\n"
            "for i in range(0, 256 << 20, 4096): m[i] = 1\n"
            "time.sleep(0.1)\n"
            "trims = heap_bound_stats()['trims'] if ok else 0\n"
            "time.sleep(0.5)\n"
            "print(ok, dropped, (heap_bound_stats()['trims'] if ok else 0) - trims)")
    out = _printed_by_mode(code, ("bound", "default"))
    if out["bound"][0] == "True":  # glibc 2.33 or later
        assert int(out["bound"][1]) >= 150 * MIB  # of the 192 MiB freed
        assert int(out["bound"][2]) <= 1  # the mapping raised the floor; no trim per poll
        assert int(out["default"][1]) < 16 * MIB  # what the bound is for: glibc's default keeps them
    else:
        assert out["bound"][0] == "False"


def test_limit_heap_retention():
    """pyqlora._glue.memory.limit_heap_retention (what bench_scale.py calls): bad thresholds are refused; on glibc
    blocks freed after a large one was (training's pattern) go back to the kernel, where glibc's default keeps them
    in its heap (its mmap threshold has risen to the large block's size)."""
    from pyqlora._glue.memory import limit_heap_retention, trim_heap

    for bad in (-1, 1.5, True, "1M"):
        with pytest.raises(ValueError, match="mmap_threshold"):
            limit_heap_retention(bad)
    assert trim_heap() in (True, False)
    code = ("import sys\nimport numpy as np\nfrom pyqlora._glue.memory import limit_heap_retention, memory_status\n"
            "ok = limit_heap_retention(1 << 20) if sys.argv[1] == 'limit' else None\n"
            "big = np.ones(24 << 20, np.uint8)\ndel big\na, keep = [], []\n"
            "for _ in range(64):\n"
            "    a.append(np.ones(2 << 20, np.uint8))\n"
            "    keep.append(np.ones(64 << 10, np.uint8))\n"  # small blocks between them pin the heap
            "before = memory_status()['rss']\ndel a\nprint(ok, before - memory_status()['rss'])")
    out = _printed_by_mode(code, ("limit", "default"))
    if out["limit"][0] == "True":  # glibc
        assert int(out["limit"][1]) >= 120 * MIB  # the 128 MiB freed are unmapped at once
        assert int(out["default"][1]) < 16 * MIB  # what the limit is for: glibc's default keeps them
    else:
        assert out["limit"][0] == "False"
