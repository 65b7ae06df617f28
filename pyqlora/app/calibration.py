"""``--calibration FILE``: calibrated 4-bit rounding of a model's base (issue 22, docs/quality.md section 4).

The file is UTF-8 text; its first ``--calibration-tokens`` tokens, in sequences of
512 (batches of 4), are what :func:`pyqlora.lora.prepare_model` runs the model on
to collect each linear layer's ``X^T X``, block after block. The result is the
same format as round to nearest: only the 4-bit codes and block scales differ.
``pyqlora finetune --calibration train`` packs the tokens of its training examples
the same way (:func:`packed_batches`).
"""
import os
import sys

from .data import read_text

SEQ_LEN = 512
BATCH = 4
TRAIN = "train"  # pyqlora finetune --calibration train: the training examples


def packed_batches(ids):
    """Batches (LongTensor, BATCH x SEQ_LEN, the last one maybe shorter) of the token ids `ids` (a list), cut into
    sequences of SEQ_LEN (or one shorter sequence of them all); returns (batches, tokens used)."""
    import torch

    seq = min(SEQ_LEN, len(ids))
    usable = len(ids) // seq * seq
    rows = torch.tensor(ids[:usable], dtype=torch.long).reshape(-1, seq)
    return list(rows.split(BATCH)), usable


def training_batches(examples, tokens):
    """Calibration batches of the first `tokens` tokens of training `examples` ((input_ids, labels) pairs), their
    input ids packed end to end, in the order given."""
    ids = []
    for input_ids, _ in examples:
        ids.extend(int(t) for t in input_ids)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < 2:
        raise ValueError(f"--calibration {TRAIN}: the training examples hold {len(ids)} tokens")
    return packed_batches(ids)


def calibration_batches(tokenizer, path, tokens, option="--calibration"):
    """Batches (LongTensor, BATCH x SEQ_LEN, the last one maybe shorter) of the first `tokens` tokens of `path`."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"{option}-tokens must be a positive number of tokens, got {tokens!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} file not found: {path}")
    if tokenizer is None:
        raise ValueError(f"{option} needs the model's tokenizer; the model folder has none")
    text = read_text(path, option, hint=f"{option} takes a UTF-8 text file")
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    if len(ids) < 2:
        raise ValueError(f"{option} {path} holds {len(ids)} tokens; calibration needs text (thousands of tokens)")
    return packed_batches(ids)


def calibrate(model, tokenizer, path, tokens, codebook, blocksize, double_quant, progress=True, damp=0.1,
              order="act"):
    """Quantize `model`'s linear layers (not the head) with calibration, in place; returns (report, info).

    info: tokens used, seconds, peak resident memory (bytes) of the calibration, and the layers that were
    rounded to nearest (outside the repeated blocks).
    """
    from ..lora import LoraConfig, prepare_model

    batches, used = calibration_batches(tokenizer, path, tokens)
    if progress:
        print(f"pyqlora: calibrating on {used:,} tokens of {path} ({len(batches)} batches of up to "
              f"{BATCH} x {batches[0].shape[1]})", file=sys.stderr, flush=True)
    report = prepare_model(model, LoraConfig(r=1, codebook=codebook, blocksize=blocksize, double_quant=double_quant),
                           calibration=batches, calibration_damp=damp, calibration_order=order, progress=progress)
    return report, dict(report.calibration, file=os.fspath(path))


def calibrated_arrays(src, path, tokens, codebook, blocksize, double_quant, progress=True):
    """({module name: QuantizedArray}, info) of the dense model `src` calibrated on the text at `path`."""
    import torch

    from ..lora import lora_layers
    from .checkpoint import load_model

    model, tok, _ = load_model(src, dtype=torch.float32)
    _, info = calibrate(model, tok, path, tokens, codebook, blocksize, double_quant, progress=progress)
    arrays = {name: layer.base_layer.quantized for name, layer in lora_layers(model)}
    return arrays, info
