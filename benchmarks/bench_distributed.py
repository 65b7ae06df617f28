"""Per-rank memory and step time of QLoRA under DDP and FSDP2 (gloo on CPU, or NCCL).

Run with torchrun, once per kind, and compare the JSON lines rank 0 prints::

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --kind ddp
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --kind fsdp

The model is a Hugging Face Llama built from a config (random weights, nothing
downloaded), prepared by ``prepare_model`` on every rank. Reported per rank:
bytes of parameters + buffers and of optimizer state held (local shards under
FSDP), resident memory now, the peak (VmHWM) up to the first step (building the
dense random model, quantizing and wrapping it) and the peak during the training
steps alone (VmHWM reset when they start; None where the kernel cannot reset it),
and the mean time of a training step after the first. For the real SmolLM2-135M, loaded
straight into 4 bits, use ``torchrun --nproc-per-node 2 -m pyqlora finetune
--distributed ddp|fsdp`` (its report has the same figures per rank).
"""
import argparse
import ctypes
import json
import time

import torch

from pyqlora._glue.memory import memory_status, peak_rss_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("ddp", "fsdp"), required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split across ranks)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--phases", action="store_true",
                    help="also report resident memory after each forward (and again with glibc's free heap "
                         "trimmed), backward and optimizer step (diagnostic: the trims change the peak)")
    ap.add_argument("--shard-embeddings", action="store_true",
                    help="FSDP: shard the frozen embedding tables too (wrap_model(replicate_embeddings=False))")
    args = ap.parse_args()

    import transformers

    from pyqlora import distributed as qdist
    from pyqlora.lora import LoraConfig, prepare_model

    torch.set_num_threads(1)
    ctx = qdist.setup(args.kind)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    prepare_model(model, LoraConfig(r=16, lora_alpha=16))
    model = qdist.wrap_model(model, ctx, replicate_embeddings=not args.shard_embeddings)
    held = qdist.parameter_bytes(model)
    opt = torch.optim.AdamW(qdist.trainable_parameters(model), lr=1e-4)
    lo, hi = qdist.local_batch(args.batch, ctx)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))[lo:hi]
    peak_before = qdist.memory_status()["peak_rss"]  # building, quantizing and wrapping the model
    reset = qdist.reset_peak_memory()  # from here VmHWM covers the training steps only
    phases = []
    libc = ctypes.CDLL("libc.so.6") if args.phases else None
    if args.phases:
        libc.malloc_trim(0)  # start from what is live, not what glibc kept
        phases.append(("start", memory_status()["rss"]))
    times = []
    for step in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if args.phases:
            phases.append((f"{step} forward", memory_status()["rss"]))
            libc.malloc_trim(0)  # what is live, without the heap glibc keeps
            phases.append((f"{step} forward, heap trimmed", memory_status()["rss"]))
        loss.backward()
        if args.phases:
            phases.append((f"{step} backward", memory_status()["rss"]))
        opt.step()
        opt.zero_grad()
        if args.phases:
            phases.append((f"{step} step", memory_status()["rss"]))
        times.append(time.perf_counter() - t)
        loss = qdist.all_reduce_mean(loss)
    mem = qdist.memory_status()
    row = {"kind": args.kind, "world_size": ctx.world_size, "hidden": args.hidden, "layers": args.layers,
           "vocab": args.vocab, "param_buffer_bytes": held,
           "optimizer_state_bytes": qdist.optimizer_state_bytes(opt), "rss_now": memory_status()["rss"],
           "rss_peak": peak_rss_bytes(),
           "vmhwm_before_training": peak_before, "vmhwm_training": mem["peak_rss"] if reset else None,
           "rss_anon": mem["rss_anon"],
           "step_s": sum(times[1:]) / max(1, len(times) - 1), "last_loss": loss}
    if args.phases:
        row["rss_phases_mib"] = [(name, round(b / 2**20)) for name, b in phases]
    rows = [None] * ctx.world_size
    torch.distributed.all_gather_object(rows, row)
    if ctx.is_main:
        for r in rows:
            print(json.dumps(r))
    qdist.cleanup(ctx)


if __name__ == "__main__":
    main()
