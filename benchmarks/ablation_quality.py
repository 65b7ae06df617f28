"""Ablation for docs/quality.md §2: where does QLoRA's gap to 16-bit LoRA come from?

Writes a dense Hugging Face folder whose linear weights are the default model's
weights after an NF4 + DQ round trip (quantize, then dequantize), exactly the values
that pyqlora's ``Linear4bit`` multiplies by in the QLoRA run (the model is cast to
bfloat16 before quantizing, as ``pyqlora finetune`` does). Training 16-bit LoRA
(``--base bf16``) on that folder separates the two causes of the gap:

- if it matches QLoRA's held-out loss, the 4-bit training itself (dequantize in
  the forward and backward pass, adapters in float32) costs nothing, and the whole
  gap is the information the base weights lost to 4-bit rounding;
- if it matches the 16-bit run on the original weights, the 4-bit path loses
  something in training.

Usage::

    python benchmarks/ablation_quality.py --out /tmp/nf4-rounded   # writes the folder
    pyqlora finetune --threads 1 --no-progress --base bf16 --model /tmp/nf4-rounded --output ft_bf16_on_nf4

The folder holds model weights: keep it out of the repository.
"""

import argparse
import os
import sys

import torch

import pyqlora as pq
from pyqlora.app.checkpoint import load_model
from pyqlora.app.evaluate import fake_quantize_linears


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (outside the repository)")
    p.add_argument("--model", default=None, help="model argument as for `pyqlora finetune` (default SmolLM2)")
    p.add_argument("--codebook", default="nf4", choices=pq.CODEBOOKS_4BIT)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    args = p.parse_args(argv)
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    if os.path.commonpath([repo, os.path.abspath(args.out)]) == repo:
        p.error("--out must be outside the repository (it holds model weights)")
    model, tok, info = load_model(args.model, dtype=torch.float32)
    model.to(torch.bfloat16)  # `pyqlora finetune` quantizes the bfloat16 weights
    fake_quantize_linears(model, args.codebook, args.blocksize, not args.no_double_quant)
    n = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # all but the output head
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{n} linear weights of {info['source']} replaced by their {args.codebook.upper()}"
          f"{'' if args.no_double_quant else ' + DQ'} (blocksize {args.blocksize}) round trip; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
