"""Reading users' files with errors that name them (internal): text, JSON, safetensors.

Shared by :func:`pyqlora.lora.load_4bit` and the application (``pyqlora.app``, which
re-exports these names from its ``data`` and ``weights`` modules). Every reader turns
what a damaged or foreign file makes its library raise (safetensors' ``SafetensorError``,
...) into ValueError, and a file that cannot be read into OSError, with the file's name
in the message. Torch is imported only by the safetensors readers, when they run.
"""
import codecs
import gzip
import json
import os
import re
import zlib

__all__ = ["check_layer_count", "config_errors", "decode_utf8", "error_text", "os_error", "read_bytes", "read_config",
           "read_json", "read_safetensors", "read_text", "safetensors_index", "safetensors_tensor"]


def os_error(exc, message):
    """`exc`'s OSError subclass (PermissionError, IsADirectoryError, ...) with `message`, for re-raising."""
    try:
        return type(exc)(message)
    except TypeError:  # a subclass with another signature
        return OSError(message)


def error_text(exc, limit=300, kind=True):
    """A library's exception as one line for an error message: ``Type: first line; second line ...``, cut at
    `limit` characters (``--debug`` shows the whole exception)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if kind else text


def read_bytes(path, what="file", gzipped=False):
    """The bytes of a user's file (decompressed when `gzipped`); errors are OSError or ValueError naming the file.

    `what` names the file in a missing-file message (``--data`` -> "--data file not found: PATH").
    """
    path = os.fspath(path)
    try:
        if gzipped:
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what} file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"{path} is a folder; {what} takes a file") from exc
    except gzip.BadGzipFile as exc:  # an OSError: the bytes are not gzip, or fail its CRC/length check
        raise ValueError(f"{path}: not valid gzip data ({error_text(exc, kind=False)}); a file named .gz must be "
                         "gzip-compressed (name it without .gz if it is not)") from exc
    except (EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: the gzip data is truncated or corrupt ({error_text(exc, kind=False)})") from exc
    except OSError as exc:
        raise os_error(exc, f"{path}: cannot read the file: {exc.strerror or exc}") from exc


def decode_utf8(raw, path, hint="", gzipped=False, drop_bom=False):
    r"""`raw` decoded as UTF-8; ValueError naming the file, the line and the byte offset of the first byte that
    is not UTF-8. Line numbers count ``\n``, ``\r\n`` and ``\r`` endings, as Python's text files do.

    A leading byte-order mark is kept, as ``open(path, encoding="utf-8")`` keeps it (perplexity windows are
    placed by characters), unless `drop_bom`.
    """
    skip = len(codecs.BOM_UTF8) if drop_bom and raw[:3] == codecs.BOM_UTF8 else 0
    try:
        return str(memoryview(raw)[skip:], "utf-8")
    except UnicodeDecodeError as exc:
        pos = skip + exc.start
        head = raw[:pos]
        line = head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1
        where = "of the decompressed data" if gzipped else "of the file"
        extra = ""
        if raw[:2] == b"\x1f\x8b" and not gzipped:
            extra = "; the file is gzip-compressed (decompress it, or name a JSON Lines file .jsonl.gz)"
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[pos]:02x} at byte offset {pos} {where})"
                         f"{extra}{'; ' + hint if hint else ''}") from exc


def read_text(path, what="file", hint=""):
    """The UTF-8 text of a user's file (universal newlines, as ``open(path, encoding="utf-8").read()``)."""
    path = os.fspath(path)
    text = decode_utf8(read_bytes(path, what), path, hint)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json(path, what):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit integer, nesting too deep
        raise ValueError(f"{path} is not usable JSON ({exc})") from None


def read_config(folder):
    """The parsed config.json of a Hugging Face folder: ValueError if it is not a JSON object (UTF-8)."""
    path = os.path.join(folder, "config.json")
    cfg = read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")  # noqa: TRY004 (bad file content)
    if not isinstance(cfg.get("quantization_config") or {}, dict):
        raise ValueError(f"{path}: quantization_config must be a JSON object, got "  # noqa: TRY004 (bad file content)
                         f"{type(cfg['quantization_config']).__name__}")
    return cfg


def config_errors():
    """The exceptions transformers raises for configuration values it refuses, or a model they cannot build.

    For ``except`` clauses around building a configuration or a model from a user's file
    (configurations validate their fields with huggingface_hub's strict dataclasses).
    """
    errors = (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: transformers raises ValueError
        return errors
    return (*errors, StrictDataclassError)


def check_layer_count(count, names, config_name, key="num_hidden_layers", where="the weights",
                      pattern=r"(?:^|\.)layers\.(\d+)\."):
    """Raise ValueError unless `count` layers (the configuration's `key`) are the layers the tensor `names` hold.

    Checked before a model is built from the configuration: a damaged or wrong layer count (a
    billion layers) would otherwise take forever to build, even on the meta device. Names without
    a layer index (another architecture's) are not checked.
    """
    found = {int(m.group(1)) for n in names if (m := re.search(pattern, n))}
    if not found or isinstance(count, bool) or not isinstance(count, int):
        return
    if count != max(found) + 1:
        raise ValueError(f"{config_name}: {key}={count}, but {where} hold {max(found) + 1} layers (0 to "
                         f"{max(found)}); the configuration and the weights disagree")


def _reading(path, call):
    """call(), with safetensors' errors raised as ValueError / OSError naming `path`."""
    from safetensors import SafetensorError

    try:
        return call()
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({error_text(exc, kind=False)})") from exc
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"weights file not found: {path}") from exc
    except OSError as exc:
        raise os_error(exc, f"{path}: cannot read the file: {exc.strerror or exc}") from exc


def _open(path):
    from safetensors import safe_open

    return _reading(path, lambda: safe_open(path, framework="pt"))


def safetensors_index(files):
    """``{name: (shape, dtype, file)}`` of the tensors in safetensors `files`, from their headers (no data read).

    ValueError names the file for a file that is not safetensors (empty, truncated, a bad header) and for a
    tensor name held by two files.
    """
    index = {}
    for path in files:
        with _open(path) as f:
            for key in _reading(path, f.keys):
                if key in index:
                    raise ValueError(f"{path}: tensor {key!r} is also in {index[key][2]}")
                meta = _reading(path, lambda k=key: f.get_slice(k))
                index[key] = (tuple(_reading(path, meta.get_shape)), _reading(path, meta.get_dtype), path)
    return index


def safetensors_tensor(path, key):
    """One tensor of a safetensors file (errors name the file and the tensor)."""
    with _open(path) as f:
        try:
            return _reading(path, lambda: f.get_tensor(key))
        except (TypeError, RuntimeError) as exc:  # a dtype torch has no type for
            raise ValueError(f"{path}: cannot read tensor {key!r} ({error_text(exc)})") from exc


def read_safetensors(path):
    """All tensors of a safetensors file as a dict (errors name the file)."""
    with _open(path) as f:
        return {key: safetensors_tensor(path, key) for key in _reading(path, f.keys)}
