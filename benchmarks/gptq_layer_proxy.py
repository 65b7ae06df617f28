"""Layer-level proxy for calibrated 4-bit rounding (issue 22, docs/quality.md section 4) on SmolLM2-135M.

Why does GPTQ error feedback in the NF4 + DQ format gain so little perplexity? This script answers at the
level of single layers, in minutes instead of the hours of perplexity runs:

- calibration tokens: exactly those of ``benchmarks/gptq_quality.py`` (Botchan outside the evaluation
  windows, ``--tokens`` of them in sequences of 512); held-out tokens: the 8 evaluation windows of 512
  that the perplexity is measured on (disjoint from the calibration tokens, a 512-token gap after them);
- forward hooks on the *dense* float32 model collect, for each chosen layer, ``H = X^T X`` (float64) on
  the calibration tokens and ``H_eval = X_eval^T X_eval`` on the held-out ones (all 4096 rows; the
  trace form ``trace(E H E^T)`` is exactly ``||X E^T||_F^2``, so no rows need to be kept);
- each layer's weight is quantized by round to nearest and by ``pq.quantize(..., hessian=H)`` with
  several options (damp, column order, with / without double quantization) and the script reports the
  relative output error ``||X (W - W_hat)^T||_F / ||X W^T||_F`` on the calibration and the held-out
  rows, the relative weight error, and the spectrum of ``H`` (condition number, share of the trace in
  the top 1 % / 10 % of eigenvalues, participation ratio).

``--numpy`` adds a float64 NumPy re-implementation of the same solve with other scale rules, on the
layers it names (BLOCK.LAYER): ``np_updated`` (pq's rule: each block's absmax from the error-updated
weights when its first column is visited, then DQ after the solve), ``np_dqsnap`` (that absmax
replaced by its DQ value before the block's codes are chosen, the DQ grid -- offset and nested absmax --
fixed beforehand from the round-to-nearest absmax), ``np_static`` (the absmax of the *original* block,
GPTQ's static groups, then DQ) and ``np_static_dq`` (the DQ value of the original absmax: the exact
stored scale is known before the solve, so the error feedback sees exactly what is stored). All NumPy
variants report the fraction of elements clipped (``|w / absmax| > 1`` when coded).

Usage::

    python benchmarks/gptq_layer_proxy.py --json proxy.json
    python benchmarks/gptq_layer_proxy.py --blocks 0 20 --layers q_proj down_proj --numpy 0.q_proj 20.down_proj
"""
import os

for _v in ("PYQLORA_NUM_THREADS", "NF4CORE_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
           "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pyqlora as pq  # noqa: E402
from pyqlora._quantize import DQ_BLOCKSIZE, lookup_table, quantize_calibrated  # noqa: E402
from pyqlora.app.checkpoint import load_model  # noqa: E402
from pyqlora.app.data import botchan_text  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gptq_quality import START, WINDOW, WINDOWS, calibration_ids  # noqa: E402

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class _Stop(Exception):
    pass


def eval_ids(tok, text):
    """The 8 evaluation windows of 512 tokens (those ``perplexity`` scores), (8, 512)."""
    ids = tok(text[int(len(text) * START):], add_special_tokens=False).input_ids[:WINDOW * WINDOWS]
    return torch.tensor(ids).reshape(-1, WINDOW)


def collect(model, names, batches, last_block):
    """({name: X^T X}, {name: X^T X of the rows at position 0}) in float64 over the rows of `batches`, from the
    dense model (stops after `last_block`). Position 0 of each sequence is the attention-sink token, whose
    inputs are often orders of magnitude larger than the others' and can dominate X^T X."""
    acc = {n: None for n in names}
    first = {n: None for n in names}
    hooks = []

    def make(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach().double()
            x0 = x[:, 0, :]
            x = x.reshape(-1, x.shape[-1])
            h, h0 = x.T @ x, x0.T @ x0
            acc[name] = h if acc[name] is None else acc[name] + h
            first[name] = h0 if first[name] is None else first[name] + h0
        return hook

    def stop(mod, inputs, output):
        raise _Stop

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(make(n)))
    hooks.append(model.model.layers[last_block].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model.model(input_ids=b)  # the decoder only: no LM head
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: h.numpy() for n, h in acc.items()}, {n: h.numpy() for n, h in first.items()}


def spectrum(h):
    ev = np.clip(np.linalg.eigvalsh(h)[::-1], 0, None)
    tr = ev.sum()
    k = ev.size
    d = np.diag(h)
    return {"cond": float(ev[0] / ev[-1]) if ev[-1] > 0 else float("inf"),
            "cond_damp0.01": float((ev[0] + 0.01 * d.mean()) / (ev[-1] + 0.01 * d.mean())),
            "top1pct_trace": float(ev[:max(1, k // 100)].sum() / tr),
            "top10pct_trace": float(ev[:max(1, k // 10)].sum() / tr),
            "participation_ratio": float(tr ** 2 / (ev ** 2).sum() / k),  # 1: isotropic, 1/k: rank one
            "diag_max_over_mean": float(d.max() / d.mean())}


def rel_out(e, w, h):
    """||X E^T||_F / ||X W^T||_F from H = X^T X."""
    return float(np.sqrt(np.einsum("ij,ij->", e @ h, e) / np.einsum("ij,ij->", w @ h, w)))


# ---- float64 NumPy re-implementation with other block-scale rules ----

def dq_grid(absmax_flat):
    """(offset, nested per 256-block chunk, dynamic table) of bitsandbytes' DQ of `absmax_flat`."""
    dyn = np.asarray(lookup_table("dynamic", 256), dtype=np.float64)
    offset = float(np.float32(absmax_flat.astype(np.float64).mean()))
    c = absmax_flat.astype(np.float64) - offset
    nchunk = -(-c.size // DQ_BLOCKSIZE)
    nested = np.array([np.abs(c[i * DQ_BLOCKSIZE:(i + 1) * DQ_BLOCKSIZE]).max() for i in range(nchunk)])
    return offset, nested, dyn


def dq_snap(s, flat_index, grid):
    """The DQ value (nearest grid point) of scales `s` of the flat blocks `flat_index`."""
    offset, nested, dyn = grid
    srt = np.sort(dyn)
    nst = nested[flat_index // DQ_BLOCKSIZE]
    x = (s - offset) / np.where(nst > 0, nst, 1)
    i = np.clip(np.searchsorted(srt, x), 1, srt.size - 1)
    lo, hi = srt[i - 1], srt[i]
    v = np.where(x - lo <= hi - x, lo, hi)
    return v * nst + offset


def gptq_np(w, u, table, bs, rule, grid=None):
    """(W_hat float64, clipped fraction, scales (rows, K / bs)): float64 GPTQ over `table` with block scales by `rule`.

    u: upper Cholesky factor of the dampened H^-1 (natural order). Blocks are `bs` consecutive
    columns of a row (K % bs == 0)."""
    n, k = w.shape
    assert k % bs == 0
    nb = k // bs
    wc = w.astype(np.float64).copy()
    out = np.empty_like(wc)
    srt = np.sort(table)
    mid = (srt[1:] + srt[:-1]) / 2
    clipped = 0
    rows = np.arange(n)
    scales = np.empty((n, nb))
    for j in range(k):
        if j % bs == 0:
            b = j // bs
            src = w if rule.startswith("static") else wc
            s = np.abs(src[:, j:j + bs]).max(1).astype(np.float32).astype(np.float64)
            if rule.endswith("dq") or rule == "dqsnap":
                s = dq_snap(s, rows * nb + b, grid)
            s = np.maximum(s, 1e-38)
            scales[:, b] = s
        x = wc[:, j] / s
        clipped += int((np.abs(x) > 1).sum())
        q = srt[(np.clip(x, -1, 1)[:, None] > mid[None, :]).sum(1)] * s
        out[:, j] = q
        err = (wc[:, j] - q) / u[j, j]
        wc[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return out, clipped / w.size, scales


def run_numpy(w, h, hev, bs, damp, rules, hev_rest=None):
    from pyqlora._quantize import hessian_factor
    u, _, dead = hessian_factor(h, w.shape[1], damp, "natural")
    w = w.astype(np.float64).copy()
    w[:, dead] = 0
    table = np.asarray(lookup_table("nf4", 16), dtype=np.float64)
    n, k = w.shape
    rtn_absmax = np.abs(w.reshape(-1, bs)).max(1).astype(np.float32).astype(np.float64)
    grid = dq_grid(rtn_absmax)
    # check: dq_snap of the round-to-nearest absmax is pq's DQ of it
    q = pq.quantize(w.astype(np.float32), codebook="nf4", blocksize=bs, double_quant=True)
    dyn = np.asarray(lookup_table("dynamic", 256), dtype=np.float64)
    pq_dq = dyn[np.asarray(q.absmax)] * np.repeat(np.asarray(q.nested_absmax, np.float64), DQ_BLOCKSIZE)[
        :rtn_absmax.size] + float(q.nested_offset)
    res = {"dq_snap_check_max_rel_diff": float(np.max(np.abs(dq_snap(rtn_absmax, np.arange(rtn_absmax.size), grid)
                                                             - pq_dq) / pq_dq))}
    print(f"# DQ emulation check: max rel diff to pq's DQ {res['dq_snap_check_max_rel_diff']:.2e}", flush=True)
    for rule in rules:
        t0 = time.perf_counter()
        base = {"np_updated": "updated", "np_dqsnap": "dqsnap", "np_static": "static",
                "np_static_dq": "static_dq"}[rule]
        w_hat, clip, scales = gptq_np(w, u, table, bs, base, grid)
        row = {"clipped": clip}
        if base in ("updated", "static"):
            # no DQ: the scales the solve used; then pq's format: the same codes with each scale replaced by its
            # DQ value (grid of the scales actually used, as _finish would build it)
            row.update(metrics(w, w_hat, h, hev, "_nodq", hev_rest))
            scales = scales.reshape(-1)  # flat block order
            g = dq_grid(scales)
            snapped = dq_snap(scales, np.arange(scales.size), g)
            w_dq = (w_hat.reshape(-1, bs) / scales[:, None] * snapped[:, None]).reshape(n, k)
            row.update(metrics(w, w_dq, h, hev, "", hev_rest))
        else:
            row.update(metrics(w, w_hat, h, hev, "", hev_rest))
        row["seconds"] = time.perf_counter() - t0
        res[rule] = row
    return res


def metrics(w, w_hat, h, hev, suffix, hev_rest=None):
    """Relative output errors on the calibration rows, the held-out rows (and the held-out rows but
    position 0 of each sequence: `hev_rest`), relative weight error."""
    e = w - w_hat
    r = {"out_cal" + suffix: rel_out(e, w, h), "out_eval" + suffix: rel_out(e, w, hev),
         "weight" + suffix: float(np.linalg.norm(e) / np.linalg.norm(w))}
    if hev_rest is not None:
        r["out_eval_nosink" + suffix] = rel_out(e, w, hev_rest)
    return r


METHODS = [  # name, double_quant, hessian?, damp, order
    ("rtn", True, False, None, None),
    ("rtn_nodq", False, False, None, None),
    ("cal_d0.01", True, True, 0.01, "natural"),
    ("cal_d0.001", True, True, 0.001, "natural"),
    ("cal_d0.1", True, True, 0.1, "natural"),
    ("act_d0.01", True, True, 0.01, "act"),
    ("cal_d0.01_nodq", False, True, 0.01, "natural"),
    ("act_d0.01_nodq", False, True, 0.01, "act"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (sequences of 512)")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument("--layers", nargs="+", default=["q_proj", "o_proj", "gate_proj", "down_proj"])
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--numpy", nargs="*", default=[], metavar="BLOCK.LAYER",
                   help="layers for the float64 NumPy scale-rule variants")
    p.add_argument("--numpy-rules", nargs="+", default=["np_updated", "np_dqsnap", "np_static", "np_static_dq"])
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    t_start = time.perf_counter()

    text = botchan_text()
    model, tok, _ = load_model(None, dtype=torch.float32)
    cal = calibration_ids(tok, text, args.tokens)
    ev = eval_ids(tok, text)
    names = [f"model.layers.{b}.{PARENT[name]}.{name}" for b in args.blocks for name in args.layers]
    t0 = time.perf_counter()
    hs, hs0 = collect(model, names, list(cal.split(args.batch)), max(args.blocks))
    hevs, hevs0 = collect(model, names, list(ev.split(args.batch)), max(args.blocks))
    t_collect = time.perf_counter() - t0
    print(f"# X^T X of {len(names)} layers on {cal.numel()} calibration + {ev.numel()} held-out tokens: "
          f"{t_collect:.0f} s", flush=True)

    out = {"args": vars(args), "calibration_tokens": int(cal.numel()), "eval_tokens": int(ev.numel()),
           "layers": []}
    hdr = (f"{'layer':<22} {'method':<16} {'out_cal':>8} {'out_eval':>8} {'weight':>8} {'eval/rtn':>8} "
           f"{'ev_nosink':>9} {'/rtn':>6}")
    print(hdr)
    for name in names:
        blk = int(name.split(".")[2])
        short = f"{blk}.{name.split('.')[-1]}"
        w = model.get_submodule(name).weight.detach().numpy().astype(np.float32)
        h, hev = hs[name], hevs[name]
        t0 = time.perf_counter()
        spec = spectrum(h)
        spec_eval = spectrum(hev)
        spec_rest = spectrum(hev - hevs0[name])
        sink_share = {"cal": float(np.trace(hs0[name]) / np.trace(h)),
                      "eval": float(np.trace(hevs0[name]) / np.trace(hev))}
        factors = {}
        rows = {}
        for m, dq, cal_, damp, order in METHODS:
            if cal_:
                q = quantize_calibrated(w, "nf4", args.blocksize, dq, h, damp, order, factors=factors)
            else:
                q = pq.quantize(w, codebook="nf4", blocksize=args.blocksize, double_quant=dq)
            w_hat = pq.dequantize(q).astype(np.float64)
            rows[m] = metrics(w.astype(np.float64), w_hat, h, hev, "", hev - hevs0[name])
        entry = {"layer": short, "shape": list(w.shape), "spectrum_cal": spec, "spectrum_eval": spec_eval,
                 "spectrum_eval_nosink": spec_rest, "sink_trace_share": sink_share,
                 "methods": rows}
        if short in args.numpy:
            entry["numpy"] = run_numpy(w, h, hev, args.blocksize, 0.01, args.numpy_rules, hev - hevs0[name])
        entry["seconds"] = time.perf_counter() - t0
        out["layers"].append(entry)
        print(f"# {short} {tuple(w.shape)} cond {spec['cond']:.3g} (damp 1 %: {spec['cond_damp0.01']:.3g}) "
              f"top1% {spec['top1pct_trace']:.3f} top10% {spec['top10pct_trace']:.3f} "
              f"PR {spec['participation_ratio']:.4f} diag max/mean {spec['diag_max_over_mean']:.1f} "
              f"| eval: top1% {spec_eval['top1pct_trace']:.3f} top10% {spec_eval['top10pct_trace']:.3f} "
              f"| eval w/o position 0: top1% {spec_rest['top1pct_trace']:.3f} top10% {spec_rest['top10pct_trace']:.3f} "
              f"| position-0 share of trace: cal {sink_share['cal']:.3f} eval {sink_share['eval']:.3f}",
              flush=True)
        rtn_eval = rows["rtn"]["out_eval"]
        rtn_rest = rows["rtn"]["out_eval_nosink"]
        for m, r in list(rows.items()) + [kv for kv in entry.get("numpy", {}).items() if isinstance(kv[1], dict)]:
            print(f"{short:<22} {m:<16} {r['out_cal']:8.4f} {r['out_eval']:8.4f} {r['weight']:8.4f} "
                  f"{r['out_eval'] / rtn_eval:8.3f}"
                  + (f" {r['out_eval_nosink']:9.4f} {r['out_eval_nosink'] / rtn_rest:6.3f}" if "out_eval_nosink" in r
                     else "") + (f"  clipped {r['clipped']:.4f}" if "clipped" in r else "")
                  + (f"  nodq: cal {r['out_cal_nodq']:.4f} eval {r['out_eval_nodq']:.4f}"
                     if "out_cal_nodq" in r else ""), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    # mean over layers of each method's held-out error relative to RTN
    print("\n# geometric mean over layers of out_eval / rtn out_eval (and out_cal, out_eval_nosink)")
    summary = {}
    for m in [m for m, *_ in METHODS]:
        re = np.exp(np.mean([np.log(e["methods"][m]["out_eval"] / e["methods"]["rtn"]["out_eval"])
                             for e in out["layers"]]))
        rc = np.exp(np.mean([np.log(e["methods"][m]["out_cal"] / e["methods"]["rtn"]["out_cal"])
                             for e in out["layers"]]))
        rn = np.exp(np.mean([np.log(e["methods"][m]["out_eval_nosink"] / e["methods"]["rtn"]["out_eval_nosink"])
                             for e in out["layers"]]))
        summary[m] = {"eval_over_rtn": float(re), "cal_over_rtn": float(rc), "eval_nosink_over_rtn": float(rn)}
        print(f"{m:<16} eval {re:.3f}  cal {rc:.3f}  eval w/o position 0 {rn:.3f}")
    out["summary"] = summary
    out["seconds"] = {"collect": t_collect, "total": time.perf_counter() - t_start}
    print(f"# wall {out['seconds']['total']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
