"""Perplexity and generation for the command line (``pyqlora eval``, ``pyqlora finetune``).

Perplexity method (the one ``docs/quality.md`` and the tests use; it reproduces
the reference value 36.90 of SmolLM2-135M-Instruct in float32 on Botchan):
start one third of the way into the text (in characters), tokenize from there,
cut the tokens into non-overlapping windows of 512, score the first 8 windows
(4,096 tokens) as independent sequences, and report ``exp(mean of the window
losses)``. Starting inside the text keeps title pages and licenses out.

Needs torch and a Hugging Face causal language model with its tokenizer.
"""
import math

import numpy as np
import torch

import pyqlora as pq

from .._glue.modules import output_head
from .._glue.tensors import as_numpy

__all__ = ["chat_prompt_ids", "fake_quantize_linears", "generate", "perplexity"]


def perplexity(model, tokenizer, text, window=512, windows=8, start=1 / 3, dtype=None):
    """Perplexity of `model` on `text` by the method in this module's docstring.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer
    text : str
    window : int
        Tokens per window (each window is scored on its own: ``window - 1`` predictions).
    windows : int
        Number of windows; fewer are used if the text is too short (at least one is needed).
    start : float
        Where to begin, as a fraction of the text's characters.
    dtype : torch.dtype, optional
        Compute under CPU autocast in this dtype (e.g. ``torch.bfloat16``).

    Returns
    -------
    dict
        ``perplexity``, ``mean_loss``, ``window_losses``, ``tokens`` (scored windows x window).
    """
    if window < 2 or windows < 1:
        raise ValueError(f"window must be >= 2 and windows >= 1, got {window}, {windows}")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be in [0, 1), got {start}")
    ids = tokenizer(text[int(len(text) * start):], return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(windows, len(ids) // window)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens after its first {start:.0%}; perplexity needs at least "
                         f"one window of {window}")
    losses = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for i in range(n):
                w = ids[i * window:(i + 1) * window][None]
                logits = model(input_ids=w).logits.float()
                losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:]).item())
    finally:
        model.train(was_training)
    mean = float(np.mean(losses))
    return {"perplexity": math.exp(mean), "mean_loss": mean, "window_losses": losses, "tokens": n * window}


def fake_quantize_linears(model, codebook="nf4", blocksize=64, double_quant=True):
    """Replace every ``nn.Linear`` weight but the output head's by its 4-bit round trip, in place.

    ``W <- dequantize(quantize(W))`` with pyqlora's codecs: the model computes
    exactly what a model of :class:`pyqlora.nn.Linear4bit` layers computes (which
    dequantizes and multiplies), at dense speed, for any codebook (INT4 included,
    which has no checkpoint format). Returns the number of parameters quantized
    and their bytes in the 4-bit format. A NaN or Inf weight raises
    :class:`pyqlora.NonFiniteError` naming the tensor (in its message and as its ``tensor`` attribute).
    """
    head = output_head(model)
    count = nbytes = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        w = module.weight.data
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"cannot quantize module {name!r}: weight dtype {w.dtype}")
        try:
            q = pq.quantize(as_numpy(w.contiguous()), codebook=codebook, blocksize=blocksize,
                            double_quant=double_quant)
        except pq.NonFiniteError as exc:  # name the weight (also as .tensor): the caller knows the file
            err = pq.NonFiniteError(f"tensor '{name}.weight' (shape {tuple(w.shape)}) holds {exc.value} at index "
                                    f"{exc.index}; a weight with NaN or Inf cannot be quantized",
                                    index=exc.index, value=exc.value)
            err.tensor = f"{name}.weight"
            raise err from exc
        back = torch.empty(w.shape, dtype=w.dtype)
        pq.dequantize(q, out=as_numpy(back))
        w.copy_(back)
        count += w.numel()
        nbytes += q.nbytes
    if not count:
        raise ValueError("the model has no nn.Linear layer to quantize (besides the output head)")
    return count, nbytes


def chat_prompt_ids(tokenizer, prompt):
    """Token ids of `prompt` as a user turn followed by the assistant's header (chat template),
    or the bare prompt if the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def generate(model, tokenizer, prompt, max_new_tokens=64, chat=True, dtype=None):
    """Greedy continuation of `prompt` (as a chat turn when `chat`), decoded without special tokens."""
    ids = chat_prompt_ids(tokenizer, prompt) if chat else tokenizer(prompt, add_special_tokens=False).input_ids
    x = torch.tensor([ids])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
