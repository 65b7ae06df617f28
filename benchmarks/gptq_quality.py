"""Perplexity of calibrated 4-bit rounding (issue 22) on SmolLM2-135M, docs/quality.md section 4.

Calibrates on Botchan's tokens *outside* the evaluation windows and evaluates as
``pyqlora eval`` does (8 windows of 512 tokens from one third into the text):

- calibration tokens: the text before the one-third mark, then the text after
  the evaluation windows plus a 512-token gap; the first ``--tokens`` of them, in
  sequences of 512 (batches of 4 sequences);
- each configuration (codebook, blocksize) is quantized twice: round to nearest
  and calibrated (``prepare_model(..., calibration=...)``, sequential, damp 1 %),
  from the same float32 weights; the perplexity uses the model whose linear weights
  are the 4-bit round trip (what a Linear4bit model computes).

Usage::

    python benchmarks/gptq_quality.py --configs nf4:64 nf4:32 nf4:128 fp4:64 int4:64 --tokens 16384 --json out.json
"""
import argparse
import json
import resource
import sys
import time

import torch

import pyqlora as pq
from pyqlora.app.checkpoint import load_model
from pyqlora.app.data import botchan_text
from pyqlora.app.evaluate import perplexity
from pyqlora.lora import LoraConfig, lora_layers, prepare_model

WINDOW, WINDOWS, START = 512, 8, 1 / 3


def calibration_ids(tok, text, tokens):
    """Token ids of Botchan outside the evaluation windows (and a 512-token gap after them)."""
    cut = int(len(text) * START)
    before = tok(text[:cut], add_special_tokens=False).input_ids
    after = tok(text[cut:], add_special_tokens=False).input_ids[WINDOW * WINDOWS + WINDOW:]
    ids = (before + after)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"only {len(ids)} calibration tokens outside the evaluation windows")
    return torch.tensor(ids[:len(ids) // WINDOW * WINDOW]).reshape(-1, WINDOW)


def fake_from_prepared(dense, prepared):
    """Write the dequantized base weights of `prepared` into the dense copy `dense`."""
    for name, layer in lora_layers(prepared):
        w = dense.get_submodule(name).weight
        w.data.copy_(torch.from_numpy(pq.dequantize(layer.base_layer.quantized)).to(w.dtype))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["nf4:64"], help="CODEBOOK:BLOCKSIZE")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--order", default="natural", choices=["natural", "act"])
    p.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest rows")
    p.add_argument("--no-base", action="store_true", help="skip the unquantized row")
    p.add_argument("--json")
    args = p.parse_args(argv)
    text = botchan_text()
    model, tok, _ = load_model(None, dtype=torch.float32)
    ids = calibration_ids(tok, text, args.tokens)
    batches = list(ids.split(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    base = {"perplexity": 36.89892655856896}  # the unquantized model's (docs/quality.md, section 1)
    if not args.no_base:
        base = perplexity(model, tok, text, WINDOW, WINDOWS, START)
        record({"config": "unquantized", "perplexity": base["perplexity"], "mean_loss": base["mean_loss"]})
    for spec in args.configs:
        codebook, blocksize = spec.split(":")
        blocksize = int(blocksize)
        cfg = LoraConfig(r=4, codebook=codebook, blocksize=blocksize, double_quant=True)
        for method in (["rtn"] if not args.no_rtn else []) + ["calibrated"]:
            prepared, _, _ = load_model(None, dtype=torch.float32, tokenizer=False)
            t0 = time.perf_counter()
            report = prepare_model(prepared, cfg, calibration=batches if method == "calibrated" else None,
                                   calibration_damp=args.damp, calibration_order=args.order, progress=True)
            seconds = time.perf_counter() - t0
            model.load_state_dict(state)
            fake_from_prepared(model, prepared)
            bits = 8 * report.quantized_weight_bytes / sum(m.base_layer.quantized.size
                                                           for _, m in lora_layers(prepared))
            del prepared
            ppl = perplexity(model, tok, text, WINDOW, WINDOWS, START)
            record({"config": f"{codebook}+DQ bs{blocksize}", "method": method, "perplexity": ppl["perplexity"],
                    "increase": ppl["perplexity"] / base["perplexity"] - 1, "mean_loss": ppl["mean_loss"],
                    "bits_per_param": bits, "prepare_seconds": seconds,
                    "calibration_tokens": int(ids.numel()) if method == "calibrated" else 0,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
