"""`pyqlora finetune` as a job that can stop and go on (issue 19): checkpoints (--save-every), --resume
bit for bit, Ctrl-C, outputs never overwritten by surprise, stdout/stderr, a missing matplotlib, data that
--seq-len drops, and the compute dtype chosen by the machine.

The runs use a tiny random Llama (real transformers code) saved as a Hugging Face folder with a real
character-level tokenizer, on a small JSON Lines file: a whole run takes a few seconds. The oracle of
resuming is the run that was never interrupted: its adapter file must be the same bytes.
"""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from support import tiny_llama_config  # noqa: E402

import pyqlora as pq  # noqa: E402
from pyqlora.app import cli, finetune  # noqa: E402

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _char_tokenizer():
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a tiny Llama + tokenizer (``model``), sums as JSON Lines (``data``), a text (``text``)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(transformers, vocab_size=112,
                                                            max_position_embeddings=256))
    model.save_pretrained(root / "model")
    _char_tokenizer().save_pretrained(root / "model")
    rnd = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(40):
            a, b = rnd.randint(0, 99), rnd.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    (root / "text.txt").write_text(" ".join(str(rnd.randint(0, 999)) for _ in range(2000)))
    return root


def args(tiny, out, *extra):
    """Command-line options of a small run on the tiny model (one thread: bit-identical runs)."""
    return ["finetune", "--model", tiny / "model", "--data", tiny / "data.jsonl", "--eval-text", tiny / "text.txt",
            "--eval-windows", "1", "--heldout", "4", "--batch-size", "2", "--seq-len", "48", "--sample-tokens", "4",
            "--threads", "1", "--no-progress", "--output", out, *extra]


def call(*argv):
    """``pyqlora ARGV`` in this process: the exit status (torch's thread count restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def command(*argv, runner=None, **kw):
    """``python -m pyqlora ARGV`` (or a runner script) as a user runs it: a subprocess with captured streams.

    It runs outside the source tree (``-m`` would put a clone's root, holding the uncompiled sources, first)."""
    kw.setdefault("cwd", tempfile.gettempdir())
    head = [sys.executable, "-c", runner] if runner else [sys.executable, "-m", "pyqlora"]
    return subprocess.run(head + [str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False,
                          **kw)


def adapter_bytes(folder):
    return (folder / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- the compute dtype
def cpuinfo_flags():
    """The CPU flags, read here from /proc/cpuinfo independently of pyqlora."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no flags line in /proc/cpuinfo")


@pytest.mark.parametrize("flags, expected", [
    ({"sse2", "avx", "avx2", "fma", "f16c"}, "float32"),                      # AVX2 only: bf16 is emulated
    ({"avx2", "avx512f", "avx512bw", "avx512vl"}, "float32"),                # AVX-512 without its BF16 part
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),                         # Zen 4, Cooper Lake
    ({"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),                           # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, "bfloat16"),                                    # aarch64 with FEAT_BF16
    ({"fp", "asimd"}, "float32"),
    (set(), "float32"),
])
def test_auto_dtype_rule_with_faked_features(flags, expected):
    name, reason = pq.default_compute_dtype(features=flags)
    assert name == expected and reason
    assert pq.default_compute_dtype(features=flags, cuda_bf16=True)[0] == "bfloat16"
    assert pq.default_compute_dtype(features=[f.upper() for f in flags])[0] == expected


@pytest.mark.parametrize("cap, expected", [
    ("AVX2", "float32"), ("avx512_core", "float32"), ("AVX512_CORE_VNNI", "float32"),
    ("AVX512_CORE_BF16", "bfloat16"), ("avx512_core_amx", "bfloat16"), ("ALL", "bfloat16"), ("", "bfloat16"),
])
def test_auto_dtype_honours_a_onednn_cap(monkeypatch, cap, expected):
    import pyqlora._config as config

    monkeypatch.setattr(config, "cpu_features", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    name, reason = pq.default_compute_dtype()
    assert name == expected
    assert ("ONEDNN_MAX_CPU_ISA" in reason) == (expected == "float32")
    assert pq.default_compute_dtype(features={"avx512_bf16"})[0] == "bfloat16"  # given flags: no cap applies


def test_auto_dtype_on_this_machine_and_in_the_run_settings(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    flags = cpuinfo_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16"}) or (os.uname().machine == "aarch64" and "bf16" in flags)
    assert pq.default_compute_dtype()[0] == ("bfloat16" if native else "float32")
    dtype, reason = finetune.resolve_dtype(finetune.FinetuneConfig())
    assert dtype == ("bf16" if native else "fp32") and reason.startswith("auto: ")
    assert finetune.resolve_dtype(finetune.FinetuneConfig(dtype="fp32")) == ("fp32", "--dtype fp32")  # explicit wins
    assert finetune.resolve_dtype(finetune.FinetuneConfig(dtype="bf16"))[0] == "bf16"
    assert finetune.resolve_dtype(finetune.FinetuneConfig(base="bf16"))[0] == "bf16"
    with pytest.raises(ValueError, match="--dtype"):
        finetune.FinetuneConfig(dtype="fp16").validate()


# ----------------------------------------------------------------------------- less padding
def test_length_groups_give_the_batch_loss_and_gradients():
    """A micro-batch cut into two groups of similar length (less padding) gives the loss and the
    adapter gradients of the whole padded batch (torch computes both; float32, rounding only)."""
    from pyqlora.lora import LoraConfig, prepare_model

    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(tiny_llama_config(transformers, vocab_size=112))
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make most gradients vanish
    tok = _char_tokenizer()
    recs = [{"prompt": "1+1=" * k, "response": "2" * (3 * k)} for k in (1, 7, 2, 9)]
    examples, _ = finetune.encode_records(tok, recs, seq_len=64)
    groups = finetune.length_groups(examples)
    assert [len(g) for g in groups] == [2, 2] and sorted(map(len, groups[0])) <= sorted(map(len, groups[1]))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(parts):
        total = 0.0
        for part in parts:
            s, _ = finetune.batch_loss(model, *finetune.collate(part, tok.pad_token_id))
            s.backward()
            total += float(s.detach())
        grads = [p.grad.clone() for p in trainable]
        for p in trainable:
            p.grad = None
        return total, grads

    whole, g_whole = loss_and_grads([examples])
    split, g_split = loss_and_grads(groups)
    assert split == pytest.approx(whole, rel=1e-5)
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    same = [(list(range(10)), list(range(10)))] * 4  # equal lengths: nothing to save, one group
    assert finetune.length_groups(same) == [same] and finetune.length_groups(same[:1]) == [same[:1]]


# ----------------------------------------------------------------------------- resume
def test_resume_gives_the_uninterrupted_adapter_bit_for_bit(tiny, tmp_path, capsys):
    """A run of 7 steps saving every 3 keeps checkpoint-6 (the latest); resuming it (settings from the
    checkpoint, another output folder) ends with the same adapter bytes, losses and report figures."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert call(*args(tiny, whole, "--steps", "7", "--save-every", "3", "--dtype", "fp32")) == 0
    assert sorted(p.name for p in whole.iterdir() if p.is_dir()) == ["checkpoint-6"]
    ckpt = whole / "checkpoint-6"
    assert {"adapter_config.json", "adapter_model.safetensors", "state.pt", "trainer_state.json"} <= set(
        os.listdir(ckpt))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["log"]["losses"]) == 6 and state["config"]["dtype"] == "fp32"
    assert set(state["rng"]) == {"numpy", "python"} and "order" in state["batch_order"]
    capsys.readouterr()

    assert call("finetune", "--resume", ckpt, "--output", resumed) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "after step 6 of 7" in err
    assert adapter_bytes(resumed) == adapter_bytes(whole)
    a, b = (json.loads((d / "report.json").read_text()) for d in (whole, resumed))
    assert b["train"]["losses"] == a["train"]["losses"] and len(a["train"]["losses"]) == 7
    assert b["heldout_loss"] == a["heldout_loss"] and b["perplexity"] == a["perplexity"]
    assert b["sample"] == a["sample"] and b["train"]["resumed_at_step"] == 6

    # a resumed run keeps its settings: a changed one is refused, a free one (--steps) is not
    capsys.readouterr()
    assert call("finetune", "--resume", ckpt, "--output", tmp_path / "x", "--lr", "0.5") == 2
    assert "--lr 0.5 differs from the checkpoint's 0.001" in capsys.readouterr().err
    assert call("finetune", "--resume", ckpt, "--output", tmp_path / "x", "--steps", "5") == 2
    assert "--steps 5 is less than the 6 steps" in capsys.readouterr().err
    assert call("finetune", "--resume", tmp_path, "--output", tmp_path / "x") == 2
    assert "not a checkpoint of pyqlora finetune" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_matches(tiny, tmp_path, capsys):
    """SIGINT to a training `pyqlora finetune` (a subprocess): it finishes the step, saves
    checkpoint-K, exits with status 130 and says how to go on; resuming to K + 2 steps gives the adapter
    of a run of K + 2 steps that was never interrupted, bit for bit."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pyqlora", *map(str, args(tiny, out, "--steps", "100000",
                                                                             "--save-every", "1", "--dtype", "fp32"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(n.startswith("checkpoint-") for n in os.listdir(out))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stdout == ""
    ckpts = [n for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert len(ckpts) == 1
    k = int(ckpts[0].split("-")[1])
    assert f"interrupted after step {k}; saved {out / ckpts[0]}" in stderr and "--resume" in stderr
    assert not (out / "report.json").exists()  # no final outputs from an interrupted run
    assert call(*args(tiny, out, "--steps", "2")) == 2  # a new run there is refused, and told how to go on
    assert f"continue it with pyqlora finetune --resume {out / ckpts[0]}" in capsys.readouterr().err

    assert call("finetune", "--resume", out / ckpts[0], "--steps", k + 2) == 0
    whole = tmp_path / "whole"
    assert call(*args(tiny, whole, "--steps", k + 2, "--dtype", "fp32")) == 0
    assert adapter_bytes(out) == adapter_bytes(whole)
    assert (json.loads((out / "report.json").read_text())["train"]["losses"]
            == json.loads((whole / "report.json").read_text())["train"]["losses"])


# ----------------------------------------------------------------------------- the base paged (issue 23)
def test_a_paged_base_trains_the_same_adapter(tiny, tmp_path, capsys):
    """--base-budget smaller than one layer: the model is loaded streamed, the base paged to a spill file and
    read back layer by layer, and the run ends with the resident run's adapter bytes, losses and figures."""
    resident, paged = tmp_path / "resident", tmp_path / "paged"
    assert call(*args(tiny, resident, "--steps", "3", "--dtype", "fp32")) == 0
    capsys.readouterr()
    assert call(*args(tiny, paged, "--steps", "3", "--dtype", "fp32", "--base-budget", "4K",
                      "--spill-dir", tmp_path)) == 0
    err = capsys.readouterr().err
    assert "base: paged, 0.00 GiB of RAM" in err and "page-ins and" in err
    assert adapter_bytes(paged) == adapter_bytes(resident)
    a, b = (json.loads((d / "report.json").read_text()) for d in (resident, paged))
    assert b["train"]["losses"] == a["train"]["losses"] and b["heldout_loss"] == a["heldout_loss"]
    assert b["perplexity"]["after"] == a["perplexity"]["after"]
    assert "original" in a["perplexity"] and "original" not in b["perplexity"]  # streamed: no dense model
    p = b["memory"]["base_paging"]
    assert "base_paging" not in a["memory"]
    assert p["budget_bytes"] == 4 << 10 and p["base_bytes"] > 2 * p["budget_bytes"]
    assert p["page_ins_per_step"] > 0 and 0 <= p["wait_fraction"] < 1 and p["spill_dir"] == str(tmp_path)

    for bad, message in ((["--base-budget", "0"], "expected a positive size"),
                         (["--base-budget", "lots"], "expected a size such as 8G"),
                         (["--spill-dir", tmp_path], "--spill-dir is where --base-budget spills"),
                         (["--base-budget", "1G", "--base", "bf16", "--dtype", "bf16"], "--base-budget pages")):
        try:
            status = call(*args(tiny, tmp_path / "x", *bad))
        except SystemExit as exc:  # argparse rejects a bad value itself
            status = exc.code
        assert status == 2
        assert message in capsys.readouterr().err, bad


# ----------------------------------------------------------------------------- outputs
def test_a_non_empty_output_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert call(*args(tiny, out, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("pyqlora: error: --output") and "not empty (notes.txt)" in err
    assert "--overwrite" in err and "loaded" not in err  # refused before the model loads
    assert call(*args(tiny, out, "--steps", "1", "--overwrite", "--sample-tokens", "0")) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left

    q = tmp_path / "q4"
    q.mkdir()
    (q / "x").write_text("")
    capsys.readouterr()
    assert call("quantize", tiny / "model", q) == 2
    assert "OUT" in capsys.readouterr().err and os.listdir(q) == ["x"]
    assert call("quantize", tiny / "model", q, "--overwrite") == 0
    assert {"model.safetensors", "config.json", "x"} <= set(os.listdir(q))


# ----------------------------------------------------------------------------- streams, --version, --help
@pytest.mark.slow
def test_streams_and_a_missing_matplotlib(tiny, tmp_path):
    """A subprocess with matplotlib made unimportable (as if it were not installed), with --json: the run
    ends well (exit 0), without the PNG, with one warning; stdout holds the report's JSON and nothing else,
    stderr the progress, the warning and the summary. (Without --json the summary is on stdout:
    tests/test_finetune.py::test_real_model_finetune_command.)"""
    runner = ("import sys; sys.modules['matplotlib'] = None; from pyqlora.app.cli import main; "
              "sys.argv[0] = 'pyqlora'; sys.exit(main())")
    out = tmp_path / "out"
    proc = command(*args(tiny, out, "--steps", "2", "--json"), runner=runner)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # nothing else on stdout
    assert report == json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 2 and len(report["train"]["losses"]) == 2
    assert report["compute_dtype"]["requested"] == "auto" and report["compute_dtype"]["reason"].startswith("auto: ")
    assert report["outputs"] == ["adapter_config.json", "adapter_model.safetensors", "report.json"]
    assert "loss_curve.png" not in os.listdir(out) and (out / "adapter_model.safetensors").exists()
    assert proc.stderr.count("pyqlora: warning: matplotlib cannot be imported") == 1
    assert "skipped the plot loss_curve.png" in proc.stderr
    assert "pyqlora finetune: compute dtype" in proc.stderr and "held-out loss" in proc.stderr


def test_json_of_the_other_commands(tiny, tmp_path, capsys):
    """--json: the JSON alone on stdout (demo and config as subprocesses, quantize and eval in this process)."""
    proc = command("demo", "--rows", "64", "--cols", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert [(r["codebook"], r["double_quant"]) for r in rows] == [("nf4", True), ("nf4", False), ("fp4", False),
                                                                  ("int4", False)]
    proc = command("config", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["pyqlora"] == pq.__version__
    capsys.readouterr()
    assert call("quantize", tiny / "model", tmp_path / "q4", "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["quantized_tensors"] == 14 and stats["out"] == str(tmp_path / "q4")
    assert call("eval", "--model", tmp_path / "q4", "--text", tiny / "text.txt", "--window", "32", "--windows", "2",
                "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and len(result["window_losses"]) == 2 and result["dtype"] == "fp32"


def test_version():
    proc = command("--version")
    assert proc.returncode == 0 and proc.stdout == f"pyqlora {pq.__version__}\n" and proc.stderr == ""


def test_help_lists_every_default():
    """Every option that takes a value says its default in --help, in every subcommand."""
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subparsers) >= {"demo", "config", "finetune", "quantize", "eval", "bench"}
    for name, sub in subparsers.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0:  # positionals, flags, --help
                continue
            text = formatter._expand_help(action)
            assert "default" in text, (name, action.option_strings, text)
    proc = command("finetune", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for piece in ("--steps STEPS optimizer steps (default: 30)", "(default: auto)", "(default: pyqlora-finetune-out)",
                  "--save-every N", "--resume DIR", "--overwrite"):
        assert piece in text, piece


# ----------------------------------------------------------------------------- data that --seq-len drops
def test_dropped_records_are_said_and_too_few_fail(tiny, tmp_path, capsys):
    """A record whose prompt alone fills --seq-len is dropped: said on stderr with the count and the
    fraction; the held-out records are drawn from those that fit; too few records to hold out --heldout and
    train, or fewer training examples than a batch, fail (exit 2)."""
    from pyqlora.app.data import split_heldout

    def write(n, heldout, long_at):
        rows = [{"prompt": ("a long question " * 4 if i in long_at else "") + f"{i}+{i}=", "response": str(2 * i)}
                for i in range(n)]
        path = tmp_path / f"data{n}-{len(long_at)}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train, held = split_heldout(list(range(n)), heldout=heldout)  # which records the run holds out
        return path, train, held

    def run(path, heldout):
        rc = call(*args(tiny, tmp_path / "out", "--steps", "1", "--data", path, "--heldout", heldout,
                        "--sample-tokens", "0", "--eval-text", "none", "--overwrite"))
        return rc, capsys.readouterr().err

    _, train, held = write(40, 2, ())
    path, _, _ = write(40, 2, train[:10])  # 10 training records too long: said, and the run goes on
    rc, err = run(path, 2)
    assert rc == 0, err
    assert "pyqlora: warning: --seq-len 48 drops 10 of 40 records (25.0 %" in err
    assert "28 training and 2 held-out examples remain" in err

    path, _, _ = write(40, 2, held[:1])  # a record the fixed split would hold out is too long: another one is held out
    rc, err = run(path, 2)
    assert rc == 0, err
    assert "drops 1 of 40 records (2.5 %" in err and "37 training and 2 held-out examples remain" in err

    path, _, _ = write(6, 1, range(3))  # 3 of 6 records fit: hold out 3 of them and nothing is left to train on
    rc, err = run(path, 3)
    assert rc == 2
    assert err.strip().splitlines()[-1] == ("pyqlora: error: --seq-len 48 keeps 3 of 6 records, too few to hold out "
                                            "3 (--heldout 3) and train on the rest; raise --seq-len or hold out fewer")

    _, train, held = write(8, 1, ())
    path, _, _ = write(8, 1, train[1:])  # one training example left, the batch is 2
    rc, err = run(path, 1)
    assert rc == 2 and "drops 6 of 8 records (75.0 %" in err
    assert err.strip().splitlines()[-1].startswith("pyqlora: error: --seq-len 48 leaves 1 training examples, "
                                                   "fewer than one batch (--batch-size 2)")


def test_text_data_holds_out_a_tenth_of_its_chunks_by_default(tiny, tmp_path):
    """--heldout's default: 20 records of prompt/response pairs, the last 10 % of the chunks of a text."""
    n_tokens = len(_char_tokenizer()((tiny / "text.txt").read_text(), add_special_tokens=False).input_ids) + 1
    chunks = -(-(n_tokens - 1) // 48)  # chunks of --seq-len 48 (the last one may be shorter)
    argv = args(tiny, tmp_path / "out", "--steps", "1", "--data", tiny / "text.txt", "--eval-text", "none",
                "--sample-tokens", "0")
    i = argv.index("--heldout")
    assert call(*argv[:i], *argv[i + 2:]) == 0  # --heldout's default
    data = json.loads((tmp_path / "out" / "report.json").read_text())["data"]
    assert data["heldout_examples"] == round(0.1 * chunks) and data["train_examples"] == chunks - round(0.1 * chunks)
