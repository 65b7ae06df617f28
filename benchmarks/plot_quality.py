"""Plot docs/quality.png from the outputs of the runs listed in docs/quality.md.

    python benchmarks/plot_quality.py --eval eval_*.json --runs ft_bf16 ft_fp4 ft_nf4dq --out docs/quality.png

Left: Botchan perplexity per 4-bit data type (`pyqlora eval --json` files).
Right: training loss per step of each `pyqlora finetune` output folder (report.json),
with its held-out loss after training as a dashed line.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", nargs="+", required=True, help="JSON files written by `pyqlora eval --json`")
    ap.add_argument("--runs", nargs="+", required=True, help="output folders of `pyqlora finetune`")
    ap.add_argument("--out", default="docs/quality.png")
    args = ap.parse_args()

    evals = []
    for name in args.eval:
        with open(name) as f:
            evals.append(json.load(f))
    evals.sort(key=lambda r: -r["perplexity"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["weights"].replace(", blocksize 64", "") for r in evals]
    colors = ["gray" if n == "unquantized" else ("tab:green" if n.startswith("NF4") else "tab:orange")
              for n in names]
    a.barh(names, [r["perplexity"] for r in evals], color=colors)
    for i, r in enumerate(evals):
        a.text(r["perplexity"] + 0.3, i, f"{r['perplexity']:.2f}", va="center", fontsize=8)
    a.set_xlabel("Botchan perplexity (lower is better)")
    a.set_title("SmolLM2-135M, all linear layers 4-bit, blocksize 64", fontsize=10)
    a.set_xlim(0, max(r["perplexity"] for r in evals) * 1.15)

    for folder in args.runs:
        with open(os.path.join(folder, "report.json")) as f:
            rep = json.load(f)
        losses = np.array(rep["train"]["losses"])
        k = 5
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        line, = b.plot(np.arange(k, len(losses) + 1), smooth, lw=2, label=f"{rep['base']} (train, {k}-step mean)")
        b.axhline(rep["heldout_loss"]["after"], color=line.get_color(), ls="--", lw=1,
                  label=f"held-out after: {rep['heldout_loss']['after']:.4f}")
    b.set_xlabel("step")
    b.set_ylabel("loss per response token")
    b.set_title("Same fine-tune (HumanEval, 30 steps, seed 0)", fontsize=10)
    b.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
