"""Reports of the application: the summary printed after a run, the loss curve, versions."""
import importlib.metadata
import os
import sys

import numpy as np

__all__ = ["mib", "plot_losses", "print_report", "versions", "warn_once"]


def mib(n):
    """`n` bytes in MiB, for reports."""
    return f"{n / 2**20:,.1f} MiB"


def versions():
    """Versions of pyqlora and the libraries a run depends on (those installed)."""
    md = importlib.metadata
    out = {}
    for name in ("pyqlora", "torch", "transformers", "peft", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


_warned = set()


def warn_once(key, message, warn=None):
    """Print `message` (through `warn`, default stderr) the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def plot_losses(path, losses, before, after, title, warn=None):
    """Write the training-loss curve with the held-out loss before and after as a PNG; True if written.

    The plot needs matplotlib (in the ``finetune`` extra). Without it the PNG is skipped with a
    warning (once per process, through `warn`, default stderr) and False is returned: a missing
    plotting package never fails a run whose training is done.
    """
    try:
        import matplotlib
    except ImportError as exc:
        warn_once("matplotlib", f"pyqlora: warning: matplotlib cannot be imported ({exc}); skipped the plot "
                  f"{os.path.basename(path)} (pip install matplotlib, or pyqlora[finetune])", warn)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="training loss (per step)")
    if len(losses) >= 5:
        k = max(2, len(losses) // 10)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"training loss ({k}-step mean)")
    ax.axhline(before, color="gray", ls="--", label=f"held-out before: {before:.3f}")
    ax.axhline(after, color="green", ls="--", label=f"held-out after: {after:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per label token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_report(r, say):
    """Print the human-readable summary of a ``report.json`` dict through `say`."""
    say("")
    say(f"held-out loss ({r['data']['heldout_examples']} examples, {r['data']['heldout_label_tokens']:,} label "
        f"tokens): {r['heldout_loss']['before']:.4f} -> {r['heldout_loss']['after']:.4f}")
    if r["perplexity"]:
        p = r["perplexity"]
        original = f"{p['original']:.2f}" if "original" in p else "not computed (streamed 4-bit loading)"
        say(f"perplexity on {r['perplexity_text']} ({r['perplexity_tokens']:,} tokens): original "
            f"{original}, base for training {p['before']:.2f}, after fine-tuning {p['after']:.2f}")
    if r["sample"]["before"] or r["sample"]["after"]:
        say(f"sample ({r['sample']['id']}, greedy):")
        for k in ("before", "after"):
            text = r["sample"][k].rstrip()
            say(f"  {k}:\n" + "\n".join("    | " + ln for ln in text.splitlines()))
    m, t = r["memory"], r["train"]
    rows = [("base weights, fp32", m["base_weights_bytes"]["fp32"]),
            ("base weights, bf16", m["base_weights_bytes"]["bf16"]),
            ("base weights, NF4 + DQ linear layers (rest bf16)", m["base_weights_bytes"]["nf4_dq"]),
            (f"base weights in this run ({r['base']})", m["this_run_base_bytes"]),
            (f"adapters ({m['adapter_params']:,} parameters)", m["adapter_bytes"]),
            (f"optimizer state ({m['optimizer']})", m["optimizer_state_bytes"]),
            ("resident memory before training", m["rss_before_training_bytes"]),
            ("peak resident memory while training", m["peak_rss_training_bytes"]),
            ("peak resident memory of the process (incl. loading)", m["peak_rss_process_bytes"])]
    say("memory:")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        say(f"  {k:<{width}}  {mib(v):>12}")
    for rank in m.get("per_rank") or ():
        held = rank["parameter_bytes"]["total"] + rank["optimizer_state_bytes"]
        peaks = [rank["peak_rss_before_training"], rank["peak_rss_training"]]
        say(f"  rank {rank['rank']} ({r['distributed']['kind']}): parameters + buffers + optimizer state held "
            f"{mib(held)}; peak resident before training {mib(peaks[0] or 0)}, during training "
            f"{mib(peaks[1] or 0) if peaks[1] is not None else 'n/a'}")
    s = r["seconds"]
    say(f"time: {s['total']:.0f} s in all ({s['cpu_total']:.0f} CPU-seconds); training {s['train']:.0f} s "
        f"({t['seconds_per_step']:.2f} s/step, {t['cpu_seconds_per_step']:.2f} CPU-s/step, "
        f"{t['tokens_per_second']:.0f} tokens/s, {r['torch_threads']} threads), evaluation {s['eval']:.0f} s, "
        f"loading {s['load']:.0f} s")
    phases = s.get("phases") or {}
    evals = [(k[len("eval_"):].replace("_", " "), v["wall"]) for k, v in phases.items() if k.startswith("eval_")]
    if evals:
        say("  evaluation: " + ", ".join(f"{k} {v:.0f} s" for k, v in evals)
            + (" (before: in the first session of this resumed run)" if r["train"].get("resumed_from") else ""))
    out = r["config"]["output"]
    files = r.get("outputs") or ["adapter_config.json", "adapter_model.safetensors", "report.json", "loss_curve.png"]
    say(f"wrote {out}/{', '.join(files)}")
