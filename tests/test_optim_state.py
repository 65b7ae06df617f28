"""The paged optimizers' state: empty parameters.

Issue 18 (item 6a): a zero-size parameter with 8-bit state (``min_8bit_size=0``)
steps, saves and loads.
"""
from collections.abc import Mapping

import pytest

torch = pytest.importorskip("torch")

import pyqlora as pq
from pyqlora.optim import PagedAdamW, PagedAdamW8bit

KINDS = ("32bit", "8bit")
CODED = ("state1", "state2", "absmax1", "absmax2")


# ----------------------------------------------------------------------------- a tiny model and its run
def _params(seed=0):
    """w1 (320: five 8-bit blocks of 64), b1 (32-bit), w2 (100: two 8-bit blocks, one short), b2, frozen."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (20, 16), "b1": (20,), "w2": (5, 20), "b2": (5,), "frozen": (4,)}
    ps = {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in shapes.items()}
    ps["frozen"].requires_grad_(False)
    return ps


def _groups(ps):
    return [{"params": [ps["w1"], ps["b1"]]},
            {"params": [ps["w2"], ps["b2"], ps["frozen"]], "lr": 5e-3, "weight_decay": 0.0}]


def _optimizer(kind, ps, **kw):
    if kind == "32bit":
        return PagedAdamW(_groups(ps), lr=1e-2, **kw)
    return PagedAdamW8bit(_groups(ps), lr=1e-2, min_8bit_size=64, blocksize=64, **kw)


def _step(ps, opt, i, skip=()):
    """One step with gradients drawn from seed i (None for the names in `skip` and the frozen one)."""
    g = torch.Generator().manual_seed(1000 + i)
    for name, p in ps.items():
        p.grad = None if (name in skip or not p.requires_grad) else torch.randn(p.shape, generator=g)
    opt.step()


def _run(kind, steps=3, **kw):
    """A deterministic run: `steps` steps; b2 never gets a gradient, so it has no state."""
    ps = _params()
    opt = _optimizer(kind, ps, **kw)
    for i in range(steps):
        _step(ps, opt, i, skip=("b2",))
    return ps, opt


def _same(a, b):
    """Equal nested state dicts: same keys and types, tensors of the same dtype, shape and values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_untouched(kind, ps, opt, before, counters=None):
    """After a failed load: the same state dict, and the next steps equal an untouched run's, bit for bit."""
    assert _same(opt.state_dict(), before)
    assert [p for g in opt.param_groups for p in g["params"]] == [p for g in _groups(ps) for p in g["params"]]
    if counters is not None:
        assert (opt.skipped_elements, opt.inexact_blocks_loaded) == counters
    ref_ps, ref_opt = _run(kind)
    for i in range(3, 5):
        _step(ps, opt, i)
        _step(ref_ps, ref_opt, i)
    for name in ps:
        assert torch.equal(ps[name], ref_ps[name]), name
    assert _same(opt.state_dict(), ref_opt.state_dict())


def _expect_failure(kind, mutate, exc, match):
    ps, opt = _run(kind)
    before = opt.state_dict()
    counters = (opt.skipped_elements, opt.inexact_blocks_loaded) if kind == "8bit" else None
    sd = opt.state_dict()
    sd = mutate(sd) or sd
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    _assert_untouched(kind, ps, opt, before, counters)


def _decoded(sd, blocksize=64):
    """The state dict with every 8-bit moment decoded to exp_avg / exp_avg_sq (an FSDP checkpoint's form)."""
    def decode(codes, absmax, signed):
        if codes.numel() == 0:  # an empty parameter: nothing to decode
            return torch.zeros(0)
        return torch.from_numpy(pq.dequantize_blockwise(codes.numpy(), absmax.numpy(), blocksize=blocksize,
                                                        codebook=pq.dynamic_codebook(signed=signed)))

    for entry in sd["state"].values():
        if "state1" in entry:
            entry["exp_avg"] = decode(entry.pop("state1"), entry.pop("absmax1"), True)
            entry["exp_avg_sq"] = decode(entry.pop("state2"), entry.pop("absmax2"), False)
    return sd


# ----------------------------------------------------------------------------- empty parameters
def test_paged_adamw8bit_steps_an_empty_parameter():
    """min_8bit_size=0 puts a zero-size parameter in 8 bits; its update is a no-op (the kernel takes n >= 1)."""
    torch.manual_seed(0)
    empty, w = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.randn(300))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = PagedAdamW8bit([empty, w], min_8bit_size=0, lr=1e-2)
    ref = PagedAdamW8bit([w_ref], min_8bit_size=0, lr=1e-2)
    for _ in range(3):
        g = torch.randn(300)
        empty.grad, w.grad, w_ref.grad = torch.empty(0), g, g.clone()
        opt.step()
        ref.step()
    assert empty.shape == (0,) and torch.equal(w, w_ref)
    st = opt.state[empty]
    assert st["state1"].numel() == 0 and st["absmax1"].numel() == 0 and float(st["step"]) == 3.0
    # its state saves and loads, as codes and as decoded moments (an FSDP checkpoint of an empty shard)
    sd = opt.state_dict()
    for form in (sd, _decoded(opt.state_dict(), blocksize=256)):
        e2, w2 = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(w.detach().clone())
        opt2 = PagedAdamW8bit([e2, w2], min_8bit_size=0, lr=1e-2)
        opt2.load_state_dict(form)
        if form is sd:
            assert _same(opt2.state_dict(), sd)
        e2.grad, w2.grad = torch.empty(0), torch.ones(300)
        opt2.step()


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_parameter_trains_like_torch_adamw(kind):
    """PagedAdamW (and PagedAdamW8bit's 32-bit state) with a zero-size parameter: torch.optim.AdamW's result."""
    torch.manual_seed(1)
    ours = [torch.nn.Parameter(torch.empty(0, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = PagedAdamW(ours, lr=1e-2) if kind == "32bit" else PagedAdamW8bit(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for _ in range(3):
        g = torch.randn(7)
        ours[0].grad, ours[1].grad = torch.empty(0, 3), g
        theirs[0].grad, theirs[1].grad = torch.empty(0, 3), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours[1], theirs[1]) and ours[0].shape == (0, 3)
    assert _same(opt.state_dict()["state"], ref.state_dict()["state"])


