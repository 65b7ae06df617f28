"""QLoRA under torch.distributed: DDP and FSDP2 for a model made by ``prepare_model``.

A training loop launched by ``torchrun`` calls, in this order::

    from pyqlora import distributed as qdist

    ctx = qdist.setup("fsdp")              # or "ddp"; init_process_group from torchrun's env
    model = build_model()                   # the same on every rank (same checkpoint / seed)
    prepare_model(model, config)
    model = qdist.wrap_model(model, ctx)    # DDP or fully_shard; 4-bit weights stay uint8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
    for batch in my_shard_of_the_data:      # each rank its own part of the global batch
        loss = model(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        if ctx.is_main: print(qdist.all_reduce_mean(loss))   # all ranks must call it
    qdist.save_adapter_distributed(model, "out", optimizer=opt, extra={"step": step})  # all ranks
    qdist.cleanup(ctx)

What is synchronized (see ``docs/distributed.md``):

- **DDP**: only the trainable (LoRA) parameters. Frozen parameters (the uint8
  4-bit storage, biases, embeddings, norms) and buffers are put on DDP's ignore
  list, so they are neither broadcast at start nor all-reduced; instead
  :func:`wrap_model` checks once that every rank holds the same frozen bytes
  (a CRC32 per rank compared with two all-reduces) and raises if not.
- **FSDP2**: every parameter is sharded, the 4-bit storage included (plain
  uint8 parameters: FSDP2 all-gathers them as bytes and its
  ``MixedPrecisionPolicy`` never casts non-floating parameters). Trainable
  parameters become ``DTensor`` shards; optimizers see ``DTensor``s
  (``torch.optim.AdamW`` handles them; an optimizer that touches raw storage must
  work on ``p.to_local()`` / ``p.grad.to_local()``).

Everything here also works without torchrun: ``setup("none")`` gives a
one-process context and :func:`wrap_model` returns the model unchanged.
"""
import dataclasses
import datetime
import inspect
import json
import os
import zlib

import torch
import torch.distributed as dist
from torch import nn

from ._glue.memory import memory_status, optimizer_state_bytes, parameter_bytes, reset_peak_memory
from ._glue.tensors import byte_view
from .lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraConfig,
    check_adapter,
    load_adapter,
    lora_layers,
    save_adapter,
)
from .nn import Linear4bit, LoraLinear4bit

__all__ = [
    "KINDS",
    "OPTIMIZER_DCP",
    "OPTIMIZER_FILE",
    "DistContext",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "is_main_process",
    "load_adapter_distributed",
    "local_batch",
    "memory_status",
    "optimizer_state_bytes",
    "parameter_bytes",
    "rank",
    "reset_peak_memory",
    "save_adapter_distributed",
    "setup",
    "trainable_parameters",
    "unwrap",
    "world_size",
    "wrap_model",
]

#: Values of ``--distributed``: no distribution, DistributedDataParallel, FSDP2 (fully_shard).
KINDS = ("none", "ddp", "fsdp")
#: File next to the adapter holding the optimizer state (and ``extra``) written by save_adapter_distributed.
OPTIMIZER_FILE = "optimizer.pt"
#: Folder of the sharded optimizer checkpoint (torch.distributed.checkpoint) with ``sharded_optimizer=True``.
OPTIMIZER_DCP = "optimizer_dcp"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass
class DistContext:
    """What :func:`setup` found: the kind of parallelism, this process's place, its device."""

    kind: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # setup() called init_process_group, so cleanup() destroys it

    @property
    def is_main(self):
        return self.rank == 0


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"distributed kind must be one of {KINDS}, got {kind!r}")
    return kind


def setup(kind="ddp", backend=None, timeout_s=1800):
    """Join the process group that ``torchrun`` describes in the environment.

    Parameters
    ----------
    kind : {"none", "ddp", "fsdp"}
        ``"none"`` initializes nothing and returns a one-process context.
    backend : str, optional
        ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU).
    timeout_s : float
        Collective timeout in seconds.

    Returns
    -------
    DistContext

    Raises
    ------
    RuntimeError
        If `kind` is "ddp"/"fsdp" but the process was not started by torchrun
        (``RANK``, ``WORLD_SIZE``, ... missing) and no process group exists.
    """
    _check_kind(kind)
    if kind == "none":
        return DistContext("none")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(f"--distributed {kind} needs a launcher: environment variables {missing} are not "
                               f"set; start with `torchrun --nproc-per-node N -m pyqlora finetune ...`")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    backend = dist.get_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistContext(kind, dist.get_rank(), dist.get_world_size(), local_rank, backend, device, owns)


def cleanup(ctx=None):
    """Destroy the process group if :func:`setup` created it (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized() and (ctx is None or ctx.owns_group):
        dist.destroy_process_group()


def _active():
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size():
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main_process():
    """True on rank 0 (and without a process group): the process that logs and writes files."""
    return rank() == 0


def barrier():
    if _active():
        dist.barrier()


def all_reduce_mean(x):
    """The mean of `x` (a number or a tensor) over all ranks, as a float or a new tensor.

    Every rank must call it. Without a process group it returns `x` (a float for a number or 0-d tensor).
    """
    is_scalar = not torch.is_tensor(x) or x.dim() == 0
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone() if not torch.is_tensor(x) else x.detach().clone()
    if _active():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return float(t) if is_scalar else t.cpu()


def local_batch(global_batch_size, ctx=None):
    """(start, stop) of this rank's slice of a global batch; the size must divide evenly.

    Equal slices make the DDP/FSDP gradient (the mean of the ranks' mean-loss
    gradients) equal to the single-process gradient of the global batch.
    """
    r, n = (ctx.rank, ctx.world_size) if ctx is not None else (rank(), world_size())
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the world size {n}")
    size = global_batch_size // n
    return r * size, (r + 1) * size


def trainable_parameters(model):
    """The parameters that require a gradient (what to give the optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (FSDP2 modules are not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_prepared(model):
    if not lora_layers(model):
        raise ValueError("the model has no LoRA layers: call pyqlora.lora.prepare_model before wrap_model")
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            bad = [t.dtype for t in m.quant_parameters() if t.dtype != torch.uint8]
            if bad:
                raise TypeError(f"module {name!r}: 4-bit storage must be uint8 for FSDP/DDP, got {bad}")


def _frozen_state(model):
    """(name, tensor) of every frozen parameter and every buffer, in a fixed order."""
    items = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    items += list(model.named_buffers())
    return items


def _crc(items):
    crc = 0
    for name, t in items:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        crc = zlib.crc32(name.encode(), crc)
        # byte_view, not Tensor.numpy(): no copy, and the storage stays resizable for FSDP2
        crc = zlib.crc32(byte_view(t.contiguous().reshape(-1)), crc)
    return crc


def _check_same_on_all_ranks(items, device):
    crc = torch.tensor([_crc(items)], dtype=torch.int64, device=device)
    lo, hi = crc.clone(), crc.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo) != int(hi):
        raise RuntimeError("the frozen weights differ between ranks (CRC32 mismatch); build and prepare the model "
                           "identically on every rank (same checkpoint, same seed) before wrap_model")


def _fully_shard_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _shard_units(model, shard_classes):
    """Modules to give their own FSDP group: the classes named, else HF's _no_split_modules, else LoRA layers."""
    if shard_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if names and any(type(m).__name__ in names for m in model.modules()):
            shard_classes = names
        else:
            shard_classes = (LoraLinear4bit,)
    def matches(m):
        return any(type(m).__name__ == c if isinstance(c, str) else isinstance(m, c) for c in shard_classes)
    return [m for m in model.modules() if m is not model and matches(m)]


def _embedding_tables(model):
    """The frozen floating weights of the model's input and output embeddings (dense modules only)."""
    found = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            module = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            module = None
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.Embedding, nn.Linear)) and isinstance(w, nn.Parameter) \
                and w.is_floating_point() and not w.requires_grad:
            found[id(w)] = w  # a tied output head is the same Parameter
    return list(found.values())


def wrap_model(model, ctx, *, mixed_precision=None, reshard_after_forward=True, shard_classes=None,
               replicate_embeddings=True, check_frozen=True, **ddp_kwargs):
    """Wrap a prepared model for `ctx.kind`: DDP, FSDP2 (``fully_shard``) or nothing.

    Parameters
    ----------
    model : torch.nn.Module
        A model after :func:`pyqlora.lora.prepare_model`, identical on every rank
        except maybe the adapters' initial values (rank 0's are used).
    ctx : DistContext or str
        From :func:`setup`; a string is taken as the kind with the current process group.
    mixed_precision : torch.dtype, optional
        FSDP only: ``MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=float32)``.
        The uint8 4-bit storage is never cast (FSDP2 casts floating parameters only).
    reshard_after_forward : bool
        FSDP only: free the gathered parameters after forward and gather again for backward.
    shard_classes : sequence of type or str, optional
        FSDP only: modules that get their own FSDP group (all-gathered one at a
        time); by default a Hugging Face model's ``_no_split_modules`` (the decoder
        layers), else each LoRA layer. The root always gets one.
    replicate_embeddings : bool
        FSDP only: keep the frozen input and output embedding tables (dense
        ``nn.Embedding`` / ``nn.Linear`` weights, e.g. a tied output head) whole
        on every rank (FSDP2's ``ignored_params``) instead of sharding them. The
        root FSDP group that owns them gathers them at the start of forward and
        keeps them gathered into backward, through the step's memory peak (the
        logits and their gradient); replicated, they are never gathered. On
        SmolLM2-135M with 2 ranks this lowers the per-rank peak resident memory
        by 140-195 MiB (below DDP's), while the bytes held between steps grow by
        half the tables (``docs/distributed.md``). Trainable tables are always sharded.
        With `mixed_precision` the kept tables are stored in that dtype (FSDP would
        compute with that rounding of them anyway).
    check_frozen : bool
        DDP and FSDP: compare a CRC32 of the frozen state across ranks, raise if it differs.
    **ddp_kwargs
        Passed to ``DistributedDataParallel``.

    Returns
    -------
    torch.nn.Module
        The DDP wrapper, or the model itself (FSDP2 shards in place; kind "none").
    """
    kind = _check_kind(ctx.kind if isinstance(ctx, DistContext) else ctx)
    if kind == "none":
        return model
    if not _active():
        raise RuntimeError(f"wrap_model({kind!r}) needs a process group: call pyqlora.distributed.setup first")
    _check_prepared(model)
    device = ctx.device if isinstance(ctx, DistContext) else torch.device("cpu")
    if check_frozen:
        _check_same_on_all_ranks(_frozen_state(model), device)
    if kind == "ddp":
        if mixed_precision is not None:
            raise ValueError("mixed_precision is an FSDP option; with DDP use torch.autocast in the loop")
        # Frozen parameters and buffers are identical on every rank (checked above):
        # keep DDP from broadcasting them at start and the buffers at every forward.
        model._ddp_params_and_buffers_to_ignore = [n for n, _ in _frozen_state(model)]
        if device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [device.index])
        return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if ddp_kwargs:
        raise TypeError(f"unexpected arguments for FSDP: {sorted(ddp_kwargs)}")
    fully_shard, MixedPrecisionPolicy = _fully_shard_api()
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    if device.type == "cuda":
        model.to(device)
    # fully_shard keeps each rank's own values (FSDP1's sync_module_states is gone): start every
    # rank from rank 0's adapters, as DDP does, so that differently seeded ranks cannot mix.
    with torch.no_grad():
        for p in trainable_parameters(model):
            dist.broadcast(p.data, src=0)
    for unit in _shard_units(model, shard_classes):
        fully_shard(unit, **kwargs)
    # (a table inside a group given by shard_classes is already sharded there)
    tables = [w for w in _embedding_tables(model) if type(w).__name__ != "DTensor"] if replicate_embeddings else []
    if tables and "ignored_params" not in inspect.signature(fully_shard).parameters:
        tables = []  # torch < 2.7 (no ignored_params): the tables are sharded like everything else
    if tables and mixed_precision is not None:
        # FSDP casts only the parameters it manages: store the kept tables in the compute dtype,
        # the same rounding FSDP would apply to their gathered copy
        with torch.no_grad():
            for w in tables:
                w.data = w.data.to(mixed_precision)
    fully_shard(model, **kwargs, **({"ignored_params": set(tables)} if tables else {}))
    # fully_shard copied each rank's chunk into new storage; the cached QuantizedArray view of
    # every Linear4bit still pointed at the whole unsharded bytes and kept them alive (the full
    # 4-bit model on every rank). Dropping the views frees them.
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m._q_cache = None
    return model


# --------------------------------------------------------------------- checkpoints
def _is_fsdp(model):
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _lora_keys(model, adapter_name):
    """{model FQN of a LoRA weight: PEFT key} for `adapter_name`."""
    keys = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            raise ValueError(f"module {name!r} has no adapter {adapter_name!r}")
        for which in ("lora_A", "lora_B"):
            keys[f"{name}.{which}.{adapter_name}.weight"] = f"{PEFT_PREFIX}{name}.{which}.weight"
    return keys


def save_adapter_distributed(model, directory, optimizer=None, extra=None, adapter_name="default",
                             sharded_optimizer=False):
    """Write the adapter (PEFT files) and, optionally, the optimizer state; call on every rank.

    Under FSDP2 the LoRA shards and the optimizer state are gathered into full
    tensors on rank 0 (``torch.distributed.checkpoint.state_dict`` with
    ``full_state_dict=True, cpu_offload=True``); under DDP they are already
    whole on every rank. Rank 0 writes ``adapter_config.json``,
    ``adapter_model.safetensors`` (loadable by PEFT and :func:`pyqlora.lora.load_adapter`)
    and, with an optimizer, ``optimizer.pt`` holding ``{"optimizer": state, "extra": extra}``.

    Parameters
    ----------
    model : torch.nn.Module
        The model returned by :func:`wrap_model` (or an unwrapped one).
    directory : str or os.PathLike
    optimizer : torch.optim.Optimizer, optional
    extra : object, optional
        Anything picklable to restore with the optimizer (step, data position, RNG state).
    adapter_name : str
    sharded_optimizer : bool
        FSDP only: write the optimizer state as a sharded ``torch.distributed.checkpoint``
        (folder ``optimizer_dcp/``, each rank writes its own shard, nothing is
        gathered) instead of one full ``optimizer.pt``; ``optimizer.pt`` then
        holds only ``extra``. :func:`load_adapter_distributed` reads either.
    """
    inner = unwrap(model)
    if sharded_optimizer and not _is_fsdp(inner):
        raise ValueError("sharded_optimizer=True needs an FSDP2 model (under DDP every rank holds the whole state)")
    if _is_fsdp(inner):
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        keys = _lora_keys(inner, adapter_name)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(inner, options=opts)  # collective; full tensors on rank 0 only
        if is_main_process():
            missing = [k for k in keys if k not in full]
            if missing:
                raise RuntimeError(f"gathered state dict lacks LoRA weights {missing[:3]}")
            tensors = {keys[k]: full[k].contiguous() for k in keys}
            os.makedirs(directory, exist_ok=True)
            _write_adapter_config(inner, directory, adapter_name)
            save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    elif is_main_process():
        save_adapter(inner, directory, adapter_name=adapter_name)
    if optimizer is not None and sharded_optimizer:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(inner, optimizer)},
                 checkpoint_id=os.path.join(directory, OPTIMIZER_DCP))
        if is_main_process():
            torch.save({"optimizer": None, "sharded": OPTIMIZER_DCP, "extra": extra},
                       os.path.join(directory, OPTIMIZER_FILE))
    elif optimizer is not None:
        state = _optimizer_state(inner, optimizer)
        if is_main_process():
            torch.save({"optimizer": state, "extra": extra}, os.path.join(directory, OPTIMIZER_FILE))
    barrier()


def _write_adapter_config(model, directory, adapter_name):
    layers = lora_layers(model)
    config = getattr(model, "_pyqlora_config", None) or LoraConfig()
    first = layers[0][1]
    cfg = dataclasses.replace(config, r=first.r[adapter_name], lora_alpha=first.lora_alpha[adapter_name])
    targets = getattr(model, "_pyqlora_targets", None) or sorted({n.rpartition(".")[2] for n, _ in layers})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg.to_peft_dict(targets), f, indent=2, sort_keys=True)


def _optimizer_state(model, optimizer):
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_adapter_distributed(model, directory, optimizer=None, adapter_name="default"):
    """Load what :func:`save_adapter_distributed` wrote; call on every rank (files on a shared path).

    Returns
    -------
    object
        The ``extra`` saved with the optimizer state, or None.
    """
    inner = unwrap(model)
    extra = None
    opt_path = os.path.join(directory, OPTIMIZER_FILE)
    if optimizer is not None and not os.path.exists(opt_path):
        raise FileNotFoundError(f"optimizer state not found: {opt_path}")
    if _is_fsdp(inner):
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # load_adapter's checks (config fields; every tensor a finite lora_A/lora_B of the right shape and r;
        # every layer gets both), against the sharded parameters' global shapes; nothing changes here
        plan = check_adapter(inner, directory, adapter_name)
        layers = dict(lora_layers(inner))
        lacking = [name for name, layer in layers.items() if adapter_name not in layer.lora_A]
        if lacking:  # a sharded model cannot grow new parameters
            raise ValueError(f"modules {lacking[:3]} have no adapter {adapter_name!r}; under FSDP the adapter must "
                             "exist before wrap_model (prepare_model with the adapter's r)")
        w_path = os.path.join(directory, ADAPTER_WEIGHTS)
        tensors = load_file(w_path)
        keys = _lora_keys(inner, adapter_name)
        absent = [peft for peft in keys.values() if peft not in tensors]
        if absent:
            raise ValueError(f"{w_path}: no weights for {absent[:3]}")
        full = {fqn: tensors[peft] for fqn, peft in keys.items()}
        set_model_state_dict(inner, full, options=StateDictOptions(full_state_dict=True, strict=False))
        for name, (_, _, _, alpha, scaling) in plan.items():  # the file's lora_alpha (r was checked equal)
            layers[name].lora_alpha[adapter_name], layers[name].scaling[adapter_name] = alpha, scaling
        if optimizer is not None:
            saved = torch.load(opt_path, map_location="cpu", weights_only=False)
            if saved.get("sharded"):
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import (
                    get_optimizer_state_dict,
                )

                # the template gives each rank's shards; DCP reads into them (resharding if needed)
                state = {"optimizer": get_optimizer_state_dict(inner, optimizer)}
                dcp.load(state, checkpoint_id=os.path.join(directory, saved["sharded"]))
                set_optimizer_state_dict(inner, optimizer, state["optimizer"])
            else:
                set_optimizer_state_dict(inner, optimizer, saved["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            extra = saved["extra"]
    else:
        load_adapter(inner, directory, adapter_name=adapter_name)
        if optimizer is not None:
            saved = torch.load(opt_path, map_location="cpu", weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            extra = saved["extra"]
    barrier()
    return extra
