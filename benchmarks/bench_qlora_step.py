"""One QLoRA training step against 16-bit LoRA, in the same run (issue 4's targets).

    python benchmarks/bench_qlora_step.py [--layers 30] [--batch 4] [--seq 256] [--steps 3] [--threads 2]

Builds a Llama model with SmolLM2-135M's architecture (hidden 576, FFN 1536, 9
heads / 3 KV heads, vocabulary 49,152) in bfloat16 with random weights (timing
does not depend on the values; the real checkpoint is loaded by `pyqlora finetune`),
then times forward + backward + AdamW step on the LoRA parameters, batch x seq tokens:

- 16-bit LoRA: PEFT (`peft.get_peft_model`, all linear layers but lm_head) on the
  dense bfloat16 base;
- QLoRA: `pyqlora.lora.prepare_model` (NF4 + DQ, blocksize 64) on the same weights.

Prints the best step time of each, their ratio, and the bytes of the base linear
weights (bfloat16 vs NF4 + DQ).
"""
import argparse
import copy
import os
import time

from _bench.options import add_int_options


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_int_options(ap, layers=30, batch=4, seq=256, steps=3, threads=os.cpu_count(), r=8)
    args = ap.parse_args()

    import torch
    import transformers
    import peft

    import pyqlora as pq
    from pyqlora.lora import LoraConfig, lora_layers, prepare_model

    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                   tie_word_embeddings=True)
    dense = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def timed_steps(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for _ in range(args.steps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return min(times[1:]), loss.item()

    lora16 = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                       target_modules="all-linear"))
    lora16.train()
    t16, loss16 = timed_steps(lora16)
    del lora16

    qmodel = copy.deepcopy(dense)
    report = prepare_model(qmodel, LoraConfig(r=args.r, lora_alpha=2 * args.r))
    qmodel.train()
    tq, lossq = timed_steps(qmodel)
    base_bytes = sum(m.base_layer.quantized.nbytes for _, m in lora_layers(qmodel))

    print(f"SmolLM2-135M architecture, {args.layers} layers, random bfloat16 weights; batch {args.batch} x "
          f"{args.seq} tokens; {args.threads} threads; best of {args.steps} steps after a warm-up")
    print(f"16-bit LoRA (PEFT, bf16 base):   {t16:7.2f} s/step   loss {loss16:.3f}")
    print(f"QLoRA (pyqlora, NF4 + DQ base):  {tq:7.2f} s/step   loss {lossq:.3f}")
    print(f"QLoRA / 16-bit LoRA step time:   {tq / t16:7.2f}x   (target <= 1.3x)")
    print(f"base linear weights: bf16 {report.dense_weight_bytes / 2**20:.1f} MiB -> NF4+DQ "
          f"{base_bytes / 2**20:.1f} MiB = {base_bytes / report.dense_weight_bytes:.3f}x   (target <= 0.27x)")
    print(report)


if __name__ == "__main__":
    main()
