"""The frozen 4-bit base in a pager (issue 23): bit-identical to the resident base, within budget."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyqlora as pq  # noqa: E402
from pyqlora.lora import LoraConfig, lora_layers, prepare_model  # noqa: E402
from support import tiny_llama_config, train_lora_steps  # noqa: E402

# layers of 96 x 320 .. 320 x 96 (15 KiB of codes each) and a budget of 8 KiB: less than one layer
SHAPE = dict(hidden_size=96, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
BUDGET = 8 << 10


def _model(checkpointing):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(transformers, **SHAPE))
    return model, LoraConfig(r=4, lora_alpha=8, gradient_checkpointing=checkpointing)


_run = train_lora_steps


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lookahead", [0, 2])
def test_paged_base_is_bit_identical_to_the_resident_base(tmp_path, checkpointing, lookahead):
    model, cfg = _model(checkpointing)
    prepare_model(model, cfg)
    model.train()
    want = _run(model)

    paged, cfg = _model(checkpointing)
    pager = pq.Pager(budget_bytes=BUDGET, spill_dir=tmp_path, page_bytes=4096)
    report = prepare_model(paged, cfg, pager=pager, lookahead=lookahead)
    paged.train()
    layers = [m.base_layer for _, m in lora_layers(paged)]
    largest = max(q.quantized.nbytes for q in layers)
    assert largest > BUDGET  # the budget holds less than one layer
    assert report.paging.stats()["base_bytes"] == sum(sum(t.nbytes for t in q.quant_parameters()) for q in layers)
    before = pager.stats()
    got = _run(paged)

    assert torch.equal(got[0], want[0])                                   # logits
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])       # adapters after 2 steps
    s = report.paging.stats()
    assert s["page_ins"] > before["page_ins"] and s["page_outs"] > before["page_outs"]  # it really paged
    assert s["wait_seconds"] >= 0 and s["layer_calls"] >= len(layers) * 2  # forward and backward of every layer
    # the decoded float32 scales (and cached views) are held by the layer that ran last only, not by the base
    assert sum(q._q_cache is not None for q in layers) <= 1
    # the pager's promise, "within budget after any prefetch" (mincore also counts evicted pages the page
    # cache has not dropped yet; the next prefetch's sweep finds and evicts them)
    pager.prefetch(layers[0].weight)
    assert pager.stats()["resident_bytes"] <= BUDGET + largest
    report.paging.remove()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_resident_base_in_training_keeps_decoded_scales_for_the_running_layer_only(checkpointing, monkeypatch):
    """prepare_model without a pager: in training, the decoded float32 block scales (an eighth of the codes'
    bytes) of a layer are dropped when the next one runs; in eval every layer keeps them (generation).
    Oracle: the same model with those hooks removed gives the same logits, gradients and updates."""
    from pyqlora._glue.paging import RunningLayerScales

    small, cfg = _model(checkpointing)
    prepare_model(small, cfg)
    small.train()
    _run(small)  # layers under RunningLayerScales.min_weights keep their scales
    assert all(m.base_layer._q_cache is not None for _, m in lora_layers(small))
    monkeypatch.setattr(RunningLayerScales, "min_weights", 0)  # the tiny layers stand for large ones
    model, cfg = _model(checkpointing)
    prepare_model(model, cfg)
    layers = [m.base_layer for _, m in lora_layers(model)]
    model.train()
    got = _run(model)
    assert sum(q._q_cache is not None for q in layers) <= 1

    plain, cfg = _model(checkpointing)
    prepare_model(plain, cfg)
    plain._pyqlora_running_scales.remove()
    plain.train()
    want = _run(plain)
    assert all(q._q_cache is not None for _, m in lora_layers(plain) for q in [m.base_layer])  # kept: the oracle
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])

    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(1, 9).view(1, 8))
    assert all(q._q_cache is not None for q in layers)  # generation keeps every layer's scales


def test_loading_into_the_pager_stays_within_budget(tmp_path):
    """The bytes go into the pager as each layer is quantized: the base never sits in RAM whole."""
    model, cfg = _model(False)
    pager = pq.Pager(budget_bytes=BUDGET, spill_dir=tmp_path, page_bytes=4096)
    report = prepare_model(model, cfg, pager=pager)
    s = pager.stats()
    base = report.paging.stats()["base_bytes"]
    assert s["allocated_bytes"] >= base > 4 * BUDGET
    # written back while loading; mincore may still count evicted pages the page cache keeps until the
    # pager's next sweep, so the check here is that most of the base is out of RAM, not the exact budget
    assert s["page_outs"] > 0 and s["resident_bytes"] < s["allocated_bytes"] / 2
    for _, m in lora_layers(model):  # the layers view pager memory
        q = m.base_layer.quantized
        pager.prefetch(q.packed)      # raises ValueError for memory outside the pager
        assert isinstance(q.packed, np.ndarray)
    report.paging.remove()


def test_bad_pager_arguments(tmp_path):
    model, cfg = _model(False)
    with pytest.raises(TypeError, match="pager must be a pyqlora.Pager"):
        prepare_model(model, cfg, pager="8G")
    with pytest.raises(ValueError, match="lookahead"):
        prepare_model(model, cfg, pager=pq.Pager(spill_dir=tmp_path), lookahead=-1)


def test_layers_are_laid_end_to_end_in_the_pager(tmp_path):
    # one arena chunk for the whole base, each array 64-byte aligned (the float32 nested scales are
    # read through a float32 view), and the bytes read per step no more than the layers' own bytes
    # times the passes (no padding pages, no prefetch that wraps past the ends of the order)
    model, cfg = _model(True)
    page, budget = 4096, 96 << 10  # about half the base: layers stay resident between their uses
    pager = pq.Pager(budget_bytes=budget, spill_dir=tmp_path, page_bytes=page)
    report = prepare_model(model, cfg, pager=pager, lookahead=2)
    layers = [m.base_layer for _, m in lora_layers(model)]
    assert budget < report.paging.stats()["base_bytes"] < 2.5 * budget
    arrays = [t for q in layers for t in q.quant_parameters()]
    assert pager.stats()["num_allocations"] == 1 < len(arrays)
    assert all(t.data_ptr() % 64 == 0 for t in arrays)
    ptrs = sorted((t.data_ptr(), t.numel()) for t in arrays)
    assert all(a + n <= b for (a, n), (b, _) in zip(ptrs, ptrs[1:]))  # no overlap
    model.train()
    _run(model, steps=1)  # the first step learns the order
    before = report.paging.stats()
    _run(model, steps=1)
    after = report.paging.stats()
    read = after["page_in_bytes"] - before["page_in_bytes"]
    # forward, recomputed forward and backward each read at most the base plus one page per layer boundary
    assert 0 < read <= 3 * (after["base_bytes"] + len(layers) * page)


@pytest.mark.parametrize("paged", [False, True])
def test_adapters_are_summed_in_place_under_pyqlora_own_hooks(tmp_path, paged, monkeypatch):
    """prepare_model hooks every base layer (RunningLayerScales, or BasePaging for a paged base). Those hooks
    neither keep nor change the base's output, so LoraLinear4bit still sums the adapters into it in place
    (addmm_, docs/scale.md): their presence once sent every layer down PEFT's expression, unnoticed, as both
    give the same values. A hook of the user's on a base layer still does."""
    from pyqlora._glue.paging import RunningLayerScales

    monkeypatch.setattr(RunningLayerScales, "min_weights", 0)  # hooks on these small layers too
    model, cfg = _model(checkpointing=False)
    pager = pq.Pager(budget_bytes=BUDGET, spill_dir=tmp_path, page_bytes=4096) if paged else None
    report = prepare_model(model, cfg, pager=pager)
    layers = [m for _, m in lora_layers(model)]
    assert all(m.base_layer._forward_hooks for m in layers)  # pyqlora's own
    seen = []

    def last_op(mod, args, out):  # the node before the reshape back to (batch, seq, features)
        fn = out.grad_fn
        seen.append(type(fn.next_functions[0][0] if type(fn).__name__ == "ViewBackward0" else fn).__name__)

    for m in layers:
        m.register_forward_hook(last_op)
    model.train()
    ids = torch.randint(0, 64, (1, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == len(layers) and set(seen) == {"AddmmBackward0"}
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)
    seen.clear()
    layers[0].base_layer.register_forward_hook(lambda mod, args, out: None)  # the user's: may keep the output
    model(input_ids=ids, labels=ids)
    assert seen[0] == "AddBackward0" and set(seen[1:]) == {"AddmmBackward0"}
    if report.paging is not None:
        report.paging.remove()
