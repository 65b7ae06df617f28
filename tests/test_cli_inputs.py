"""Bad input to the command line (issue 18, items 10 and 11): every expected bad input ends with one line
``pyqlora: error: FILE: what is wrong`` on stderr and exit status 2, never a traceback; ``--debug`` or
``PYQLORA_DEBUG=1`` shows the traceback; a bug (any other exception) keeps its traceback.

The regressions run ``pyqlora`` in-process (``pyqlora.app.cli.main``: the return value is the exit status, an
exception that escapes it is the traceback a user would see) and, for the defects as reported, as a
subprocess the way a user runs it. The property tests feed the readers corrupted files and accept only
success or ValueError/OSError naming the file (what the CLI reports as bad input; even a TypeError would be
shown as a bug).
"""
import gzip
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyqlora.app import cli, data


def run(*args, env=None):
    """`python -m pyqlora ARGS` as a user runs it, outside the source tree."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "pyqlora", *map(str, args)], capture_output=True, text=True,
                              timeout=300, cwd=cwd, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("PYQLORA_DEBUG", raising=False)


def call(capsys, *args):
    """(exit status, stderr) of ``pyqlora ARGS`` run in this process."""
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_bad_input(rc, err, *words):
    """Exit status 2, the last stderr line is ``pyqlora: error: ...`` and holds every one of `words`."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyqlora: error: "), err
    for w in words:
        assert str(w) in last, (w, last)
    return last


_serial = itertools.count()


def fresh_path(tmp_path_factory, name):
    """A new file name per example: the readers map files, and a file is never rewritten under a live mapping."""
    return os.path.join(tmp_path_factory.getbasetemp(), f"{next(_serial)}-{name}")


def gzip_bytes(text):
    return gzip.compress(text.encode(), mtime=0)


RECORDS = "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(40))


# ----------------------------------------------------------------------------- --data, --text (no torch)
def test_data_not_gzip_as_reported(tmp_path):
    """`pyqlora finetune --data notgz.jsonl.gz` (a .gz name, plain bytes) ended in BadGzipFile's traceback."""
    bad = tmp_path / "notgz.jsonl.gz"
    bad.write_text(RECORDS)
    proc = run("finetune", "--data", bad)
    assert_bad_input(proc.returncode, proc.stderr, bad, "not valid gzip data")


def test_debug_shows_the_traceback_of_the_same_bad_input(tmp_path):
    bad = tmp_path / "notgz.jsonl.gz"
    bad.write_text(RECORDS)
    for proc in (run("--debug", "finetune", "--data", bad), run("finetune", "--data", bad, env={"PYQLORA_DEBUG": "1"})):
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr
        assert "BadGzipFile" in proc.stderr  # the reader's own error, as the cause
        assert f"ValueError: {bad}: not valid gzip data" in proc.stderr
    assert run("finetune", "--data", bad, env={"PYQLORA_DEBUG": "0"}).returncode == 2


def test_debug_after_the_command_and_in_process(tmp_path, monkeypatch):
    bad = tmp_path / "notgz.jsonl.gz"
    bad.write_text(RECORDS)
    for argv in (["--debug", "finetune", "--data", str(bad)], ["finetune", "--debug", "--data", str(bad)]):
        with pytest.raises(ValueError, match="not valid gzip data") as info:
            cli.main(argv)
        assert type(info.value.__cause__).__name__ == "BadGzipFile"
    monkeypatch.setenv("PYQLORA_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid gzip data"):
        cli.main(["finetune", "--data", str(bad)])


def test_data_truncated_gzip(tmp_path, capsys):
    whole = gzip_bytes(RECORDS)
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(whole[:len(whole) // 2])
    assert_bad_input(*call(capsys, "finetune", "--data", bad), bad, "truncated or corrupt")
    crc = bytearray(whole)
    crc[-8] ^= 0xFF  # the CRC32 in the trailer
    bad.write_bytes(bytes(crc))
    assert_bad_input(*call(capsys, "finetune", "--data", bad), bad, "not valid gzip data", "CRC")
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0x55  # inside the deflate stream
    bad.write_bytes(bytes(flipped))
    assert_bad_input(*call(capsys, "finetune", "--data", bad), bad)


def test_data_not_utf8_names_the_line_and_byte(tmp_path, capsys):
    raw = RECORDS.encode()
    pos = raw.index(b"p7")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(raw[:pos] + b"\xe9" + raw[pos:])
    line = assert_bad_input(*call(capsys, "finetune", "--data", bad), f"{bad}:8:", "not UTF-8",
                            f"byte offset {pos}", "0xe9")
    assert "of the file" in line
    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(raw[:pos] + b"\xe9" + raw[pos:]))
    assert_bad_input(*call(capsys, "finetune", "--data", gz), f"{gz}:8:", f"byte offset {pos} of the "
                     "decompressed data")
    text = tmp_path / "notes.txt"
    text.write_bytes(b"line one\r\nline two\rline three \xff\xfe\n")
    assert_bad_input(*call(capsys, "finetune", "--data", text), f"{text}:3:", "not UTF-8", "byte offset 30")
    zipped = tmp_path / "notes2.txt"
    zipped.write_bytes(gzip_bytes("some text"))
    assert_bad_input(*call(capsys, "finetune", "--data", zipped), zipped, "gzip-compressed")


def test_text_not_utf8_or_a_folder(tmp_path, capsys):
    bad = tmp_path / "ppl.txt"
    bad.write_bytes(b"a\nb\nc \x80 d\n")
    assert_bad_input(*call(capsys, "eval", "--text", bad), f"{bad}:3:", "not UTF-8", "byte offset 6")
    assert_bad_input(*call(capsys, "eval", "--text", tmp_path), tmp_path, "is a folder")


def test_data_json_problems_name_the_line(tmp_path, capsys):
    for body, words in [('{"text": "a"}\n' + "[" * 100000 + "\n", (":2:", "not usable JSON")),
                        ('{"text": "a"}\n{"text": ' + "9" * 5000 + "}\n", (":2:", "not usable JSON")),
                        ('{"prompt": "\\ud800", "response": "r"}\n', (":1:", "unpaired surrogate")),
                        ('{"text": "a"}\n7\n', (":2:", "expected a JSON object, got int")),
                        ('{"prompt": ["a"], "response": "b"}\n', (":1:", "field 'prompt' must be a string"))]:
        f = tmp_path / "d.jsonl"
        f.write_text(body)
        assert_bad_input(*call(capsys, "finetune", "--data", f), f, *words)


def test_a_bom_is_skipped_in_json_lines_and_kept_in_text(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + RECORDS.encode())
    assert len(data.load_records(f)) == 40
    # as open(encoding="utf-8") keeps it: perplexity windows start at a fraction of the characters (Botchan has one)
    t = tmp_path / "bom.txt"
    t.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\n")
    assert data.eval_text(str(t))[0] == "\ufeffa\nb\nc\n"


def test_help_documents_debug(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--debug" in out and "PYQLORA_DEBUG=1" in out and "exit status 2" in out


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only ValueError, OSError and finetune's SetupError are bad input; any other exception is re-raised."""
    for exc in (RuntimeError("a torch failure"), KeyError("x"), TypeError("f() takes 1 argument"),
                AttributeError("no such thing")):
        def broken(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "_config", broken)
        with pytest.raises(type(exc)):
            cli.main(["config"])
    for exc in (ValueError("bad value"), PermissionError("f: cannot read")):
        def refused(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "_config", refused)
        assert_bad_input(*call(capsys, "config"), str(exc))
        with pytest.raises(type(exc)):
            cli.main(["--debug", "config"])


# ----------------------------------------------------------------------------- property: data files
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)
rows = st.one_of(
    st.builds(lambda p, r: {"prompt": p, "response": r}, st.text(), st.text()),
    st.builds(lambda t: {"text": t}, st.text()),
    st.dictionaries(st.sampled_from(["prompt", "response", "completion", "output", "text", "other"]), json_values,
                    max_size=3),
    json_values,
)


@st.composite
def corrupted_data_files(draw):
    """(file name, bytes): JSON Lines (plain or gzip) or text, then damaged in one of several ways."""
    raw = "".join(json.dumps(r) + "\n" for r in draw(st.lists(rows, max_size=6))).encode()
    kind = draw(st.sampled_from(["jsonl", "jsonl.gz", "txt"]))
    damage = draw(st.sampled_from(["none", "bad utf-8", "random bytes", "truncate", "flip"]))
    if damage == "bad utf-8":
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9t\xe9", b"\x80\x80"]))
        raw = raw[:at] + bad + raw[at:]
    if kind == "jsonl.gz":
        raw = gzip.compress(raw, mtime=0)
    if damage == "random bytes":
        raw = draw(st.binary(max_size=200))
    elif damage == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif damage == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    return f"data.{kind}", raw


@given(corrupted_data_files())
@example(("data.jsonl.gz", b"not gzip"))
@example(("data.jsonl.gz", gzip.compress(b'{"text": "x"}\n')[:15]))
@example(("data.jsonl", b'{"text": "\\udc80"}\n'))
@example(("data.jsonl", b"{}\n" + b"[" * 50000))
def test_load_records_fails_only_with_errors_naming_the_file(tmp_path_factory, case):
    name, raw = case
    path = fresh_path(tmp_path_factory, name)
    with open(path, "wb") as f:
        f.write(raw)
    try:
        records = data.load_records(path)
    except (ValueError, OSError) as exc:  # what the CLI reports; a TypeError would be shown as a bug
        assert path in str(exc), exc
    else:
        assert records and all(isinstance(r, dict) for r in records)
        for r in records:
            assert all(isinstance(v, str) for v in r.values())
            for v in r.values():
                v.encode("utf-8")  # text a tokenizer can take


# ----------------------------------------------------------------------------- models (torch)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

from pyqlora.app import checkpoint, weights


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense Llama folder (config.json, model.safetensors, a character tokenizer) and a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("models")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "dense")
    vocab = {"<unk>": 0, **{chr(32 + i): i + 1 for i in range(95)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(root / "dense")
    (root / "text.txt").write_text(" ".join(chr(33 + (i * 31) % 90) for i in range(600)))
    return root


def variant(dense, tmp_path, name, config=None, tensors=None, weights_bytes=None):
    """A copy of the dense folder with config.json values replaced, tensors edited, or the weights' bytes."""
    folder = tmp_path / name
    shutil.copytree(dense / "dense", folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        sd = load_file(folder / "model.safetensors")
        tensors(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    if weights_bytes is not None:
        (folder / "model.safetensors").write_bytes(weights_bytes((folder / "model.safetensors").read_bytes()))
    return folder


EVAL = ("--window", "32", "--windows", "2")


def test_missing_launcher_or_package_is_reported_not_a_traceback(monkeypatch, capsys):
    """finetune's SetupError (a RuntimeError: a launcher or a package is missing) is reported like bad input."""
    from pyqlora.app.finetune import SetupError
    from pyqlora.app.models import smollm2_gguf_path

    def missing(args):
        raise SetupError("--optimizer paged_adamw needs pyqlora.optim")

    with monkeypatch.context() as m:
        m.setattr(cli, "_config", missing)
        assert_bad_input(*call(capsys, "config"), "needs pyqlora.optim")
    try:
        smollm2_gguf_path()  # finetune checks the (default) model before it starts
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    import torch.distributed as dist

    if not dist.is_initialized():  # pyqlora.distributed.setup's RuntimeError, as a SetupError
        assert_bad_input(*call(capsys, "finetune", "--distributed", "ddp", "--output", "unused"), "torchrun")


def test_truncated_safetensors_as_reported(dense, tmp_path):
    """`pyqlora quantize` / `pyqlora eval --model` on a cut model.safetensors ended in SafetensorError's traceback."""
    folder = variant(dense, tmp_path, "cut", weights_bytes=lambda b: b[:len(b) // 2])
    proc = run("quantize", folder, tmp_path / "out")
    assert_bad_input(proc.returncode, proc.stderr, folder / "model.safetensors", "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"", lambda b: b[:7],
                                    lambda b: b[:8] + b"{not json" + b[17:]])
def test_damaged_safetensors(dense, tmp_path, capsys, damage):
    folder = variant(dense, tmp_path, "bad", weights_bytes=damage)
    target = folder / "model.safetensors"
    assert_bad_input(*call(capsys, "quantize", folder, tmp_path / "out"), target, "not a valid safetensors")
    assert_bad_input(*call(capsys, "eval", "--model", folder, "--text", dense / "text.txt", *EVAL), target,
                     "not a valid safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, words", [
    ({"intermediate_size": 256}, ["'model.layers.0.mlp.down_proj.weight'", "shape (64, 128)", "implies (64, 256)",
                                  "intermediate_size=256"]),
    ({"vocab_size": 100}, ["'lm_head.weight'", "shape (128, 64)", "implies (100, 64)", "vocab_size=100"]),
    ({"hidden_size": 32, "head_dim": 16}, ["'lm_head.weight'", "shape (128, 64)", "implies (128, 32)"]),
    ({"num_key_value_heads": 4}, ["'model.layers.0.self_attn.k_proj.weight'", "shape (32, 64)", "implies (64, 64)"]),
])
def test_quantize_refuses_a_config_that_disagrees_with_the_weights(dense, tmp_path, capsys, change, words):
    folder = variant(dense, tmp_path, "cfg", config=change)
    out = tmp_path / "out"
    last = assert_bad_input(*call(capsys, "quantize", folder, out), folder / "model.safetensors",
                            folder / "config.json", *words)
    assert "disagree" in last
    assert not out.exists() and os.listdir(tmp_path) == ["cfg"]  # nothing written, no temporary folder left
    assert_bad_input(*call(capsys, "eval", "--model", folder, "--text", dense / "text.txt", *EVAL), *words)


def test_layer_counts_that_disagree(dense, tmp_path, capsys):
    """More layers than the weights hold (transformers would start them from random values and warn) or fewer
    (it would drop the rest) are refused, quickly even for a damaged count."""
    for n in (3, 1, 2**31):
        folder = variant(dense, tmp_path, f"layers{n}", config={"num_hidden_layers": n})
        words = [folder / "config.json", f"num_hidden_layers={n}", "hold 2 layers"]
        assert_bad_input(*call(capsys, "quantize", folder, tmp_path / "out"), *words)
        assert_bad_input(*call(capsys, "eval", "--model", folder, "--text", dense / "text.txt", *EVAL), *words)
    missing = variant(dense, tmp_path, "nohead", tensors=lambda sd: sd.pop("lm_head.weight"))
    assert_bad_input(*call(capsys, "quantize", missing, tmp_path / "out"), "no tensor for 1 parameter",
                     "lm_head.weight")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weight_names_the_tensor_and_the_file(dense, tmp_path, capsys, value):
    def poison(sd):
        sd["model.layers.1.mlp.up_proj.weight"][5, 7] = value

    folder = variant(dense, tmp_path, "nan", tensors=poison)
    words = [folder / "model.safetensors", "'model.layers.1.mlp.up_proj.weight'", f"holds {value}",
             "at index (5, 7)"]
    assert_bad_input(*call(capsys, "quantize", folder, tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()
    assert_bad_input(*call(capsys, "eval", "--model", folder, "--text", dense / "text.txt", "--codebook", "nf4",
                           *EVAL), *words)


def test_quantize_leaves_the_output_as_it_was_when_it_fails(dense, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert call(capsys, "quantize", dense / "dense", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    bad = variant(dense, tmp_path, "nan", tensors=lambda sd: sd["model.layers.0.mlp.up_proj.weight"].fill_(np.inf))
    assert_bad_input(*call(capsys, "quantize", bad, out), "OUT", "is not empty", "--overwrite")  # issue 19
    assert_bad_input(*call(capsys, "quantize", bad, out, "--overwrite"), "inf")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "notes.txt": b"mine"}

    def disk_full(folder, tensors, cfg, side_files_from=None):  # the first file written, then the disk is full
        save_file({"x": torch.zeros(1)}, os.path.join(folder, "model.safetensors"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_checkpoint", disk_full)
    for target in (out, tmp_path / "new"):
        with pytest.raises(OSError, match="No space left"):
            checkpoint.quantize_checkpoint(str(dense / "dense"), str(target))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "notes.txt": b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["nan", "out"]  # no new folder, no temporary folder left
    (tmp_path / "file").write_text("x")
    assert_bad_input(*call(capsys, "quantize", dense / "dense", tmp_path / "file"), "is a file")


def test_config_index_and_tokenizer_files(dense, tmp_path, capsys):
    text = ("--text", dense / "text.txt", *EVAL)
    for body, words in [(b"{not json", ["is not valid JSON", "line 1"]), (b"[1, 2]", ["expected a JSON object"]),
                        (b'{"model_type": "llama", "x": "\xff"}', ["not UTF-8"]),
                        (b'{"model_type": "no-such-model"}', ["not a configuration transformers can read"]),
                        (b'{"model_type": "llama", "quantization_config": 5}', ["quantization_config must be"])]:
        folder = variant(dense, tmp_path, "c", weights_bytes=lambda b: b)
        (folder / "config.json").write_bytes(body)
        for args in (("quantize", folder, tmp_path / "out"), ("eval", "--model", folder, *text)):
            assert_bad_input(*call(capsys, *args), folder / "config.json", *words)
        shutil.rmtree(folder)
    folder = variant(dense, tmp_path, "c", config={"num_attention_heads": 3})  # 64 is not a multiple of 3
    assert_bad_input(*call(capsys, "quantize", folder, tmp_path / "out"), folder / "config.json")
    sharded = variant(dense, tmp_path, "sharded")
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert_bad_input(*call(capsys, "quantize", sharded, tmp_path / "out"), index,
                     "model-00002-of-00002.safetensors")
    index.write_text('{"weight_map": 3}')
    assert_bad_input(*call(capsys, "quantize", sharded, tmp_path / "out"), index, "weight_map")
    broken = variant(dense, tmp_path, "tok")
    (broken / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    assert_bad_input(*call(capsys, "eval", "--model", broken, *text), broken, "cannot read the tokenizer")
    assert_bad_input(*call(capsys, "eval", "--model", dense / "dense", *text, "--json", tmp_path / "none" / "r.json"),
                     "--json", "does not exist")


# ----------------------------------------------------------------------------- property: weight files
@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "good.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.tensor([1, 2, 3], dtype=torch.int8)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def header_bytes(header):
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body


@st.composite
def damaged(draw, good):
    """The bytes of a good file, cut, overwritten in places, extended with junk, or replaced by random bytes."""
    how = draw(st.sampled_from(["truncate", "overwrite", "junk", "random"]))
    if how == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if how == "overwrite":
        raw = bytearray(good)
        for _ in range(draw(st.integers(1, 6))):
            # mostly the header (where the parser is), sometimes anywhere
            at = draw(st.integers(0, min(len(raw), 200) - 1) | st.integers(0, len(raw) - 1))
            raw[at] = draw(st.integers(0, 255))
        return bytes(raw)
    if how == "junk":
        return good[:draw(st.integers(0, len(good)))] + draw(st.binary(max_size=64))
    return draw(st.binary(max_size=300))


safetensors_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "U64", "BOOL", "F4"]) | json_values,
     "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | json_values})


@given(st.data())
def test_safetensors_readers_fail_only_with_errors_naming_the_file(tmp_path_factory, good_safetensors, data_):
    """Damaged safetensors bytes, or a header with wrong types and sizes: read, or ValueError/OSError naming it."""
    if data_.draw(st.booleans()):
        raw = data_.draw(damaged(good_safetensors))
    else:  # a well-formed header whose entries may lie
        names = st.sampled_from(["a", "b", "__metadata__"])
        header = data_.draw(st.dictionaries(names, safetensors_entries | json_values, max_size=2))
        raw = header_bytes(header) + data_.draw(st.binary(max_size=64))
    path = fresh_path(tmp_path_factory, "damaged.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        index = weights.safetensors_index([path])
        tensors = weights.read_safetensors(path)
    except (ValueError, OSError) as exc:  # what the CLI reports; a TypeError would be shown as a bug
        assert path in str(exc), exc
    else:
        assert set(index) == set(tensors)
        assert all(tuple(tensors[k].shape) == index[k][0] for k in tensors)


@given(st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()) | st.sampled_from(
    [b'{"weight_map": {"a": 1}}', b'{"weight_map": {"a": "missing.safetensors"}}', b"\xff\xfe{}", b"[" * 5000]))
def test_config_and_index_readers_fail_only_with_errors_naming_the_file(tmp_path_factory, raw):
    folder = tmp_path_factory.getbasetemp() / "jsonfiles"
    folder.mkdir(exist_ok=True)
    for name, read in (("config.json", checkpoint.read_config),
                       ("model.safetensors.index.json", checkpoint.safetensors_files)):
        (folder / name).write_bytes(raw)
        try:
            read(str(folder))
        except (ValueError, OSError) as exc:  # what the CLI reports; a TypeError would be shown as a bug
            assert os.path.join(str(folder), name) in str(exc), exc
        (folder / name).unlink()


def tiny_gguf(path):
    """A one-layer Llama GGUF file (float32 tensors, the metadata pyqlora reads)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("llama.vocab_size", 16), ("llama.embedding_length", 8), ("llama.feed_forward_length", 16),
                       ("llama.block_count", 1), ("llama.attention.head_count", 2),
                       ("llama.attention.head_count_kv", 1), ("llama.context_length", 32),
                       ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2)]:
        w.add_uint32(key, value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (16, 8)), ("output_norm.weight", (8,)),
                        ("blk.0.attn_norm.weight", (8,)), ("blk.0.ffn_norm.weight", (8,)),
                        ("blk.0.attn_q.weight", (8, 8)), ("blk.0.attn_k.weight", (4, 8)),
                        ("blk.0.attn_v.weight", (4, 8)), ("blk.0.attn_output.weight", (8, 8)),
                        ("blk.0.ffn_gate.weight", (16, 8)), ("blk.0.ffn_up.weight", (16, 8)),
                        ("blk.0.ffn_down.weight", (8, 16))]:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf")


def test_tiny_gguf_reads(good_gguf, tmp_path):
    from pyqlora.app.models import gguf_weights

    (tmp_path / "m.gguf").write_bytes(good_gguf)
    w = gguf_weights(str(tmp_path / "m.gguf"))
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (8, 16) and len(w) == 11


def test_gguf_with_an_endless_array_is_refused_before_gguf_reads_it(tmp_path, capsys, monkeypatch):
    """A damaged count (an array of 2**40 numbers) made gguf's reader loop, appending empty reads past the end
    of the file, until the machine ran out of memory (found by the property test below)."""
    from pyqlora.app.models import gguf_weights

    monkeypatch.setenv("PYQLORA_CACHE", str(tmp_path / "cache"))

    path = tmp_path / "endless.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x"
                     + struct.pack("<IIQ", 9, 4, 2**40) + b"\0" * 16)
    with pytest.raises(ValueError, match="runs past the end of the file") as info:
        gguf_weights(str(path))
    assert str(path) in str(info.value)
    assert_bad_input(*call(capsys, "quantize", path, tmp_path / "out"), path, "not a readable GGUF file")


@given(st.data())
def test_gguf_reader_fails_only_with_errors_naming_the_file(tmp_path_factory, good_gguf, data_):
    from pyqlora.app.models import gguf_weights

    raw = data_.draw(damaged(good_gguf))
    path = fresh_path(tmp_path_factory, "damaged.gguf")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        w = gguf_weights(path)
        for k in w:
            w[k]
    except (ValueError, OSError) as exc:  # what the CLI reports; a TypeError would be shown as a bug
        assert path in str(exc), exc
