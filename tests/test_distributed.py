"""QLoRA under torch.distributed: DDP and FSDP2 with two gloo processes on CPU.

One ``torch.multiprocessing.spawn`` per optimizer runs every scenario in the
same process group (starting processes is the slow part on a 2-core runner);
each rank saves what it saw and the tests below compare it with a
single-process run of the same model on the same global batch (the oracle).
"""
import dataclasses
import json
import os
import shutil
import socket

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import pyqlora as pq
from pyqlora import distributed as qdist
from pyqlora.lora import LoraConfig, load_adapter, lora_layers, prepare_model
from pyqlora.nn import Linear4bit
from pyqlora.optim import PagedAdamW, PagedAdamW8bit
from support import tiny_llama_config

WORLD, STEPS, GLOBAL_BATCH = 2, 4, 8
# Optimizers every scenario runs with; each entry builds one from the trainable parameters.
# The paged ones run under a pager budget far below their state (4 KiB pages), so every
# step pages state out and in; PagedAdamW8bit uses 8-bit state for every adapter weight.
# (torch.optim.AdamW itself is not in the table: PagedAdamW performs exactly its operations, tested
# bit for bit in tests/test_optim.py, and each entry costs a two-process run.)
OPTIMIZERS = {
    "paged_adamw": lambda params: PagedAdamW(params, lr=1e-2, pager=pq.Pager(budget_bytes=8192, page_bytes=4096)),
    "paged_adamw8bit": lambda params: PagedAdamW8bit(params, lr=1e-2, min_8bit_size=64,
                                                     pager=pq.Pager(budget_bytes=8192, page_bytes=4096)),
}
# 8-bit state is quantized per block of each rank's shard under FSDP, so its FSDP losses
# follow the single-process run to quantization accuracy, not float rounding. Its FSDP
# checkpoints hold the decoded moments; resuming with the same sharding is bit-identical.
FSDP_RTOL = {"paged_adamw8bit": 2e-3}


# ----------------------------------------------------------------------------- models and data
def _mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                            torch.nn.Linear(64, 8))
    prepare_model(m, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():  # non-zero B so that every adapter weight gets a gradient from step 1
        for _, layer in lora_layers(m):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return m


def _mlp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 8, generator=g)


def _mlp_loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers, max_position_embeddings=32)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    prepare_model(m, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return m


def _llama_data():
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, 64, (GLOBAL_BATCH, 12), generator=g),)


def _llama_loss(model, batch):
    (ids,) = batch
    return model(input_ids=ids, labels=ids).loss


def _slice(batch, lo, hi):
    return tuple(t[lo:hi] for t in batch)


def _train(model, batch, loss_fn, opt, steps=STEPS, reduce=False):
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(qdist.all_reduce_mean(loss) if reduce else float(loss.detach()))
    return losses


def _state_bytes(opt):
    """(optimizer_state_bytes, the optimizer's own count of its paged state + 4 bytes per step counter)."""
    return qdist.optimizer_state_bytes(opt), opt.state_bytes() + 4 * len(opt.state)


def _storage(model):
    """{name: bytes} of every 4-bit storage tensor of an unsharded model."""
    return {f"{n}.{i}": t.detach().clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for i, t in enumerate(m.quant_parameters())}


def _fsdp_codes_intact(model, reference):
    """Gather every FSDP group with FSDP's own all-gather and compare the 4-bit bytes with `reference`."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    try:
        got = _storage(model)
        dtypes = {t.dtype for t in got.values()}
        same = got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    finally:
        for u in units:
            u.reshard()
    return same, dtypes


# ----------------------------------------------------------------------------- the two ranks
def _worker(rank, port, outdir, opt_name):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    make_opt = OPTIMIZERS[opt_name]
    ctx = qdist.setup("ddp")
    fsdp = dataclasses.replace(ctx, kind="fsdp")
    lo, hi = qdist.local_batch(GLOBAL_BATCH, ctx)
    mine = _slice(_mlp_data(), lo, hi)
    out = {}

    def perturb_adapters(m):  # rank 1 starts from other adapters: wrap_model must take rank 0's
        if rank == 1:
            with torch.no_grad():
                for p in qdist.trainable_parameters(m):
                    p.add_(1.0)

    # DDP: only the LoRA gradients are all-reduced
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    m = _mlp()
    perturb_adapters(m)
    ddp = qdist.wrap_model(m, ctx)
    reduced = []

    def counting_hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = make_opt(qdist.trainable_parameters(ddp))
    out["ddp_losses"] = _train(ddp, mine, _mlp_loss, opt, reduce=True)
    out["ddp_state_bytes"] = _state_bytes(opt)
    out["ddp_reduced_per_step"] = sum(reduced) / STEPS
    out["ddp_ignored"] = sorted(ddp.parameters_to_ignore)
    out["ddp_frozen_grads"] = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
    out["ddp_bytes"] = qdist.parameter_bytes(ddp)

    # DDP and FSDP refuse ranks whose frozen weights differ
    for kind in (ctx, fsdp):
        m = _mlp()
        if rank == 1:
            with torch.no_grad():
                m[2].base_layer.bias[0] += 1.0
        try:
            qdist.wrap_model(m, kind)
            out[f"{kind.kind}_mismatch_error"] = None
        except RuntimeError as exc:
            out[f"{kind.kind}_mismatch_error"] = str(exc)

    # FSDP2, float32
    m = _mlp()
    reference = _storage(m)
    perturb_adapters(m)
    out["unsharded_bytes"] = qdist.parameter_bytes(m)
    qdist.wrap_model(m, fsdp)
    out["fsdp_bytes"] = qdist.parameter_bytes(m)
    # no view of the unsharded 4-bit bytes survives fully_shard (it would keep the whole base alive)
    out["fsdp_unsharded_views"] = [n for n, x in m.named_modules() if isinstance(x, Linear4bit) and x._q_cache]
    opt = make_opt(qdist.trainable_parameters(m))
    out["fsdp_losses"] = _train(m, mine, _mlp_loss, opt, reduce=True)
    out["fsdp_state_bytes"] = _state_bytes(opt)
    out["fsdp_codes_intact"], out["fsdp_storage_dtypes"] = _fsdp_codes_intact(m, reference)
    out["fsdp_lora_is_dtensor"] = all(type(p).__name__ == "DTensor" for p in qdist.trainable_parameters(m))

    # FSDP2 with bfloat16 mixed precision: the uint8 codes are not cast
    m = _mlp()
    qdist.wrap_model(m, fsdp, mixed_precision=torch.bfloat16)
    out["mp_losses"] = _train(m, mine, _mlp_loss, make_opt(qdist.trainable_parameters(m)), reduce=True)
    out["mp_codes_intact"], out["mp_storage_dtypes"] = _fsdp_codes_intact(m, reference)

    # FSDP2 checkpoint: save after 2 steps (full and sharded), resume in a fresh model and optimizer
    m = _mlp()
    qdist.wrap_model(m, fsdp)
    opt = make_opt(qdist.trainable_parameters(m))
    first = _train(m, mine, _mlp_loss, opt, steps=2, reduce=True)
    _checkpoint_round_trip(m, opt, first, outdir, mine, make_opt, rank, fsdp, out)

    # FSDP2 on a (tiny) Hugging Face Llama: one FSDP group per decoder layer
    m = _llama()
    lmine = _slice(_llama_data(), lo, hi)
    qdist.wrap_model(m, fsdp)
    out["llama_groups"] = sorted({type(x).__name__ for x in m.modules() if type(x).__name__.startswith("FSDP")})
    out["llama_fsdp_losses"] = _train(m, lmine, _llama_loss, make_opt(qdist.trainable_parameters(m)), reduce=True)
    out["llama_whole"] = sorted(n for n, p in m.named_parameters() if type(p).__name__ != "DTensor")
    # the same with the embedding tables sharded too
    m = _llama()
    qdist.wrap_model(m, fsdp, replicate_embeddings=False)
    out["llama_sharded_tables_whole"] = sorted(n for n, p in m.named_parameters() if type(p).__name__ != "DTensor")
    out["llama_sharded_tables_losses"] = _train(m, lmine, _llama_loss, make_opt(qdist.trainable_parameters(m)),
                                                reduce=True)

    # ... and with bfloat16 mixed precision: the kept tables compute in bfloat16 like everything else
    m = _llama()
    qdist.wrap_model(m, fsdp, mixed_precision=torch.bfloat16)
    out["llama_mp_table_dtypes"] = {m.model.embed_tokens.weight.dtype, m.lm_head.weight.dtype}
    out["llama_mp_losses"] = _train(m, lmine, _llama_loss, make_opt(qdist.trainable_parameters(m)), reduce=True)

    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    qdist.cleanup(ctx)


def _full_trainable(model):
    return {n: p.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint_round_trip(m, opt, first, outdir, mine, make_opt, rank, fsdp, out):
    ckpt = os.path.join(outdir, "ckpt")
    qdist.save_adapter_distributed(m, ckpt, optimizer=opt, extra={"step": 2})
    qdist.save_adapter_distributed(m, os.path.join(outdir, "ckpt-sharded"), optimizer=opt, extra={"step": 2},
                                   sharded_optimizer=True)
    saved_lora = _full_trainable(m)
    out["ckpt_uninterrupted"] = first + _train(m, mine, _mlp_loss, opt, steps=2, reduce=True)
    out["ckpt_uninterrupted_params"] = _full_trainable(m)
    out["ckpt_resume"] = _resume(ckpt, mine, make_opt, fsdp)
    out["ckpt_edited"] = _load_edited(ckpt, os.path.join(outdir, f"ckpt-edited{rank}"), fsdp)
    if rank == 0:  # the files are a plain PEFT adapter: they load in one process
        single = _mlp()
        load_adapter(single, ckpt)
        got = dict(single.named_parameters())
        out["ckpt_adapter_file_matches"] = all(torch.equal(got[n], t) for n, t in saved_lora.items())
        # and the full optimizer state resumes there too: resharded from 2 ranks to 1 (for the 8-bit
        # state, other blocks than the ranks': requantized once, so close rather than bit-identical)
        opt1 = make_opt(qdist.trainable_parameters(single))
        opt1.load_state_dict(torch.load(os.path.join(ckpt, qdist.OPTIMIZER_FILE), weights_only=False)["optimizer"])
        out["ckpt_single_losses"] = _train(single, _mlp_data(), _mlp_loss, opt1, steps=2)
        out["ckpt_single_inexact"] = getattr(opt1, "inexact_blocks_loaded", 0)


def _load_edited(ckpt, copy, fsdp):
    """The adapter with another lora_alpha (its scaling must follow), and with another r (refused, as
    load_adapter refuses it, before anything changes)."""
    got = {}
    for field, change in (("lora_alpha", 3.0), ("r", 1)):
        path = f"{copy}-{field}"
        shutil.copytree(ckpt, path)
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        cfg[field] += change
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
        m = _mlp()
        qdist.wrap_model(m, fsdp)
        try:
            qdist.load_adapter_distributed(m, path)
            got[field] = {"alpha": cfg["lora_alpha"], "r": cfg["r"],
                          "scaling": sorted({layer.scaling["default"] for _, layer in lora_layers(m)})}
        except ValueError as exc:
            got[field] = str(exc)
    return got


def _resume(ckpt, mine, make_opt, fsdp):
    """Load `ckpt` into a new model and optimizer, train 2 steps: what they saw."""
    m = _mlp()
    with torch.no_grad():  # other adapters than the checkpoint's, so that loading must change them
        for p in qdist.trainable_parameters(m):
            p.normal_(0, 0.3)
    qdist.wrap_model(m, fsdp)
    opt = make_opt(qdist.trainable_parameters(m))
    extra = qdist.load_adapter_distributed(m, ckpt, optimizer=opt)
    losses = _train(m, mine, _mlp_loss, opt, steps=2, reduce=True)
    return {"extra": extra, "losses": losses, "params": _full_trainable(m),
            "inexact_blocks": getattr(opt, "inexact_blocks_loaded", 0)}


def _resume_worker(rank, port, outdir, opt_name):
    """Fresh processes: resume from the sharded checkpoint the first run wrote."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = qdist.setup("fsdp")
    lo, hi = qdist.local_batch(GLOBAL_BATCH, ctx)
    got = _resume(os.path.join(outdir, "ckpt-sharded"), _slice(_mlp_data(), lo, hi), OPTIMIZERS[opt_name], ctx)
    torch.save(got, os.path.join(outdir, f"resumed{rank}.pt"))
    qdist.cleanup(ctx)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tests using this fixture are marked slow: per optimizer it spawns two processes twice
# (about 80 s on a shared 2-core machine); CI still runs them (pyproject.toml: slow tests run in CI).
@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def run(request, tmp_path_factory):
    import torch.multiprocessing as mp

    outdir = str(tmp_path_factory.mktemp(f"dist-{request.param}"))
    mp.spawn(_worker, args=(_free_port(), outdir, request.param), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    mp.spawn(_resume_worker, args=(_free_port(), outdir, request.param), nprocs=WORLD, join=True)
    for r in range(WORLD):
        ranks[r]["ckpt_resume_fresh"] = torch.load(os.path.join(outdir, f"resumed{r}.pt"), weights_only=False)
    make_opt = OPTIMIZERS[request.param]
    single = {}
    m = _mlp()
    single["mlp"] = _train(m, _mlp_data(), _mlp_loss, make_opt(qdist.trainable_parameters(m)))
    single["optimizer"] = request.param
    single["mlp_trainable"] = sum(p.numel() for p in qdist.trainable_parameters(m))
    single["mlp_frozen_names"] = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    m = _llama()
    single["llama_tables"] = sorted(n for n, p in m.named_parameters()
                                    if n in ("model.embed_tokens.weight", "lm_head.weight") and not p.requires_grad)
    single["llama"] = _train(m, _llama_data(), _llama_loss, make_opt(qdist.trainable_parameters(m)))
    return ranks, single


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=1e-6)


@pytest.mark.slow
def test_ddp_matches_single_process_and_reduces_only_lora(run):
    ranks, single = run
    for r in ranks:
        _close(r["ddp_losses"], single["mlp"])
        assert r["ddp_reduced_per_step"] == single["mlp_trainable"]  # no frozen parameter in the all-reduce
        assert r["ddp_ignored"] == single["mlp_frozen_names"]  # nor in DDP's start-up broadcast
        assert r["ddp_frozen_grads"] == []


@pytest.mark.slow
def test_wrap_refuses_ranks_with_different_frozen_weights(run):
    ranks, _ = run
    for r in ranks:
        for kind in ("ddp", "fsdp"):
            assert r[f"{kind}_mismatch_error"] and "differ between ranks" in r[f"{kind}_mismatch_error"]


@pytest.mark.slow
def test_fsdp_matches_single_process_and_shards_the_4bit_weights(run):
    ranks, single = run
    for r in ranks:
        _close(r["fsdp_losses"], single["mlp"], rtol=FSDP_RTOL.get(single["optimizer"], 1e-5))
        assert r["fsdp_codes_intact"] and r["fsdp_storage_dtypes"] == {torch.uint8}
        assert r["fsdp_lora_is_dtensor"]
        # every parameter is split in two (up to one padding row per tensor): less than DDP's copy
        assert r["fsdp_bytes"]["frozen"] < 0.6 * r["ddp_bytes"]["frozen"]
        assert r["fsdp_bytes"]["trainable"] <= 0.6 * r["ddp_bytes"]["trainable"]
        assert r["fsdp_bytes"]["total"] < 0.6 * r["ddp_bytes"]["total"]
        assert r["unsharded_bytes"] == r["ddp_bytes"]
        assert r["fsdp_unsharded_views"] == []


@pytest.mark.slow
def test_fsdp_holds_fewer_parameter_and_optimizer_bytes_per_rank_than_ddp(run):
    """Issue 9: per-rank memory under FSDP lower than DDP's, counted exactly from local shards."""
    ranks, _ = run
    for r in ranks:
        for kind in ("ddp", "fsdp"):
            counted, own = r[f"{kind}_state_bytes"]
            assert counted == own > 0  # the local count agrees with the paged optimizer's own
        ddp = r["ddp_bytes"]["total"] + r["ddp_state_bytes"][0]
        fsdp = r["fsdp_bytes"]["total"] + r["fsdp_state_bytes"][0]
        assert r["fsdp_state_bytes"][0] < 0.6 * r["ddp_state_bytes"][0]
        assert fsdp < 0.6 * ddp
    frozen = sum(r["fsdp_bytes"]["frozen"] for r in ranks)
    assert frozen >= ranks[0]["ddp_bytes"]["frozen"]  # the shards cover the whole


@pytest.mark.slow
def test_fsdp_bfloat16_mixed_precision_keeps_the_codes(run):
    ranks, single = run
    for r in ranks:
        assert r["mp_codes_intact"] and r["mp_storage_dtypes"] == {torch.uint8}
        _close(r["mp_losses"], single["mlp"], rtol=3e-2)  # bf16 compute, same trajectory


@pytest.mark.slow
def test_fsdp_checkpoint_resume_is_bit_identical(run):
    """Save after 2 steps, resume (same processes from the full state dict; fresh processes from the
    sharded DCP checkpoint), train 2 more: parameters and losses equal the uninterrupted run's bit for
    bit, for the 8-bit state too (its decoded moments requantize to the same codes and scales)."""
    ranks, _ = run
    for r in ranks:
        want = r["ckpt_uninterrupted_params"]
        for how in ("ckpt_resume", "ckpt_resume_fresh"):
            got = r[how]
            assert got["extra"] == {"step": 2}
            assert got["losses"] == r["ckpt_uninterrupted"][2:], how
            assert got["params"].keys() == want.keys()
            assert all(torch.equal(got["params"][n], want[n]) for n in want), how
            assert got["inexact_blocks"] == 0
    assert ranks[0]["ckpt_adapter_file_matches"]
    for r in ranks:  # an edited adapter under FSDP: checked as load_adapter checks it
        edited = r["ckpt_edited"]
        assert edited["lora_alpha"]["scaling"] == [edited["lora_alpha"]["alpha"] / edited["lora_alpha"]["r"]]
        assert "expected" in edited["r"] and "adapter_config.json gives r" in edited["r"], edited["r"]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(run):
    """The full FSDP optimizer state (2 ranks) loads into a one-process optimizer and continues."""
    ranks, single = run
    r = ranks[0]
    _close(r["ckpt_single_losses"], r["ckpt_uninterrupted"][2:], rtol=FSDP_RTOL.get(single["optimizer"], 1e-5))
    if single["optimizer"] == "paged_adamw8bit":
        assert r["ckpt_single_inexact"] > 0  # the blocks were the ranks' shards': requantized, and counted


@pytest.mark.slow
def test_fsdp_hugging_face_llama_matches_single_process(run):
    ranks, single = run
    for r in ranks:
        assert r["llama_groups"]  # fully_shard turned the decoder layers into FSDP modules
        _close(r["llama_fsdp_losses"], single["llama"], rtol=FSDP_RTOL.get(single["optimizer"], 1e-5))
        _close(r["llama_sharded_tables_losses"], single["llama"], rtol=FSDP_RTOL.get(single["optimizer"], 1e-5))
        # by default the frozen embedding tables stay whole on every rank (never gathered); on request they
        # are sharded like everything else
        assert "model.embed_tokens.weight" in single["llama_tables"]
        assert r["llama_whole"] == single["llama_tables"]
        assert r["llama_sharded_tables_whole"] == []
        assert r["llama_mp_table_dtypes"] == {torch.bfloat16}
        _close(r["llama_mp_losses"], single["llama"], rtol=3e-2)  # bf16 compute, same trajectory


# ----------------------------------------------------------------------------- without a process group
def test_single_process_api():
    ctx = qdist.setup("none")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    m = _mlp()
    assert qdist.wrap_model(m, ctx) is m
    assert qdist.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert qdist.local_batch(8) == (0, 8)


def test_embedding_tables_kept_whole_are_the_frozen_dense_ones():
    """What wrap_model hands FSDP as ignored_params: each frozen dense embedding weight once."""
    transformers = pytest.importorskip("transformers")
    m = _llama()  # untied: an input table and a dense (not adapted) output head
    assert {id(w) for w in qdist._embedding_tables(m)} == {id(m.model.embed_tokens.weight), id(m.lm_head.weight)}
    m.lm_head.weight.requires_grad_(True)  # a trained table is sharded like any trainable weight
    assert [id(w) for w in qdist._embedding_tables(m)] == [id(m.model.embed_tokens.weight)]
    cfg = tiny_llama_config(transformers, num_hidden_layers=1, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(cfg)
    prepare_model(tied, LoraConfig(r=4, lora_alpha=8))
    assert [id(w) for w in qdist._embedding_tables(tied)] == [id(tied.lm_head.weight)]  # one Parameter, once
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert qdist._embedding_tables(_mlp()) == []


_OLD_TORCH_SCRIPT = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from pyqlora import distributed as qdist
sys.path.insert(0, sys.argv[2])
from test_distributed import _llama, _llama_data, _llama_loss
fully_shard, policy = qdist._fully_shard_api()
def old_fully_shard(module, *, mesh=None, reshard_after_forward=None, mp_policy=policy()):  # torch < 2.7
    return fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
qdist._fully_shard_api = lambda: (old_fully_shard, policy)
ctx = qdist.setup("fsdp")
m = _llama()
qdist.wrap_model(m, ctx)
whole = [n for n, p in m.named_parameters() if type(p).__name__ != "DTensor"]
loss = _llama_loss(m, _llama_data())
loss.backward()
print("WHOLE", whole, "LOSS", float(loss))
qdist.cleanup(ctx)
"""


@pytest.mark.slow
def test_fsdp_without_ignored_params_shards_the_tables(tmp_path):
    """On torch < 2.7 fully_shard has no ignored_params: wrap_model then shards the tables too and trains."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _OLD_TORCH_SCRIPT, str(_free_port()), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("WHOLE")][-1]
    assert line.startswith("WHOLE [] LOSS ")
    assert float(line.split()[-1]) > 0


def test_setup_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="distributed kind"):
        qdist.setup("zero")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torchrun"):
            qdist.setup("ddp")
        with pytest.raises(RuntimeError, match="setup first"):
            qdist.wrap_model(_mlp(), "fsdp")
    with pytest.raises(ValueError, match="not divisible"):
        qdist.local_batch(7, qdist.DistContext("ddp", rank=0, world_size=2))
