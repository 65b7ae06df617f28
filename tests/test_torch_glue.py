"""Torch glue: Linear4bit / LoraLinear4bit autograd, state dicts (bitsandbytes keys),
prepare_model, PEFT adapter files (proven with the real peft package), merging."""
import copy
import json
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from support import tiny_llama_config  # noqa: E402
from torch import nn  # noqa: E402

import pyqlora as pq  # noqa: E402
from pyqlora.lora import (  # noqa: E402
    LoraConfig,
    check_adapter,
    load_adapter,
    lora_layers,
    merge_adapters,
    prepare_model,
    save_adapter,
)
from pyqlora.nn import Linear4bit, LoraLinear4bit, dequantize_weight  # noqa: E402


def make_lora(in_f=40, out_f=24, r=4, alpha=8, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = LoraLinear4bit(Linear4bit.from_linear(dense), r=r, lora_alpha=alpha, lora_dtype=dtype)
    with torch.no_grad():  # a trained-looking adapter (B is zero at init)
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return dense, layer


def test_linear4bit_matches_dense_dequantized_reference():
    dense, layer = make_lora()
    base = layer.base_layer
    w = dequantize_weight(base.quantized)
    x = torch.randn(5, 7, 40, requires_grad=True)
    y = base(x)
    ref = x.detach() @ w.T + dense.bias.detach()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-6)
    assert base.bias.grad is None  # frozen base
    # the quantization really happened: close to, but not equal to, the dense layer
    err = (w - dense.weight.detach()).norm() / dense.weight.norm()
    assert 0.01 < err < 0.2


@pytest.mark.parametrize("codebook, blocksize, dq", [("nf4", 64, True), ("fp4", 128, False), ("int4", 32, False),
                                                   ("nf3", 256, True), ("nf4", 4096, False)])
def test_linear4bit_options(codebook, blocksize, dq):
    torch.manual_seed(0)
    dense = nn.Linear(72, 40)
    layer = Linear4bit.from_linear(dense, codebook=codebook, blocksize=blocksize, double_quant=dq)
    q = layer.quantized
    assert (q.codebook, q.blocksize, q.double_quant) == (codebook, blocksize, dq)
    x = torch.randn(3, 72)
    torch.testing.assert_close(layer(x), x @ dequantize_weight(q).T + dense.bias.detach(), rtol=1e-5, atol=1e-6)
    fresh = Linear4bit(72, 40, codebook=codebook, blocksize=blocksize, double_quant=dq)
    if codebook in ("nf4", "fp4"):  # the formats bitsandbytes checkpoints can hold
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="only nf4 and fp4"):
            layer.state_dict()


@pytest.mark.parametrize("codebook", ["int4", "nf3", "nf2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_4bit_codebook_without_a_dense_weight(codebook, dtype):
    # not only NF4/FP4: many rows take the AMX or tiled products, few the fused kernel
    from pyqlora._glue import products

    torch.manual_seed(1)
    dense = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(dense, codebook=codebook, blocksize=32)
    w = dequantize_weight(layer.quantized, torch.float64)
    for rows in (3, 40):
        x = torch.randn(rows, 96, dtype=dtype, requires_grad=True)
        assert products.choose_path(x, layer.quantized) != "dense"
        y = layer(x)
        ref = x.detach().double() @ w.T + dense.bias.detach().double()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
        y.sum().backward()
        torch.testing.assert_close(x.grad.double(), torch.ones(rows, 40, dtype=torch.float64) @ w, rtol=tol,
                                   atol=tol)


def _forward_backward_match_dense(base, dense, w, x, tol):
    """base(x) and its input gradient against the float64 dense product with w (dense's bias); returns base(x)."""
    y = base(x)
    ref = x.detach().double() @ w.T + dense.bias.detach().double()
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=tol, atol=tol)
    return y


# the fused 4-bit product (pq.matmul_4bit) for few rows, and for every row count of
# bfloat16 where it runs on AMX tiles; else tiles decoded for torch's matmul
@pytest.mark.parametrize("rows", [1, 2, 3, 35, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_dense_routes_agree(rows, dtype):
    from pyqlora._glue import products

    dense, layer = make_lora(in_f=64, out_f=48)
    base = layer.base_layer
    w = dequantize_weight(base.quantized, torch.float64)
    x = torch.randn(rows, 64, dtype=dtype, requires_grad=True)
    amx = dtype == torch.bfloat16 and pq.get_amx()
    assert (products.choose_path(x, base.quantized) == "fused") == (rows <= products.fused_max_rows(dtype) or amx)
    y = _forward_backward_match_dense(base, dense, w, x, 1e-5 if dtype == torch.float32 else 2e-2)
    assert y.dtype == dtype
    # nothing to differentiate (no_grad, or an input and bias without grad): the same bytes without autograd
    with torch.no_grad():
        y0 = base(x)
    y1 = base(x.detach())
    assert y0.grad_fn is None and not y1.requires_grad  # the bias is frozen in make_lora
    assert torch.equal(y0, y.detach()) and torch.equal(y1, y.detach())


@pytest.mark.parametrize("isa", pq.available_isas())
def test_float32_route_depends_on_the_kernel_path_and_the_direction(isa):
    """float32 x: the fused kernel up to fused_max_rows rows of the forward (x W^T) and of the backward (g W), each
    its own limit on each kernel path (every row count on the x86 paths, whose nf4core product decodes panels
    for many rows); the input gradient goes the backward's way and is right either way."""
    from pyqlora._glue import products

    dense, layer = make_lora(in_f=64, out_f=48)
    base = layer.base_layer
    w = dequantize_weight(base.quantized, torch.float64)
    old = pq.get_isa()
    try:
        pq.set_isa(isa)
        forward, backward = products.fused_max_rows(torch.float32), products.fused_max_rows(torch.float32, False)
        assert 1 <= backward <= forward
        if isa in products.FUSED_ALL_ROWS_FP32:
            assert forward == backward == sys.maxsize
            counts = {1, 8, 9, 47, 48, 64, 65, 300}  # both sides of nf4core's panel crossovers
        else:
            assert forward < 1000
            counts = {backward, backward + 1, forward, forward + 1}
        for rows in sorted(counts):
            x = torch.randn(rows, 64, requires_grad=True)
            assert products.choose_path(x, base.quantized) == ("fused" if rows <= forward else "tiled")
            assert products.choose_path(x, base.quantized, transpose=False) == ("fused" if rows <= backward
                                                                                else "tiled")
            y = base(x)
            g = torch.randn_like(y)
            y.backward(g)
            torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    finally:
        pq.set_isa(old)


@pytest.mark.parametrize("in_f", [72, 100, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_whose_rows_split_blocks_take_the_tiled_path(in_f, dtype):
    """in_features not a multiple of the blocksize (64) or of 16: quantization blocks straddle rows of W and
    nf4core's vector product kernels do not take it (nf4_matmul_4bit runs its scalar reference, 100-230x slower
    than the tiled path at 64-512 rows), so every row count takes the tiled path but bfloat16 on AMX from
    AMX_MIN_ROWS rows where in_features is a multiple of 32 (96); the results are the dense ones either way."""
    from pyqlora._glue import products

    dense, layer = make_lora(in_f=in_f, out_f=40)
    base = layer.base_layer
    assert not products.whole_block_rows(base.quantized)
    w = dequantize_weight(base.quantized, torch.float64)
    for rows in (1, products.AMX_MIN_ROWS - 1, products.AMX_MIN_ROWS, 64):
        x = torch.randn(rows, in_f, dtype=dtype, requires_grad=True)
        amx = dtype == torch.bfloat16 and pq.get_amx() and in_f % 32 == 0 and rows >= products.AMX_MIN_ROWS
        for transpose in (True, False):
            t = x if transpose else torch.randn(rows, 40, dtype=dtype)
            assert products.choose_path(t, base.quantized, transpose) == ("fused" if amx else "tiled")
        _forward_backward_match_dense(base, dense, w, x, 1e-5 if dtype == torch.float32 else 3e-2)
    whole = Linear4bit.from_linear(nn.Linear(128, 40)).quantized  # whole blocks: the fused kernel for one row
    assert products.whole_block_rows(whole) and products.choose_path(torch.randn(1, 128), whole) == "fused"


def test_inference_path_follows_the_weight_and_input_layout():
    """The no-autograd fused path (arguments checked once, cached with the layer's view of its weight) equals
    matmul_4bit on 3-D and non-contiguous inputs, and follows a new weight and in-place loaded bytes."""
    _, layer = make_lora(in_f=64, out_f=48)
    base = layer.base_layer
    x = torch.randn(2, 3, 128)[:, :, ::2]  # not contiguous, 3-D, 6 rows
    with torch.no_grad():
        for rows in (x[:1, :1], x):
            want = pq.matmul_4bit(rows.contiguous().numpy(), base.quantized) + base.bias.numpy()
            assert torch.equal(base(rows), torch.from_numpy(want))
        other = torch.nn.Linear(64, 48)
        base.quantized = pq.quantize(other.weight.detach().numpy())  # a new weight: the cache must not serve
        want = pq.matmul_4bit(x[:1, :1].contiguous().numpy(), base.quantized) + base.bias.numpy()
        assert torch.equal(base(x[:1, :1]), torch.from_numpy(want))
        state = Linear4bit.from_linear(other).state_dict()  # bytes copied in place: same addresses
        base.load_state_dict({**state, "bias": base.bias}, strict=False)
        got = base(x[:1, :1])
        want = pq.matmul_4bit(x[:1, :1].contiguous().numpy(), base.quantized) + base.bias.numpy()
        assert torch.equal(got, torch.from_numpy(want))


def test_lora_outputs_and_gradients_match_dense_lora():
    dense, layer = make_lora()
    w = dequantize_weight(layer.base_layer.quantized)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    assert s == 8 / 4
    x = torch.randn(6, 40, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y2 = x2 @ w.T + dense.bias.detach() + (x2 @ a2.T @ b2.T) * s
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(40,), (6, 40), (2, 5, 40), (2, 1, 3, 40)])
def test_lora_sum_in_place_matches_peft_expression_for_every_input_rank(shape):
    """The adapters' sum is built in the base product's output (addmm_); two adapters, inputs of rank 1 to 4,
    a base without bias: outputs and every gradient as PEFT's ``base(x) + B(A(x)) * s`` per adapter."""
    dense, layer = make_lora(bias=False)
    layer.add_adapter("second", r=2, lora_alpha=3)
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_(0, 0.1)
    w = dequantize_weight(layer.base_layer.quantized)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 24)
    x2 = x.detach().clone().requires_grad_(True)
    params = {n: (layer.lora_A[n].weight.detach().clone().requires_grad_(True),
                  layer.lora_B[n].weight.detach().clone().requires_grad_(True)) for n in ("default", "second")}
    y2 = x2 @ w.T
    for n, (a, b) in params.items():
        y2 = y2 + (x2 @ a.T @ b.T) * layer.scaling[n]
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for n, (a, b) in params.items():
        torch.testing.assert_close(layer.lora_A[n].weight.grad, a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B[n].weight.grad, b.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference: the same sum
        torch.testing.assert_close(layer(x), y2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["fused", "tiled", "dense"])
def test_lora_sum_in_place_on_every_cpu_product_path(monkeypatch, path, bias):
    """Whatever product the base takes (autograd forbids modifying a custom Function's output in place where
    it is a view, as the tiled product's output was for 3-D inputs), the adapters' sum is PEFT's, with and
    without autograd, with and without the base's bias."""
    import pyqlora.nn as qnn

    monkeypatch.setattr(qnn, "choose_path", lambda *a, **k: path)
    dense, layer = make_lora(bias=bias)
    w = dequantize_weight(layer.base_layer.quantized)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    c = dense.bias.detach() if bias else 0
    want = x.detach() @ w.T + c + (x.detach() @ a.T @ b.T) * s
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w + (g @ b) @ a * s, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    kept = []  # a hook that keeps the base's output sees the base's output, not the sum built later
    layer.base_layer.register_forward_hook(lambda mod, args, out: kept.append(out))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[0], x.detach().reshape(-1, 40) @ w.T + c, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_float64():
    _, layer = make_lora(in_f=33, out_f=9, r=3, dtype=torch.float64)
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    a = layer.lora_A["default"].weight
    assert torch.autograd.gradcheck(lambda w: nn.functional.linear(x.detach(), w) @ layer.lora_B["default"].weight.T,
                                    (a,))


def test_no_dense_weight_is_saved_for_backward():
    _, layer = make_lora(in_f=256, out_f=128)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert 256 * 128 not in sizes, sizes  # only activations and the small adapters
    y.sum().backward()


def test_rslora_scaling_and_multiple_adapters():
    _, layer = make_lora(r=4, alpha=8)
    layer.add_adapter("second", r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["second"] == pytest.approx(8 / 4.0)
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_()
    x = torch.randn(3, 40)
    both = layer(x)
    layer.set_adapter("default")
    one = layer(x)
    assert not torch.allclose(both, one)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")


def test_autocast_bf16_and_checkpoint():
    _, layer = make_lora()
    x = torch.randn(8, 40)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    xr = x.clone().requires_grad_(True)
    from torch.utils.checkpoint import checkpoint

    checkpoint(layer, xr, use_reentrant=False).sum().backward()
    ga = layer.lora_A["default"].weight.grad.clone()
    layer.zero_grad()
    x2 = x.clone().requires_grad_(True)
    layer(x2).sum().backward()
    torch.testing.assert_close(ga, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(xr.grad, x2.grad)


def test_bad_input_shapes():
    _, layer = make_lora()
    with pytest.raises(ValueError, match="last dimension 40"):
        layer(torch.randn(3, 41))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="Linear4bit"):
        LoraLinear4bit(nn.Linear(3, 3))


# ------------------------------------------------------------ state dicts
def test_state_dict_round_trip_and_bitsandbytes_keys():
    bnb = pytest.importorskip("bitsandbytes")
    dense, layer = make_lora()
    base = layer.base_layer
    sd = base.state_dict()
    fresh = Linear4bit(40, 24)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 40)
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=0)
    # the same keys, dtypes and shapes as a bitsandbytes Linear4bit (NF4 + DQ)
    theirs = bnb.nn.Linear4bit(40, 24, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")
    tsd = theirs.state_dict()
    assert sorted(tsd) == sorted(sd)
    for k in tsd:
        assert tsd[k].dtype == sd[k].dtype and tsd[k].shape == sd[k].shape, k
    assert torch.equal(tsd["weight"], sd["weight"])  # same packed codes
    # their checkpoint loads in ours and computes with their dequantized weight
    ours = Linear4bit(40, 24)
    ours.load_state_dict(tsd)
    w_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    torch.testing.assert_close(ours(x), x @ w_theirs.T + dense.bias.detach(), rtol=1e-5, atol=1e-6)
    # ours loads in bitsandbytes the way transformers loads a 4-bit checkpoint
    qs = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=qs, device="cpu")
    torch.testing.assert_close(bnb.functional.dequantize_4bit(p.data, p.quant_state),
                               dequantize_weight(base.quantized), rtol=0, atol=0)


def test_load_state_dict_errors_name_the_key():
    _, layer = make_lora()
    sd = layer.base_layer.state_dict()
    wrong = Linear4bit(24, 40)
    with pytest.raises(RuntimeError, match="weight: shape"):
        wrong.load_state_dict(sd)
    bad = dict(sd)
    bad["weight"] = bad["weight"][:10]
    with pytest.raises(RuntimeError, match="truncated"):
        Linear4bit(40, 24).load_state_dict(bad)


# ------------------------------------------------------- prepare_model
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(32, 32), "v_proj": nn.Linear(32, 32, bias=False),
                                    "mlp": nn.Linear(32, 64)})
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 50, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        h = self.block["q_proj"](h) + self.block["v_proj"](h)
        return self.lm_head(self.norm(self.block["mlp"](h)))


def test_prepare_model_all_linear_excludes_head_and_freezes():
    torch.manual_seed(0)
    model = Tiny()
    report = prepare_model(model, LoraConfig(r=2, lora_alpha=4))
    assert report.replaced == ["block.q_proj", "block.v_proj", "block.mlp"]
    assert isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert report.quantized_weight_bytes < 0.3 * report.dense_weight_bytes
    ids = torch.randint(0, 50, (2, 5))
    model(ids).sum().backward()
    assert "trainable parameters" in str(report)


@pytest.mark.parametrize("targets, expected", [(["q_proj", "v_proj"], ["block.q_proj", "block.v_proj"]),
                                               (r"block\.(q|v)_proj", ["block.q_proj", "block.v_proj"])])
def test_prepare_model_target_lists_and_regex(targets, expected):
    model = Tiny()
    assert prepare_model(model, LoraConfig(target_modules=targets)).replaced == expected


def test_prepare_model_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0))
    with pytest.raises(ValueError, match="cannot quantize module '1'.*empty"):
        prepare_model(model)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        prepare_model(Tiny(), LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=0)


def test_prepare_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates gradient_checkpointing_enable
        report = prepare_model(model, LoraConfig(r=4, lora_alpha=8, gradient_checkpointing=True))
    new = hasattr(type(model), "is_activation_checkpointing")
    assert model.is_activation_checkpointing if new else model.is_gradient_checkpointing
    assert len(report.replaced) == 2 * 7 and not any("lm_head" in n for n in report.replaced)
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


# ----------------------------------------------------------- PEFT files
def _dense_twin(model):
    """A dense copy of a prepared model whose linear weights are the dequantized 4-bit ones."""
    twin = Tiny()
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear4bit):
            sd[name + ".weight"] = dequantize_weight(module.base_layer.quantized)
            if module.base_layer.bias is not None:
                sd[name + ".bias"] = module.base_layer.bias.detach()
    for name, p in model.named_parameters():
        if ".lora_" not in name and ".base_layer." not in name:
            sd[name] = p.detach()
    twin.load_state_dict(sd)
    return twin


def test_adapter_saved_here_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = Tiny()
    prepare_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "mlp"]))
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    twin = _dense_twin(model)
    peft_model = peft.PeftModel.from_pretrained(twin, str(tmp_path))
    ids = torch.randint(0, 50, (3, 6))
    torch.testing.assert_close(peft_model(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_adapter_saved_by_peft_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    model = Tiny()
    prepare_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "mlp"]))
    twin = _dense_twin(model)
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=8, lora_alpha=32, use_rslora=True,
                                                   target_modules=["q_proj", "v_proj", "mlp"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path))
    load_adapter(model, tmp_path, adapter_name="peft")
    for _, layer in lora_layers(model):
        layer.set_adapter("peft")
        assert layer.r["peft"] == 8 and layer.scaling["peft"] == pytest.approx(32 / 8 ** 0.5)
    ids = torch.randint(0, 50, (3, 6))
    torch.testing.assert_close(model(ids), pm(ids), rtol=1e-5, atol=1e-5)


def test_adapter_file_errors(tmp_path):
    model = Tiny()
    prepare_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    save_adapter(model, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = check_adapter(model, tmp_path)  # what load_adapter would copy, nothing changed
    assert sorted(plan) == sorted(n for n, _ in lora_layers(model))
    for name, layer in lora_layers(model):
        a, b, r, alpha, scaling = plan[name]
        assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)
        assert (r, alpha, scaling) == (4, layer.lora_alpha["default"], layer.scaling["default"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    other = Tiny()
    prepare_model(other, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="block.v_proj"):
        load_adapter(other, tmp_path)  # names a module that is not adapted there
    small = Tiny()
    prepare_model(small, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="block.q_proj.*shape"):
        load_adapter(small, tmp_path, adapter_name="x")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(small, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(small, tmp_path)


# -------------------------------------------------------------- merging
def test_merge_adapters_dense_and_requantized():
    torch.manual_seed(3)
    model = Tiny()
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids).detach()
    merged, report = merge_adapters(copy.deepcopy(model), dtype=torch.float32)
    assert not lora_layers(merged) and isinstance(merged.block["q_proj"], nn.Linear)
    torch.testing.assert_close(merged(ids), expected, rtol=1e-4, atol=1e-4)
    requant, report = merge_adapters(copy.deepcopy(model), requantize=True)
    assert isinstance(requant.block["q_proj"], Linear4bit)
    errors = [r["requantize_rel_error"] for r in report.values()]
    assert all(0.0 < e < 0.2 for e in errors)


def test_bf16_model_keeps_only_norms_in_fp32_and_trains():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n)
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16  # no blanket upcast
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)
    ids = torch.randint(0, 64, (2, 9))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # activations stay bf16 without autocast
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_embeddings_dtype_stores_embedding_and_head_in_bf16_and_computes_in_fp32(monkeypatch, tied, checkpointing):
    """LoraConfig(embeddings_dtype="bfloat16") on a float32 model whose weights are bfloat16 values (a bf16
    checkpoint trained in float32). Oracle: the same model prepared with float32 embedding and head: equal
    logits, loss and LoRA gradients to float32 rounding, with the head cast in several slices."""
    import copy

    import pyqlora.lora as lora_mod

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(lora_mod, "_HEAD_SLICE_ELEMENTS", 32 * 20)  # 20 rows of 32: 4 slices of the 64-word head
    cfg = tiny_llama_config(transformers, max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).to(torch.float32)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    prepare_model(ref, LoraConfig(r=4, lora_alpha=8, gradient_checkpointing=checkpointing))
    torch.manual_seed(1)
    prepare_model(model, LoraConfig(r=4, lora_alpha=8, gradient_checkpointing=checkpointing,
                                    embeddings_dtype="bfloat16"))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.dtype == head.dtype == torch.bfloat16 and (emb is head) == tied
    assert torch.equal(emb.float(), ref.get_input_embeddings().weight)  # exact: the values were bf16
    assert sum(p.nbytes for p in {id(emb): emb, id(head): head}.values()) * 2 == sum(
        p.nbytes for p in {id(p): p for p in (ref.get_input_embeddings().weight,
                                              ref.get_output_embeddings().weight)}.values())
    model.train(), ref.train()
    ids = torch.randint(0, 64, (2, 11))
    out, out_ref = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    out_ref.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert emb.grad is None and head.grad is None
    # applying it twice changes nothing; bad values are refused
    lora_mod._store_embeddings_in(model, "bfloat16")
    torch.testing.assert_close(model(input_ids=ids).logits, out.logits.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="embeddings_dtype must be"):
        LoraConfig(embeddings_dtype="int8")


# -------------------------------------------------- the real model
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, carrying a small lamp and a notebook. "
        "He wrote down the color of the sky, the direction of the wind and the number of ships that passed. "
        "Over forty years the notebooks filled three shelves, and sailors in the harbor said that nobody knew the "
        "sea as well as he did. When he finally retired, the town asked him what he had learned. He smiled and said "
        "that the sea had taught him patience, and that every storm, however long, eventually ended.")


@pytest.mark.slow
def test_real_smollm2_qlora_quantizes_trains_and_still_answers():
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from pyqlora.app import models

    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    model, tok = models.load_smollm2()
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        loss_dense = model(input_ids=ids, labels=ids).loss.item()
    report = prepare_model(model, LoraConfig(r=8, lora_alpha=16))
    assert len(report.replaced) == 210  # 30 layers x 7 projections; the tied head stays dense
    with torch.no_grad():
        loss_q = model(input_ids=ids, labels=ids).loss.item()
    # NF4 + DQ costs a little, not everything (Botchan perplexity: 36.9 -> ~44, test-material.md)
    assert loss_dense < loss_q < loss_dense + 0.5, (loss_dense, loss_q)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() < loss_q - 0.05
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt")
    prompt = prompt if torch.is_tensor(prompt) else prompt["input_ids"]
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------- LoftQ init
def _loftq_layer(it, r=4, alpha=8, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 96, bias=False)
    w = lin.weight.detach().double().clone()
    model = nn.Sequential(lin)
    prepare_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="loftq", loftq_iter=it))
    return w, model[0]


def test_loftq_one_round_is_the_truncated_svd_of_the_rounding_error():
    """Closed form (Eckart-Young): with one round, the base is quantize(W) and scaling * B A is the
    best rank-r approximation of W - dequantize(quantize(W)), computed here in float64 by numpy."""
    import pyqlora as pq

    w, layer = _loftq_layer(1)
    plain = pq.quantize(w.float().numpy())
    np.testing.assert_array_equal(layer.base_layer.quantized.packed, plain.packed)
    residual = w.numpy() - np.asarray(pq.dequantize(plain), dtype=np.float64)
    u, s, vh = np.linalg.svd(residual, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_allclose(layer.delta_weight("default").detach().double().numpy(), best, atol=2e-6)
    assert layer.scaling["default"] == 2.0


def test_loftq_rounds_bring_the_start_closer_to_the_dense_weight():
    import pyqlora as pq

    errors = []
    for it in (1, 2, 5):
        w, layer = _loftq_layer(it)
        start = layer.base_layer.dequantized_weight(torch.float32).double() + layer.delta_weight("default").double()
        errors.append((w - start).norm().item())
    plain = (w - torch.from_numpy(np.asarray(pq.dequantize(pq.quantize(w.float().numpy())), np.float64))).norm()
    assert errors[0] < plain.item() and errors[2] < errors[1] < errors[0]
    x = torch.randn(3, 64)  # and the layer computes base + adapter as prepared
    torch.testing.assert_close(layer(x), x @ start.float().T, rtol=1e-4, atol=1e-4)


def test_loftq_config_errors():
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="loftq_iter"):
        LoraConfig(init_lora_weights="loftq", loftq_iter=0)
    with pytest.raises(ValueError, match="module '0'.*r=8"):
        prepare_model(nn.Sequential(nn.Linear(4, 16)), LoraConfig(r=8, init_lora_weights="loftq"))
