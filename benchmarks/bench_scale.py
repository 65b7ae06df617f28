"""QLoRA at scale: a Llama of 1B to 65B parameters fine-tuned in 4 bits on this machine (issues 21, 23).

    python benchmarks/bench_scale.py --shape 1b|7b|13b|33b|65b|tiny [--seq 64] [--steps 2] [--model DIR]
        [--dtype fp32|auto] [--embeddings-dtype bf16|fp32] [--base-budget SIZE] [--checkpoint DIR]
        [--write-checkpoint DIR] [--sizes] [--profile] [--json FILE]

Builds a Llama of the shape on the meta device (no memory), streams its weights one tensor at a
time into NF4 + DQ layers with ``prepare_model(weights=...)`` (seeded random bfloat16 weights, or
the tensors of a sharded safetensors folder with ``--model DIR``), adds LoRA r=16 on every linear
layer (the output head excepted, as PEFT's ``all-linear``), and runs QLoRA steps: forward,
backward, ``PagedAdamW`` (``--budget-mib`` of RAM for its states) with gradient checkpointing, on
batch x seq random tokens. Reports, as JSON on stdout (progress on stderr):

- the load time and the peak resident memory (VmHWM) after loading; the peak in training,
  measured from the loaded state (the kernel's high-water mark reset after loading);
- seconds per step, and the achieved GFLOP/s counted as 6 * matmul parameters * tokens (the
  forward, the recomputed forward and the input gradient; the frozen base has no weight gradient;
  matmul parameters are the linear layers' and the output head's, embeddings excluded);
- torch's dense float32 GEMM GFLOP/s on the same products (every linear shape of one decoder layer
  plus the head, forward ``x W^T`` and backward ``g W``, tokens rows), measured in the same run before
  and after training, and the fraction of the faster of the two that the whole step reaches (a shared
  machine's speed drifts: on one Intel Xeon guest the same measurement gave 289-352 GFLOP/s in runs
  minutes apart, so one measurement on a slow phase flattered the fraction);
- with ``--profile``, where the last step's time goes (torch.profiler, self CPU seconds): the 4-bit
  products, the head, attention, the optimizer, the adapters' small products, elementwise and other
  work, and what the profiler saw no op in; and the 4-bit products' forward and backward calls. The
  profiler slows that step a little, and the best step is taken over all of them;
- with ``--model``, the disk's sequential read rate (``dd iflag=direct`` of the largest shard, which
  bypasses the page cache) and the loading rate in bytes of checkpoint per second; the page cache
  of the shards is dropped first (``posix_fadvise(DONTNEED)``) so the load reads from the disk;
- with ``--base-budget SIZE`` (``3G``, ``512M``, or ``0.5x``: half the base's 4-bit bytes), the
  frozen 4-bit base lives in a ``pyqlora.Pager`` with that RAM budget over a spill file
  (``prepare_model(pager=..., lookahead=...)``): the base's bytes resident and spilled, and per
  step the page-ins, the disk wait (time a layer waited for its own bytes) and its fraction of
  the step.

``--checkpoint DIR`` trains from a bitsandbytes NF4 + DQ checkpoint in DIR, written there first from
the seeded random weights if DIR holds none (one shard in memory at a time; quantized as
``prepare_model`` would, so both ways train the same model) and reused by later runs. It is loaded
with ``pyqlora.app.checkpoint.load_model``: with ``--base-budget`` its 4-bit bytes are paged from the
checkpoint's own files (read-only mappings, no spill file), so a 65B base of 33 GiB trains in 24
GiB of RAM; the disk's read rate is measured on its largest shard as for ``--model``.

``--write-checkpoint DIR`` writes the shape's seeded random weights as a sharded bfloat16
safetensors folder (``config.json``, ``model-0000k-of-0000n.safetensors``, the index), one shard in
memory at a time, and exits: the 13B one is 24 GiB, more than this machine's RAM, and loading it
with ``--model DIR`` proves the streaming from a file larger than memory. ``--sizes`` prints the
shape's arithmetic (parameters, bf16 and NF4 + DQ bytes, the computed memory of full, 16-bit LoRA
and QLoRA fine-tuning) without building anything: the 33b and 65b shapes are there for it and for
machines that hold them. ``--shape tiny`` (4 layers, hidden 512) is the CI's smoke run
(``tests/test_bench_scale.py``). Results: ``docs/scale.md``.
"""
import argparse
import gc
import json
import os
import re
import sys
import time
import zlib

# _bench is the folder beside this file (sys.path[0] when it runs as a script)
from _bench.machine import disk_read_rate, drop_cache

# name: (hidden, intermediate, layers, heads, kv heads, vocab); 1b is TinyLlama-1.1B's shape, 7b and 13b Llama 2's
SHAPES = {
    "tiny": (512, 1376, 4, 8, 8, 2048),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "33b": (6656, 17920, 60, 52, 52, 32000),  # LLaMA-1 33B and 65B (issue 23): the QLoRA paper's largest
    "65b": (8192, 22016, 80, 64, 64, 32000),
}
SHARD_BYTES = 2 << 30  # per safetensors shard written: one shard is held in memory while it is written


def nf4_bytes(out_features, in_features, blocksize=64, nested_blocksize=256):
    """Bytes of one out x in weight in NF4 + DQ as ``QuantizedArray.nbytes`` counts them: packed 4-bit codes,
    a uint8 scale per block of `blocksize` weights, a float32 scale per `nested_blocksize` blocks and the
    float32 offset of the nested scales."""
    n = out_features * in_features
    blocks = -(-n // blocksize)
    return -(-n // 2) + blocks + 4 * -(-blocks // nested_blocksize) + 4


def shape_sizes(shape, layers=None, r=16):
    """The arithmetic of a shape, from its dimensions alone (no model built): parameter counts and bytes.

    Returns a dict: ``params`` (all), ``linear_params`` (the decoder's linear layers, quantized),
    ``trainable_params`` (LoRA r on each of them), ``bf16_weight_bytes`` (every parameter in bfloat16),
    ``nf4_bytes`` (the linear layers in NF4 + DQ), ``rest_fp32_bytes`` (embeddings, head and norms in float32,
    as this benchmark keeps them) and the weights-and-optimizer memory of three ways to fine-tune, activations
    excluded: ``full_bf16_bytes`` (16 bytes a parameter: bfloat16 weights and gradients, float32 master
    weights and AdamW's two moments), ``lora16_bytes`` (bfloat16 base + float32 adapters with gradients and
    moments, 16 bytes a trainable parameter) and ``qlora_bytes`` (NF4 + DQ linears + float32 rest + adapters)."""
    hidden, inter, n_layers, heads, kv, vocab = SHAPES[shape]
    n_layers = layers or n_layers
    kv_dim = kv * (hidden // heads)
    linears = [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),  # q k v o: (out, in)
               (inter, hidden), (inter, hidden), (hidden, inter)]                     # gate up down
    linear = n_layers * sum(o * i for o, i in linears)
    rest = 2 * vocab * hidden + (2 * n_layers + 1) * hidden
    trainable = n_layers * sum(r * (o + i) for o, i in linears)
    nf4 = n_layers * sum(nf4_bytes(o, i) for o, i in linears)
    out = {"shape": shape, "layers": n_layers, "params": linear + rest, "linear_params": linear,
           "trainable_params": trainable, "bf16_weight_bytes": 2 * (linear + rest), "nf4_bytes": nf4,
           "rest_fp32_bytes": 4 * rest}
    adapters = 16 * trainable
    out["full_bf16_bytes"] = 16 * (linear + rest)
    out["lora16_bytes"] = 2 * (linear + rest) + adapters
    out["qlora_bytes"] = nf4 + 4 * rest + adapters
    return out


def parse_size(text, base_bytes=None):
    """Bytes from ``3G``, ``512M``, ``1.5G``, ``100000`` (K/M/G/T: powers of 1024) or, with `base_bytes`,
    ``0.5x`` (that fraction of `base_bytes`)."""
    t = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]i?[bB]?|[bB]|[xX])?", t)
    if not m:
        raise ValueError(f"size {text!r}: expected a number with an optional K, M, G or T suffix (3G, 512M) "
                         f"or a fraction of the 4-bit base such as 0.5x")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "x":
        if base_bytes is None:
            raise ValueError(f"size {text!r}: a fraction (x) needs the base's size")
        n = value * base_bytes
    else:
        n = value * 1024 ** "bkmgt".index(unit[0]) if unit else value
    if n < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    return int(n)


def plot(png, reports):
    """docs/scale.png: memory by model size for full bfloat16 fine-tuning, 16-bit LoRA and QLoRA.

    Computed (``shape_sizes``: weights, gradients and optimizer states, activations excluded) for every
    shape, drawn as lines with hollow markers; measured QLoRA peak RSS in training (the JSON reports of
    this script) as filled markers, the runs with a paged base as filled squares. A second panel shows the
    measured seconds per step (the best step of each report) for the same runs, per 1000 tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2 ** 30
    shapes = ["1b", "7b", "13b", "33b", "65b"]
    sizes = [shape_sizes(s) for s in shapes]
    x = [z["params"] / 1e9 for z in sizes]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    for key, label, color in (("full_bf16_bytes", "full fine-tune, bf16 + fp32 AdamW (computed)", "tab:red"),
                              ("lora16_bytes", "16-bit LoRA r=16 (computed)", "tab:orange"),
                              ("qlora_bytes", "QLoRA NF4+DQ r=16 (computed)", "tab:blue")):
        ax.plot(x, [z[key] / gib for z in sizes], "--o", color=color, mfc="none", label=label)
    for paged, marker, label in ((False, "o", "QLoRA, measured peak RSS in training"),
                                 (True, "s", "QLoRA, base paged from disk, measured")):
        pts = sorted((r["params"] / 1e9, r["peak_rss_train"] / gib, r["seq"]) for r in reports
                     if ("base_paging" in r) == paged and r["shape"] in shapes
                     and r["layers"] == SHAPES[r["shape"]][2])  # whole models only
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="tab:blue" if not paged else "tab:green",
                    ms=8, label=label, ls="none")
            for px in sorted({p[0] for p in pts}):
                here = [p for p in pts if p[0] == px]
                ax.annotate(", ".join(f"1x{p[2]}" for p in here), (px, max(p[1] for p in here)),
                            textcoords="offset points", xytext=(-10, 8), fontsize=7)
    ax.axhline(24, color="gray", lw=1)
    ax.text(x[0], 26.5, "this machine: 24 GiB", color="gray", fontsize=8)
    def log_axes(a, ylabel, title):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xticks(x, [s.upper() for s in shapes])
        a.minorticks_off()
        a.set_xlabel("Llama shape (parameters)")
        a.set_ylabel(ylabel)
        a.set_title(title, fontsize=10)
        a.grid(True, which="major", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7.5, loc="upper left")

    log_axes(ax, "memory, GiB", "Fine-tuning memory by model size (CPU, float32 compute)")
    for paged, marker, label in ((False, "o", "QLoRA, base resident"), (True, "s", "QLoRA, base paged from disk")):
        pts = sorted((r["params"] / 1e9, min(r["step_s"]) * 1000 / r["tokens"], r["seq"]) for r in reports
                     if ("base_paging" in r) == paged and r["shape"] in shapes and r.get("step_s")
                     and r["layers"] == SHAPES[r["shape"]][2])
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="tab:blue" if not paged else "tab:green",
                      ms=8, label=label, ls="none")
            for p in pts:
                ax_t.annotate(f"1x{p[2]}", (p[0], p[1]), textcoords="offset points", xytext=(6, -3), fontsize=7)
    log_axes(ax_t, "seconds per step per 1000 tokens (measured)", "QLoRA step time (2 CPU cores, float32 compute)")
    fig.tight_layout()
    fig.savefig(png)
    return png


def table(reports):
    """The Markdown table of docs/scale.md from JSON reports of this script."""
    gib = 2 ** 30
    rows = ["| shape | tokens | bf16 weights | 4-bit base | base in RAM | peak RSS load / train | load | s/step "
            "| GFLOP/s | dense fp32 GEMM | fraction of dense | base page-ins/step, disk wait |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        paging = r.get("base_paging")
        in_ram, pages = "all", "-"
        layers = "" if r["layers"] == SHAPES[r["shape"]][2] else f", {r['layers']} layers"
        if paging:
            last = paging["per_step"][-1]
            in_ram = f"budget {paging['budget_bytes'] / gib:.2f} GiB"
            read = f" = {last['page_in_bytes'] / gib:.2f} GiB" if "page_in_bytes" in last else ""
            pages = f"{last['page_ins']}{read}, {last['wait_seconds']:.1f} s ({100 * last['wait_fraction']:.0f} %)"
        rows.append(
            f"| {r['shape']}{layers} | {r['batch']}x{r['seq']} | {r['bf16_weight_bytes'] / gib:.1f} GiB "
            f"| {r['quantized_weight_bytes'] / gib:.2f} GiB | {in_ram} "
            f"| {r['peak_rss_load'] / gib:.2f} / {r['peak_rss_train'] / gib:.2f} GiB | {r['load_s']:.0f} s "
            f"| {min(r['step_s']):.1f} | {r['gflops_step']:.1f} | {r['dense_gemm_gflops']:.1f} "
            f"| {100 * r['fraction_of_dense']:.0f} % | {pages} |")
    return "\n".join(rows)


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def llama_config(shape, layers=None):
    import transformers

    hidden, inter, n_layers, heads, kv, vocab = SHAPES[shape]
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False, torch_dtype="bfloat16")


def meta_model(config):
    import torch
    import transformers

    from pyqlora.lora import empty_weights

    with empty_weights():
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.float32)  # parameters stay on the meta device: no memory


class RandomWeights:
    """Seeded random bfloat16 weights for `names` -> shapes, one tensor generated per lookup (a lazy mapping).

    Each tensor depends only on (seed, name), so a checkpoint written from it and the mapping agree.
    Norm weights are ones, everything else N(0, 0.02) (Llama's initializer range)."""

    def __init__(self, shapes, seed=0):
        self.shapes, self.seed = shapes, seed

    def __contains__(self, key):
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, key):
        import torch

        shape = self.shapes[key]
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def param_shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def write_checkpoint(args, config, shapes):
    """The seeded random weights as a sharded bfloat16 safetensors folder; one shard in memory at a time."""
    from safetensors.torch import save_file

    from pyqlora._glue.memory import trim_heap

    weights = RandomWeights(shapes, args.seed)
    os.makedirs(args.write_checkpoint, exist_ok=True)
    groups = _shard_groups({name: 2 * _numel(shape) for name, shape in shapes.items()})
    index, total, t0 = {}, 0, time.perf_counter()
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: weights[n] for n in names}
        save_file(shard, os.path.join(args.write_checkpoint, fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        index.update(dict.fromkeys(names, fname))
        del shard
        trim_heap()
        say(f"  wrote {fname} ({total / 2**30:.1f} GiB so far, {time.perf_counter() - t0:.0f} s)")
    with open(os.path.join(args.write_checkpoint, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=1)
    config.save_pretrained(args.write_checkpoint)
    os.sync()
    return {"checkpoint": args.write_checkpoint, "bytes": total, "shards": len(groups),
            "write_s": time.perf_counter() - t0}


def _is_base_linear(name):
    """Whether `name` is a decoder layer's linear weight: what ``target_modules="all-linear"`` quantizes."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def checkpoint_config(folder):
    """config.json of a 4-bit checkpoint folder, or None when there is none."""
    name = os.path.join(folder, "config.json")
    if not os.path.exists(name):
        return None
    with open(name) as f:
        return json.load(f)


def write_4bit_checkpoint(folder, config, shapes, seed, blocksize=64):
    """The seeded random weights as a sharded bitsandbytes NF4 + DQ checkpoint (transformers' keys and
    quant-state entries; norms, embeddings and the head in bfloat16), written into a temporary folder that
    is renamed to `folder` at the end. One shard (up to SHARD_BYTES) is held in memory at a time."""
    import shutil

    import torch
    from safetensors.torch import save_file

    import pyqlora as pq
    from pyqlora._glue.memory import trim_heap
    from pyqlora._glue.tensors import as_numpy
    from pyqlora.app.checkpoint import bnb_quantization_config

    weights = RandomWeights(shapes, seed)
    tmp = folder.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups = _shard_groups({n: nf4_bytes(*shape, blocksize) if _is_base_linear(n) else 2 * _numel(shape)
                            for n, shape in shapes.items()})
    index, total, t0 = {}, 0, time.perf_counter()
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in group:
            w = weights[name]
            if _is_base_linear(name):
                q = pq.quantize(as_numpy(w), codebook="nf4", blocksize=blocksize, double_quant=True)
                del w
                for key, value in q.to_bnb_dict(name).items():
                    shard[key] = torch.from_numpy(value)
                    index[key] = fname
            else:
                shard[name] = w
                index[name] = fname
        save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
        total += os.path.getsize(os.path.join(tmp, fname))
        del shard
        trim_heap()
        say(f"  wrote {fname} ({total / 2**30:.1f} GiB so far, {time.perf_counter() - t0:.0f} s)")
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=1)
    cfg = config.to_dict()
    cfg["quantization_config"] = bnb_quantization_config("nf4", True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    os.sync()
    os.rename(tmp, folder)
    return {"checkpoint": folder, "bytes": total, "shards": len(groups), "write_s": time.perf_counter() - t0}


def _shard_groups(nbytes):
    """Tensor names (in order) grouped into shards of at most SHARD_BYTES (a bigger tensor gets its own)."""
    groups, size = [[]], 0
    for name, n in nbytes.items():
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# Where a profiled step's time goes (--profile): an event belongs to the first category whose name part
# appears in its own name or an enclosing event's (the 4-bit products run inside their autograd functions,
# the head's slices inside _HeadInComputeDtype); what is left is the adapters' small products (a matrix
# with r rows or columns) or elementwise and other work.
PROFILE_PARTS = (("4-bit products", ("_Linear4bitFunction",)), ("head", ("_HeadInComputeDtype",)),
                 ("attention", ("scaled_dot_product",)), ("optimizer", ("Optimizer.step",)))
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def step_profile(prof, r, step_s):
    """Self CPU seconds of a torch.profiler step by part (PROFILE_PARTS, "adapters", "elementwise and
    other", and the step's wall time the profiler saw no op in as "unattributed"), and the calls of the
    4-bit products' forward and backward."""
    seconds = {name: 0.0 for name, _ in PROFILE_PARTS}
    seconds.update({"adapters": 0.0, "elementwise and other": 0.0})
    calls = {"nf4_forward": 0, "nf4_backward": 0}
    for e in prof.events():
        if e.name == "_Linear4bitFunction":
            calls["nf4_forward"] += 1
        elif e.name == "_Linear4bitFunctionBackward":
            calls["nf4_backward"] += 1
        part, node = None, e
        while node is not None and part is None:
            part = next((name for name, keys in PROFILE_PARTS if any(k in node.name for k in keys)), None)
            node = node.cpu_parent
        if part is None:
            adapter = e.name in PRODUCT_OPS and any(r in shape for shape in (e.input_shapes or ()) if shape)
            part = "adapters" if adapter else "elementwise and other"
        seconds[part] += e.self_cpu_time_total / 1e6
    seconds["unattributed"] = max(0.0, step_s - sum(seconds.values()))
    return {"seconds": seconds, "calls": calls, "step_s": step_s}


def dense_gemm_rate(torch, config, tokens, repeat):
    """torch's dense float32 GEMM on the step's products, GFLOP/s: every decoder layer's linears and the
    head, forward x W^T and backward g W, each with `tokens` rows (one layer timed, counted for all);
    best of `repeat` passes."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layers = config.num_hidden_layers
    # (out, in) -> how many in the model: q o, k v, gate up, down, the head
    counts = {}
    for shape, n in (((h, h), 2), ((kv, h), 2), ((i, h), 2), ((h, i), 1)):
        counts[shape] = counts.get(shape, 0) + n * layers
    counts[(v, h)] = counts.get((v, h), 0) + 1
    gen = torch.Generator().manual_seed(1)
    seconds = flops = 0.0
    for (n, k), count in counts.items():
        w = torch.randn(n, k, generator=gen)
        x, g = torch.randn(tokens, k, generator=gen), torch.randn(tokens, n, generator=gen)
        times = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            x @ w.t()
            g @ w
            times.append(time.perf_counter() - t0)
        seconds += count * min(times[1:])
        flops += count * 4 * tokens * n * k
        del w, x, g
    return flops / seconds / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", default=None, help="a sharded safetensors folder (default: seeded random weights)")
    ap.add_argument("--dtype", choices=("fp32", "auto"), default="fp32")
    ap.add_argument("--embeddings-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="storage of the frozen embedding and head (LoraConfig.embeddings_dtype): bf16 holds the "
                         "bf16 checkpoint's values exactly in half the memory of fp32; compute stays --dtype")
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="train from the NF4 + DQ checkpoint in DIR (written there first from the seeded random "
                         "weights if DIR holds none); with --base-budget it is paged from its own files")
    ap.add_argument("--write-checkpoint", default=None, metavar="DIR")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--budget-mib", type=int, default=1024, help="PagedAdamW's RAM budget")
    ap.add_argument("--gemm-repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heap", choices=("bound", "mapped", "glibc"), default="bound",
                    help="glibc's heap: 'bound' keeps it for reuse and trims it when more than --heap-retain-mib of "
                         "it is free and resident (bound_heap(), the default); 'mapped' gives every block of 1 MiB or "
                         "more its own mapping (limit_heap_retention()); 'glibc' leaves glibc's defaults")
    ap.add_argument("--heap-retain-mib", type=int, default=1024, help="--heap bound's bound (MiB)")
    ap.add_argument("--glibc-default", action="store_true", help="the same as --heap glibc")
    ap.add_argument("--base-budget", default=None, metavar="SIZE",
                    help="page the frozen 4-bit base from disk (prepare_model(pager=...)) with this much RAM: "
                         "3G, 512M, or 0.5x (a fraction of the base's 4-bit bytes); default: resident")
    ap.add_argument("--spill-dir", default=None, help="the base pager's spill directory (default: the pager's)")
    ap.add_argument("--lookahead", type=int, default=2, help="layers prefetched ahead with --base-budget")
    ap.add_argument("--sizes", action="store_true",
                    help="print the shape's size arithmetic (parameters, bf16 and 4-bit bytes, memory of full / "
                         "16-bit LoRA / QLoRA fine-tuning) and exit without building anything")
    ap.add_argument("--plot", nargs="+", default=None, metavar=("PNG", "JSON"),
                    help="draw memory by model size into PNG from the computed sizes and the JSON reports given "
                         "(docs/scale.png), and exit")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="print docs/scale.md's Markdown table from these JSON reports, and exit")
    ap.add_argument("--profile", action="store_true",
                    help="profile the last step with torch.profiler and report its time by part (4-bit products, "
                         "head, attention, optimizer, adapters, elementwise and other)")
    ap.add_argument("--json", default=None, help="also write the JSON report to this file")
    args = ap.parse_args(argv)
    if args.table:
        reports = []
        for name in args.table:
            with open(name) as f:
                reports.append(json.load(f))
        print(table(reports))
        return reports
    if args.plot:
        reports = []
        for name in args.plot[1:]:
            with open(name) as f:
                reports.append(json.load(f))
        return plot(args.plot[0], reports)
    if args.sizes:
        out = shape_sizes(args.shape, args.layers, args.r)
        print(json.dumps(out, indent=1))
        return out
    base_budget = None
    if args.base_budget is not None:
        try:
            base_budget = parse_size(args.base_budget, shape_sizes(args.shape, args.layers, args.r)["nf4_bytes"])
        except ValueError as exc:
            ap.error(f"--base-budget: {exc}")
    if args.lookahead < 0:
        ap.error("--lookahead must be >= 0")
    if args.heap_retain_mib < 0:
        ap.error("--heap-retain-mib must be >= 0")
    if args.checkpoint and args.model:
        ap.error("--checkpoint and --model exclude each other")

    import torch

    import pyqlora as pq
    from pyqlora._glue.memory import (bound_heap, heap_bound_stats, limit_heap_retention, memory_status,
                                      reset_peak_memory, tensor_bytes, trim_heap)
    from pyqlora.lora import LoraConfig, lora_layers, prepare_model
    from pyqlora.optim import PagedAdamW

    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    heap = "glibc" if args.glibc_default else args.heap
    if heap == "bound":
        heap_limited = bound_heap(args.heap_retain_mib << 20)
    else:
        heap_limited = heap == "mapped" and limit_heap_retention()
    config = llama_config(args.shape, args.layers)
    model = meta_model(config)
    rss_start = memory_status()["rss"]  # the interpreter, torch, transformers and the model on the meta device
    shapes = param_shapes(model)
    gib = 2 ** 30
    if args.write_checkpoint:
        out = write_checkpoint(args, config, shapes)
        print(json.dumps(out, indent=1))
        return out

    report = {"shape": args.shape, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
              "intermediate": config.intermediate_size, "vocab": config.vocab_size, "batch": args.batch,
              "seq": args.seq, "tokens": args.batch * args.seq, "dtype": args.dtype,
              "embeddings_dtype": args.embeddings_dtype, "threads": args.threads,
              "r": args.r, "steps": args.steps, "heap": heap, "heap_limited": heap_limited, "isa": pq.get_isa(),
              "base_budget_bytes": base_budget,
              "rss_start": rss_start,
              "params": sum(_numel(s) for s in shapes.values()),
              "bf16_weight_bytes": 2 * sum(_numel(s) for s in shapes.values())}
    if args.checkpoint:
        found = checkpoint_config(args.checkpoint)
        if found is None:
            say(f"bench_scale: writing the NF4 + DQ checkpoint of {args.shape} (seed {args.seed}) to {args.checkpoint}")
            report["checkpoint_written"] = write_4bit_checkpoint(args.checkpoint, config, shapes, args.seed)
        else:
            want = {k: v for k, v in config.to_dict().items() if k in ("hidden_size", "intermediate_size",
                                                                         "num_hidden_layers", "vocab_size")}
            if any(found.get(k) != v for k, v in want.items()) or "quantization_config" not in found:
                raise SystemExit(f"bench_scale.py: error: {args.checkpoint} holds another model than "
                                 f"--shape {args.shape} (config.json: {found.get('hidden_size')} hidden, "
                                 f"{found.get('num_hidden_layers')} layers); give an empty or new folder")
        from pyqlora.app.checkpoint import safetensors_files

        files = safetensors_files(args.checkpoint)
    elif args.model:
        files = sorted(os.path.join(args.model, f) for f in os.listdir(args.model) if f.endswith(".safetensors"))
    if args.model or args.checkpoint:
        if not files:
            raise SystemExit(f"bench_scale.py: error: {args.model or args.checkpoint} holds no .safetensors file")
        biggest = max(files, key=os.path.getsize)
        report["disk_read_bytes_per_s"], report["disk_read_method"] = disk_read_rate(biggest)
        for f in files:
            drop_cache(f)
        report["checkpoint_bytes"] = sum(os.path.getsize(f) for f in files)
    if args.checkpoint:
        weights = None
        report["source"] = f"NF4 + DQ checkpoint {args.checkpoint} (seed {args.seed})"
    elif args.model:
        from pyqlora.app.weights import SafetensorsWeights

        weights = SafetensorsWeights(files)
        report["source"] = args.model
    else:
        weights = RandomWeights(shapes, args.seed)
        report["source"] = f"seeded random bfloat16 (seed {args.seed})"

    # -- load: every target layer quantized as its weight arrives
    say(f"bench_scale: {args.shape} ({report['params'] / 1e9:.2f} B parameters, {config.num_hidden_layers} layers), "
        f"weights: {report['source']}")
    lcfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", gradient_checkpointing=True,
                      embeddings_dtype="bfloat16" if args.embeddings_dtype == "bf16" else None)
    pager = None
    if base_budget is not None:
        pager = pq.Pager(budget_bytes=base_budget, spill_dir=args.spill_dir)
        report["lookahead"] = args.lookahead
        say(f"  the 4-bit base paged: budget {base_budget / 2**30:.2f} GiB, lookahead {args.lookahead}")
    t0 = time.perf_counter()
    if args.checkpoint:
        from pyqlora.app.checkpoint import load_model

        del model
        model, _, _ = load_model(args.checkpoint, dtype=torch.float32, tokenizer=False, pager=pager)
    torch.manual_seed(args.seed)  # the adapters' initialisation (A is random): runs repeat bit for bit
    prep = prepare_model(model, lcfg, weights=weights, pager=pager, lookahead=args.lookahead)
    report["load_s"] = time.perf_counter() - t0
    if args.model or args.checkpoint:
        report["load_bytes_per_s"] = report["checkpoint_bytes"] / report["load_s"]
        report["load_fraction_of_disk"] = report["load_bytes_per_s"] / report["disk_read_bytes_per_s"]
    del weights
    gc.collect()
    trim_heap()
    mem = memory_status()
    report["quantized_weight_bytes"] = prep.quantized_weight_bytes
    report["model_bytes"] = tensor_bytes(model)
    report["peak_rss_load"], report["rss_loaded"] = mem["peak_rss"], mem["rss"]
    say(f"loaded in {report['load_s']:.0f} s: model {report['model_bytes'] / gib:.2f} GiB, RSS "
        f"{mem['rss'] / gib:.2f} GiB, peak {mem['peak_rss'] / gib:.2f} GiB")

    # -- training
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(trainable, lr=1e-4, budget_bytes=args.budget_mib << 20)
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
    # torch's dense rate before training too (after the load's peak is recorded; its buffers are freed)
    dense_before = dense_gemm_rate(torch, config, report["tokens"], args.gemm_repeat)
    trim_heap()
    reset_peak_memory()
    step_s, losses, paged = [], [], []
    for step in range(args.steps):
        before = prep.paging.stats() if pager is not None else None
        prof = None
        if args.profile and step == args.steps - 1:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            prof.__enter__()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "auto"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        if prof is not None:
            prof.__exit__(None, None, None)
            report["step_profile"] = step_profile(prof, args.r, step_s[-1])
            del prof
            say("  profiled step, self CPU seconds by part: " + ", ".join(
                f"{name} {sec:.2f} ({100 * sec / step_s[-1]:.0f} %)"
                for name, sec in report["step_profile"]["seconds"].items()))
        losses.append(loss.item())
        del loss
        more = ""
        if pager is not None:
            after = prep.paging.stats()
            paged.append({k: after[k] - before[k] for k in ("page_ins", "page_outs", "page_in_bytes",
                                                               "page_out_bytes", "wait_seconds", "layer_calls")})
            paged[-1]["wait_fraction"] = paged[-1]["wait_seconds"] / step_s[-1]
            more = (f", base: {paged[-1]['page_ins']} page-ins ({paged[-1]['page_in_bytes'] / gib:.2f} GiB), "
                    f"disk wait {paged[-1]['wait_seconds']:.1f} s ({100 * paged[-1]['wait_fraction']:.0f} %)")
        say(f"  step {step + 1}/{args.steps}: {step_s[-1]:.1f} s, loss {losses[-1]:.3f}, "
            f"peak RSS {memory_status()['peak_rss'] / gib:.2f} GiB{more}")
    mem = memory_status()
    report["peak_rss_train"], report["rss_after_train"] = mem["peak_rss"], mem["rss"]
    report["step_s"], report["losses"] = step_s, losses
    if pager is not None:
        st = prep.paging.stats()
        report["base_paging"] = {"base_bytes": st["base_bytes"], "budget_bytes": st["budget_bytes"],
                                 "resident_bytes": st["resident_bytes"], "spilled_bytes": st["spilled_bytes"],
                                 "spill_file_bytes": st.get("spill_file_bytes"),
                                 "mapped_from_checkpoint_bytes": st.get("mapped_bytes"),
                                 "page_bytes": st["page_bytes"], "per_step": paged}
    report["optimizer_state_bytes"] = int(opt.state_bytes())
    report["heap_trims"] = heap_bound_stats()  # --heap bound: the trims over load and training
    report["trainable_params"] = sum(p.numel() for p in trainable)
    best = min(step_s)
    linear = sum(m.base_layer.quantized.size for _, m in lora_layers(model))
    report["matmul_params"] = linear + config.vocab_size * config.hidden_size  # + the output head
    report["gflops_step"] = 6 * report["matmul_params"] * report["tokens"] / best / 1e9
    del opt, trainable
    gc.collect()
    trim_heap()

    # -- torch's dense float32 GEMM on the same products, same run
    dense_after = dense_gemm_rate(torch, config, report["tokens"], args.gemm_repeat)
    report["dense_gemm_gflops_before"], report["dense_gemm_gflops_after"] = dense_before, dense_after
    report["dense_gemm_gflops"] = max(dense_before, dense_after)
    report["fraction_of_dense"] = report["gflops_step"] / report["dense_gemm_gflops"]
    say(f"best step {best:.1f} s = {report['gflops_step']:.1f} GFLOP/s; dense fp32 GEMM "
        f"{report['dense_gemm_gflops']:.1f} GFLOP/s (before {dense_before:.1f}, after {dense_after:.1f}): "
        f"{100 * report['fraction_of_dense']:.0f} %; peak RSS load "
        f"{report['peak_rss_load'] / gib:.2f} GiB, train {report['peak_rss_train'] / gib:.2f} GiB")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
