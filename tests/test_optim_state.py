"""The paged optimizers' state: failed loads change nothing, copies, pickles, empty parameters.

Issue 18 (items 4 and 6): ``load_state_dict`` checks the whole dict before it
changes anything; a bad dict raises ValueError (TypeError for a wrong type or
dtype) naming the parameter and the key, and the optimizer steps on exactly as
an untouched one (the oracle: a second, identical run that never saw the bad
dict). ``copy.deepcopy`` and pickling behave as for ``torch.optim.AdamW``.
"""
import copy
import io
import math
import pickle
import random
import warnings
from collections.abc import Mapping

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given
from hypothesis import strategies as st

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


# parameter ids of the state dict: w1 0, b1 1, w2 2, b2 3 (no state), frozen 4 (no state)
W1, B1, W2, B2, FROZEN = range(5)


def _set(idx, key, value):
    def mutate(sd):
        sd["state"][idx][key] = value(sd["state"][idx][key]) if callable(value) else value
    return mutate


def _drop(idx, key):
    def mutate(sd):
        del sd["state"][idx][key]
    return mutate


def _group(gi, key, value):
    def mutate(sd):
        if value is _drop:
            del sd["param_groups"][gi][key]
        else:
            sd["param_groups"][gi][key] = value
    return mutate


def _nan_at(i):
    def f(t):
        t = t.clone()
        t.view(-1)[i] = float("nan")
        return t
    return f


# (name, kind, mutation, exception, message): one per failure mode of issue 18, item 4
FAILURES = [
    # structure
    ("not a mapping", "32bit", lambda sd: [sd], TypeError, "mapping"),
    ("no state", "8bit", lambda sd: {"param_groups": sd["param_groups"]}, ValueError, "lacks 'state'"),
    ("state not a mapping", "32bit", lambda sd: {**sd, "state": list(sd["state"].values())}, TypeError, "'state'"),
    ("one group fewer", "32bit", lambda sd: {**sd, "param_groups": sd["param_groups"][:1]}, ValueError,
     "1 parameter groups, this optimizer has 2"),
    ("param count", "8bit", _group(1, "params", [2, 3]), ValueError, r"param_groups\[1\] lists 2 parameters"),
    ("param listed twice", "32bit", _group(1, "params", [2, 1, 4]), ValueError, "parameter id 1 is listed twice"),
    ("state of an unlisted id", "32bit", lambda sd: sd["state"].__setitem__(7, sd["state"][B1]), ValueError,
     "parameter 7, but no parameter group lists it"),
    ("state of a frozen parameter", "32bit", lambda sd: sd["state"].__setitem__(FROZEN, {
        "step": torch.tensor(3.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}), ValueError,
     "parameter 4 .*does not require grad"),
    ("entry not a mapping", "8bit", lambda sd: sd["state"].__setitem__(W2, [1, 2]), TypeError, "parameter 2"),
    # keys
    ("missing key", "32bit", _drop(W1, "exp_avg_sq"), ValueError, r"parameter 0 .*lacks \['exp_avg_sq'\]"),
    ("missing 8-bit key", "8bit", _drop(W1, "absmax2"), ValueError, r"parameter 0 .*lacks \['absmax2'\]"),
    ("missing step", "8bit", _drop(B1, "step"), ValueError, r"parameter 1 .*lacks \['step'\]"),
    ("extra key", "32bit", _set(B1, "max_exp_avg_sq", torch.zeros(20)), ValueError,
     r"parameter 1 .*unexpected keys \['max_exp_avg_sq'\]"),
    ("codes and decoded moments at once", "8bit", _set(W1, "exp_avg", torch.zeros(320)), ValueError,
     r"parameter 0 .*unexpected keys \['exp_avg'\]"),
    ("8-bit codes for a 32-bit parameter", "8bit", _set(B1, "state1", torch.zeros(20, dtype=torch.uint8)),
     ValueError, r"parameter 1 .*unexpected keys \['state1'\]"),
    ("8-bit codes for PagedAdamW", "32bit",
     lambda sd: sd["state"].__setitem__(W1, _run("8bit")[1].state_dict()["state"][W1]), ValueError,
     r"parameter 0 .*lacks \['exp_avg', 'exp_avg_sq'\]"),
    # element counts and shapes
    ("too few elements", "32bit", _set(W1, "exp_avg", lambda t: t.reshape(-1)[:-1]), ValueError,
     r"'exp_avg' of parameter 0 of shape \(20, 16\) has 319 elements, expected 320"),
    ("wrong shape", "32bit", _set(W1, "exp_avg_sq", lambda t: t.reshape(16, 20)), ValueError,
     r"'exp_avg_sq' of parameter 0 .*has shape \(16, 20\)"),
    ("wrong shape of codes", "8bit", _set(W2, "state2", lambda t: t.reshape(2, 50)), ValueError,
     r"'state2' of parameter 2 .*shape \(2, 50\)"),
    ("absmax count (block layout)", "8bit", _set(W1, "absmax1", lambda t: torch.cat([t, t[:1]])), ValueError,
     r"'absmax1' of parameter 0 .*has 6 elements, expected 5"),
    ("absmax count of a short block", "8bit", _set(W2, "absmax2", lambda t: t[:1]), ValueError,
     r"'absmax2' of parameter 2 .*has 1 elements, expected 2"),
    ("decoded moment with another element count", "8bit",
     lambda sd: _decoded(sd)["state"][W2].__setitem__("exp_avg", torch.zeros(99)), ValueError,
     r"'exp_avg' of parameter 2 .*99 elements"),
    # dtypes
    ("integer moment", "32bit", _set(B1, "exp_avg", lambda t: t.to(torch.int32)), TypeError,
     r"'exp_avg' of parameter 1 .*floating"),
    ("complex moment", "32bit", _set(B1, "exp_avg_sq", lambda t: t.to(torch.complex64)), TypeError,
     r"'exp_avg_sq' of parameter 1"),
    ("codes not uint8", "8bit", _set(W1, "state1", lambda t: t.to(torch.int16)), TypeError,
     r"'state1' of parameter 0 .*uint8"),
    ("absmax not float32", "8bit", _set(W2, "absmax1", lambda t: t.double()), TypeError,
     r"'absmax1' of parameter 2 .*float32"),
    ("moment not a tensor", "32bit", _set(B1, "exp_avg", lambda t: t.tolist()), TypeError,
     r"'exp_avg' of parameter 1 .*must be a tensor"),
    # values
    ("NaN moment", "32bit", _set(W1, "exp_avg", _nan_at(17)), ValueError, r"'exp_avg' of parameter 0 .*not finite"),
    ("Inf second moment", "8bit", _set(B1, "exp_avg_sq", lambda t: t.clone().fill_(float("inf"))), ValueError,
     r"'exp_avg_sq' of parameter 1 .*not finite"),
    ("moment that overflows float32", "32bit", _set(B1, "exp_avg", lambda t: t.double() * 1e300), ValueError,
     r"'exp_avg' of parameter 1 .*not finite"),
    ("negative second moment", "32bit", _set(B1, "exp_avg_sq", lambda t: -1.0 - t), ValueError,
     r"'exp_avg_sq' of parameter 1 .*negative"),
    ("NaN absmax", "8bit", _set(W1, "absmax2", _nan_at(4)), ValueError, r"'absmax2' of parameter 0 .*not finite"),
    ("negative absmax", "8bit", _set(W2, "absmax1", lambda t: -t), ValueError, r"'absmax1' of parameter 2 .*negative"),
    ("NaN decoded moment", "8bit", lambda sd: _set(W1, "exp_avg", _nan_at(0))(_decoded(sd)), ValueError,
     r"'exp_avg' of parameter 0 .*not finite"),
    # step
    ("negative step", "32bit", _set(W1, "step", torch.tensor(-1.0)), ValueError, r"parameter 0 .*'step'"),
    ("NaN step", "8bit", _set(W1, "step", torch.tensor(float("nan"))), ValueError, r"parameter 0 .*'step'"),
    ("fractional step", "8bit", _set(B1, "step", 2.5), ValueError, r"parameter 1 .*'step'"),
    ("huge step", "8bit", _set(W1, "step", 1e30), ValueError, r"parameter 0 .*'step'"),
    ("step of two elements", "32bit", _set(B1, "step", torch.tensor([1.0, 2.0])), ValueError,
     r"parameter 1 .*'step'.*0-d"),
    ("step as a string", "32bit", _set(B1, "step", "3"), TypeError, r"parameter 1 .*'step'"),
    ("step as a bool", "8bit", _set(W2, "step", True), TypeError, r"parameter 2 .*'step'"),
    # hyperparameters
    ("negative lr", "32bit", _group(1, "lr", -1.0), ValueError, r"param_groups\[1\]: lr"),
    ("lr a string", "8bit", _group(0, "lr", "0.1"), TypeError, r"param_groups\[0\]: lr must be a number"),
    ("lr a tensor", "32bit", _group(0, "lr", torch.tensor(0.1)), TypeError, r"param_groups\[0\]: lr"),
    ("beta of 1", "8bit", _group(0, "betas", (0.9, 1.0)), ValueError, r"param_groups\[0\]: betas\[1\]"),
    ("three betas", "32bit", _group(1, "betas", (0.9, 0.99, 0.999)), ValueError, r"param_groups\[1\]: betas"),
    ("NaN eps", "8bit", _group(1, "eps", float("nan")), ValueError, r"param_groups\[1\]: eps"),
    ("negative weight decay", "32bit", _group(0, "weight_decay", -0.1), ValueError,
     r"param_groups\[0\]: weight_decay"),
    ("missing weight decay", "8bit", _group(1, "weight_decay", _drop), ValueError,
     r"param_groups\[1\]: lacks the hyperparameter 'weight_decay'"),
    ("maximize", "32bit", _group(0, "maximize", True), ValueError, r"param_groups\[0\]: maximize"),
]


@pytest.mark.parametrize("name,kind,mutate,exc,match", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failed_load_changes_nothing(name, kind, mutate, exc, match):
    _expect_failure(kind, mutate, exc, match)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_entry_after_good_entries_changes_nothing(kind):
    """The defect of issue 18: the entries before the bad one were loaded, and step() then raised KeyError."""
    def mutate(sd):
        good = _run(kind, steps=5)[1].state_dict()  # other, valid values for every entry but the last
        state = {W1: good["state"][W1], B1: good["state"][B1]}
        bad = dict(sd["state"][W2])
        bad["step"] = torch.tensor(-3.0)
        state[W2] = bad  # the last one in the dict's order
        return {"state": state, "param_groups": sd["param_groups"]}
    _expect_failure(kind, mutate, ValueError, r"parameter 2 of shape \(5, 20\): 'step'")


def test_a_failed_load_of_decoded_moments_keeps_the_counter():
    """The requantization of good entries before a bad one is not counted (inexact_blocks_loaded)."""
    def mutate(sd):
        sd = _decoded(sd)
        sd["state"][W1]["exp_avg"] = sd["state"][W1]["exp_avg"] * 1.001  # no exact requantization: counted
        sd["state"][W2]["exp_avg_sq"] = -sd["state"][W2]["exp_avg_sq"] - 1.0
        return sd
    _expect_failure("8bit", mutate, ValueError, r"'exp_avg_sq' of parameter 2 .*negative")


def test_errors_name_the_parameter():
    ps = _params()
    named = [("w1", ps["w1"]), ("b1", ps["b1"])]
    opt = PagedAdamW(named, lr=1e-2)
    ps["w1"].grad = torch.ones_like(ps["w1"])
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:3]
    with pytest.raises(ValueError, match=r"parameter 0 \(w1\) of shape \(20, 16\)"):
        opt.load_state_dict(sd)


# ----------------------------------------------------------------------------- loads that succeed
@pytest.mark.parametrize("kind", KINDS)
def test_a_loaded_state_dict_comes_back_unchanged(kind):
    ps, opt = _run(kind)
    sd = opt.state_dict()
    ps2 = _params()
    opt2 = _optimizer(kind, ps2)
    opt2.load_state_dict(sd)
    assert _same(opt2.state_dict(), sd)  # the moments keep the parameter's shape, as after step()


def test_decoded_moments_load_into_8bit_state_exactly():
    ps, opt = _run("8bit")
    sd = opt.state_dict()
    opt2 = _optimizer("8bit", _params())
    opt2.load_state_dict(_decoded(opt.state_dict()))
    assert opt2.inexact_blocks_loaded == 0
    assert _same(opt2.state_dict(), sd)


def test_a_parameter_without_saved_state_starts_afresh_as_in_torch():
    """The loaded dict has no state for b1: like torch.optim.AdamW, b1 starts from zero moments and step 0,
    even though this optimizer had state for it (its paged slot held old moments)."""
    ps, opt = _run("32bit", steps=4)
    ref = {k: torch.nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad) for k, v in ps.items()}
    torch_opt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    sd = _run("32bit", steps=2)[1].state_dict()
    del sd["state"][B1]
    opt.load_state_dict(sd)
    torch_opt.load_state_dict(sd)
    assert B1 not in opt.state_dict()["state"]
    for i in range(3):
        _step(ps, opt, 10 + i)
        _step(ref, torch_opt, 10 + i)
    for name in ps:
        assert torch.equal(ps[name], ref[name]), name


def test_a_state_dict_of_live_paged_tensors_loads():
    """Values that are this optimizer's own paged tensors (here swapped between two parameters of one
    shape) are read before anything is written."""
    a, b = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))
    for kind in KINDS:
        opt = PagedAdamW([a, b]) if kind == "32bit" else PagedAdamW8bit([a, b], min_8bit_size=64)
        for i in range(2):
            a.grad, b.grad = torch.randn(300), torch.randn(300) * (i + 3)
            opt.step()
        sd = opt.state_dict()
        live = {"state": {0: dict(opt.state[b]), 1: dict(opt.state[a])}, "param_groups": sd["param_groups"]}
        opt.load_state_dict(live)
        assert _same(opt.state_dict()["state"], {0: sd["state"][1], 1: sd["state"][0]})


def test_group_hyperparameters_are_checked_at_construction():
    ps = _params()
    with pytest.raises(ValueError, match="parameter group: lr"):
        PagedAdamW([{"params": [ps["w1"]], "lr": -1.0}])
    with pytest.raises(TypeError, match="parameter group: eps must be a number"):
        PagedAdamW8bit([{"params": [ps["w1"]]}, {"params": [ps["b1"]], "eps": "small"}])
    with pytest.raises(TypeError, match="lr must be a number"):
        PagedAdamW([ps["w1"]], lr=None)


# ----------------------------------------------------------------------------- the property
def _mutate(sd, op, rnd, kind):
    """One corruption (or a valid change) of a state dict, chosen by `op`, its targets by `rnd`."""
    state, groups = sd["state"], sd["param_groups"]
    idx = rnd.choice(sorted(state, key=repr))
    entry = state[idx]
    key = rnd.choice(sorted(entry, key=repr))
    junk = [float("nan"), float("inf"), -1.0, 1e39, 0.5, "x", None, True, torch.tensor(0.1), torch.tensor([0.1]), []]
    if op == "drop_key":
        del entry[key]
    elif op == "rename_key":
        entry[rnd.choice(["exp_avg", "exp_avg_sq", "step", "junk", 0] + list(CODED))] = entry.pop(key)
    elif op == "add_key":
        entry[rnd.choice(["max_exp_avg_sq", "state1", "exp_avg"])] = torch.zeros(rnd.choice([1, 20, 320]))
    elif op == "reshape" and torch.is_tensor(entry[key]):
        t = entry[key].reshape(-1)
        entry[key] = rnd.choice([t[:-1], torch.cat([t, t[:1]]), t.reshape(1, -1), t[:0], t[::2]])
    elif op == "dtype" and torch.is_tensor(entry[key]) and not entry[key].is_complex():  # (no cast warning)
        entry[key] = entry[key].to(rnd.choice([torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                               torch.uint8, torch.bool, torch.complex64, torch.float32]))
    elif op == "value" and torch.is_tensor(entry[key]):
        t = entry[key].clone()
        if t.numel():
            v = rnd.choice([float("nan"), float("inf"), -float("inf"), -1.0, 3e38, 0.0, 1e-30])
            t.view(-1)[rnd.randrange(t.numel())] = v if t.is_floating_point() else rnd.choice([0, 7])
        entry[key] = t
    elif op == "step":
        entry["step"] = rnd.choice([torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor(2.5), 1e30,
                                    "3", torch.tensor([1.0, 2.0]), torch.tensor(4), 0, 7.0, True,
                                    torch.tensor(1.0 + 0j)])
    elif op == "swap_ids":
        other = rnd.choice(sorted(state, key=repr))
        state[idx], state[other] = state[other], state[idx]
    elif op == "move_id":
        state[rnd.choice([B2, FROZEN, 9, "w1"])] = state.pop(idx)
    elif op == "drop_entry":
        del state[idx]
    elif op == "entry_type":
        state[idx] = rnd.choice([[], None, entry.get("step")])
    elif op == "decode" and kind == "8bit":
        try:
            with warnings.catch_warnings():  # an entry corrupted before (complex absmax): numpy warns
                warnings.simplefilter("ignore")
                _decoded(sd)
        except Exception:  # an entry corrupted before: decoded as far as it goes
            pass
    elif op == "groups" and groups:
        choice = rnd.randrange(4)
        if choice == 0:
            groups.pop(rnd.randrange(len(groups)))
        elif choice == 1:
            groups.append(copy.deepcopy(groups[0]))
        elif choice == 2:
            g = rnd.choice(groups)
            g["params"] = g["params"][:-1] if rnd.random() < 0.5 else g["params"] + [rnd.choice([0, 9])]
        elif len(groups) == 2:
            g0, g1 = groups
            g0["params"], g1["params"] = g1["params"][:2], g0["params"] + [4]
    elif op == "hyper" and groups:
        g = rnd.choice(groups)
        name = rnd.choice(["lr", "betas", "eps", "weight_decay"])
        if rnd.random() < 0.2:
            g.pop(name, None)
        elif name == "betas":
            g[name] = rnd.choice([(0.9,), (1.0, 0.9), "ab", (0.9, float("nan")), [0.5, 0.5], (0.9, "x"), 0.9])
        else:
            g[name] = rnd.choice(junk + [0.0, 1e-3])
    elif op == "top":
        if rnd.random() < 0.5:
            del sd[rnd.choice(["state", "param_groups"])]
        else:
            sd[rnd.choice(["state", "param_groups"])] = rnd.choice([None, [], {}, "x"])


OPS = ["drop_key", "rename_key", "add_key", "reshape", "dtype", "value", "step", "swap_ids", "move_id",
       "drop_entry", "entry_type", "decode", "groups", "hyper", "top"]


@pytest.mark.parametrize("kind", KINDS)
@given(changes=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**16)), min_size=1, max_size=3))
def test_corrupted_state_dicts_load_or_raise_and_change_nothing(kind, changes):
    ps, opt = _run(kind)
    before = opt.state_dict()
    counters = (opt.skipped_elements, opt.inexact_blocks_loaded) if kind == "8bit" else None
    sd = opt.state_dict()
    for op, seed in changes:
        if not isinstance(sd.get("state"), Mapping) or not sd["state"] or not isinstance(sd.get("param_groups"),
                                                                                           list):
            break
        if not all(isinstance(v, Mapping) and v for v in sd["state"].values()):
            break
        _mutate(sd, op, random.Random(seed), kind)
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError):
        _assert_untouched(kind, ps, opt, before, counters)
    else:
        for i in range(3, 5):  # a state that loads can be stepped on
            _step(ps, opt, i)


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


# ----------------------------------------------------------------------------- deepcopy and pickling
@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_with_the_parameters_gives_an_independent_optimizer(kind, tmp_path):
    """copy.deepcopy((params, opt)): the copy optimizes the copied parameters from a copy of the state,
    in its own pager with the same settings; stepping it changes nothing of the original."""
    ps, opt = _run(kind, budget_bytes=4096, spill_dir=str(tmp_path))
    cps, copt = copy.deepcopy((ps, opt))
    assert copt.pager is not opt.pager
    assert (copt.pager.budget_bytes, copt.pager.spill_dir) == (4096, str(tmp_path))
    assert copt.param_groups[0]["params"][0] is cps["w1"]
    before_sd, before_ps = opt.state_dict(), {k: v.detach().clone() for k, v in ps.items()}
    assert _same(copt.state_dict(), before_sd)
    for i in range(3, 6):
        _step(cps, copt, i)
    assert _same(opt.state_dict(), before_sd)
    assert all(torch.equal(ps[k], before_ps[k]) for k in ps)
    for i in range(3, 6):  # the original goes on as the copy did
        _step(ps, opt, i)
    assert all(torch.equal(ps[k], cps[k]) for k in ps)
    assert _same(opt.state_dict(), copt.state_dict())
    if kind == "8bit":
        assert (copt.min_8bit_size, copt.blocksize) == (64, 64)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_of_the_optimizer_alone_copies_the_parameters_as_torch_does(kind):
    ps, opt = _run(kind)
    t_ps = {k: torch.nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad) for k, v in ps.items()}
    t_opt = torch.optim.AdamW(_groups(t_ps), lr=1e-2)
    t_copy, copt = copy.deepcopy(t_opt), copy.deepcopy(opt)
    for c, original in ((t_copy, t_ps), (copt, ps)):
        copied = c.param_groups[0]["params"][0]
        assert copied is not original["w1"] and torch.equal(copied, original["w1"]) and copied.grad is None
    before_sd, before_w1 = opt.state_dict(), ps["w1"].detach().clone()
    w1 = copt.param_groups[0]["params"][0]
    w1.grad = torch.ones_like(w1)
    copt.step()
    assert not torch.equal(w1, before_w1)
    assert torch.equal(ps["w1"], before_w1) and _same(opt.state_dict(), before_sd)


def test_deepcopy_of_an_optimizer_on_a_shared_pager_gets_its_own():
    ps = _params()
    pager = pq.Pager(budget_bytes=8192, page_bytes=4096)
    opt = PagedAdamW(_groups(ps), pager=pager)
    _step(ps, opt, 0)
    copt = copy.deepcopy(opt)
    assert copt.pager is not pager and not pager.closed
    assert (copt.pager.budget_bytes, copt.pager.page_bytes, copt.pager.spill_dir) == (8192, 4096, pager.spill_dir)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_optimizer_resumes_bit_identically(kind, how, tmp_path):
    """Pickle the parameters and the optimizer object together, unpickle, continue: as if never stopped."""
    ps, opt = _run(kind, budget_bytes=2048, spill_dir=str(tmp_path))
    if kind == "8bit":
        opt.skipped_elements = 5  # counters travel with it
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save({"params": ps, "opt": opt}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    else:
        loaded = pickle.loads(pickle.dumps({"params": ps, "opt": opt}))
    lps, lopt = loaded["params"], loaded["opt"]
    assert type(lopt) is type(opt) and lopt.pager.budget_bytes == 2048
    assert _same(lopt.state_dict(), opt.state_dict())
    if kind == "8bit":
        assert lopt.skipped_elements == 5 and lopt.state[lps["w1"]]["state1"].dtype == torch.uint8
    for i in range(3, 8):
        _step(ps, opt, i)
        _step(lps, lopt, i)
    assert all(torch.equal(ps[k], lps[k]) for k in ps)
    assert _same(lopt.state_dict(), opt.state_dict())
    assert lopt.stats()["allocated_bytes"] > 0  # the state lives in the new pager


def test_pickled_optimizer_state_does_not_hold_the_whole_arena():
    """Each state tensor is pickled on its own (not the shared paged allocation it views)."""
    big = torch.nn.Parameter(torch.randn(1 << 16))
    small = torch.nn.Parameter(torch.randn(10))
    opt = PagedAdamW([big, small])
    small.grad = torch.ones(10)
    opt.step()  # only `small` has state; the arena also holds big's slot (512 KiB)
    assert len(pickle.dumps(opt)) - len(pickle.dumps([big, small])) < 16 << 10
    assert math.isclose(opt.state_bytes(), 8 * ((1 << 16) + 10))
