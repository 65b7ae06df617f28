"""The PNG of a bench_kernels.py run: Gparam/s per library against the copy-bandwidth
bound of each operation."""
import math

from .operations import OPS, bytes_moved, itemsize
from .report import fmt_shape


def plot(results, copy_bw, path, title):
    """Grouped bars, one panel per size: Gparam/s of each library for each operation and
    dtype on a log scale; a dashed segment marks the copy-bandwidth bound of the group
    (copy GB/s / bytes moved per parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in results}, key=math.prod)
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    libs = list(dict.fromkeys(r.library for r in results))
    groups = [(op, dt) for op in OPS for dt in dtypes]
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(libs)
    fig, axes = plt.subplots(len(shapes), 1, figsize=(max(8, 1.4 * len(groups)), 4.2 * len(shapes)),
                             squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        by_key = {(r.op.key, r.dtype, r.library): r for r in results if r.shape == shape}
        values = [r.gparam_s() for r in by_key.values() if r.times]
        floor = min(values, default=1e-3) / 4
        n = math.prod(shape)
        for g, (op, dt) in enumerate(groups):
            bound = copy_bw * n / bytes_moved(op, n, itemsize(dt))
            ax.hlines(bound, g - 0.45, g + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="copy-bandwidth bound" if g == 0 else None)
            for i, lib in enumerate(libs):
                r = by_key.get((op.key, dt, lib))
                xpos = g - 0.4 + width * (i + 0.5)
                if r is not None and r.times:
                    ax.bar(xpos, r.gparam_s(), width, color=colors[i], label=lib if g == 0 else None)
                else:
                    text = "n/a" if r is None else r.status.split(":")[0].split(" (")[0]
                    ax.bar(xpos, 0, width, color=colors[i], label=lib if g == 0 else None)
                    ax.text(xpos, floor * 1.1, text, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op.label}\n{dt}" for op, dt in groups], fontsize=8)
        ax.set_ylabel("Gparam/s (log scale, higher is better)")
        ax.set_title(f"{fmt_shape(shape)} matrix", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(libs) + 1, fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
