"""The CUDA path.

Every machine: the build reports CUDA as Meson configured it, show_config
says so, and without a device every CUDA call fails with a clear error
instead of crashing. With a GPU (marker ``gpu``; skipped with the reason
otherwise): pq.quantize / pq.dequantize of CUDA tensors give the same bytes
as the CPU path for the same input, the GEMV agrees with the CPU reference to
float32 rounding, tensors of 2^31+ elements work, the 8-bit Adam kernel gives
the CPU kernel's bytes, and the pager's CUDA backend keeps device-resident
bytes within its budget with the data intact.

benchmarks/gpu_check.sh runs them on a GPU machine: on an H200 (2026-12-04)
38 passed, and the two no-device tests were skipped. Also there: Linear4bit
and a QLoRA step on CUDA tensors against the CPU layer.
"""
import json
import os
import pathlib

import numpy as np
import pytest

import pyqlora as pq
from pyqlora import _cuda
from pyqlora import _nf4core as ext

BUILT, DEVICES = ext.cuda_available()


def _meson_has_cuda():
    """Whether the Meson build this module came from compiled CUDA (editable
    installs keep meson-info beside the module); None when unknown."""
    for parent in pathlib.Path(ext.__file__).resolve().parents:
        info = parent / "meson-info" / "intro-compilers.json"
        if info.exists():
            return "cuda" in json.loads(info.read_text())["host"]
    return None


def test_build_reports_cuda_as_configured():
    expected = _meson_has_cuda()
    if expected is None:
        env = os.environ.get("PYQLORA_EXPECT_CUDA")
        if env is None:
            pytest.skip("not an editable build and PYQLORA_EXPECT_CUDA (0/1) is not set")
        expected = env == "1"
    assert BUILT == expected
    assert (ext.cuda_runtime_version() > 0) == BUILT
    assert DEVICES >= 0 and (BUILT or DEVICES == 0)


def test_show_config_reports_cuda():
    import io

    cfg = pq.show_config(file=io.StringIO())
    assert cfg["cuda"].startswith("built (CUDA runtime ") == BUILT
    assert cfg["cuda"] == "not built" or BUILT
    assert cfg["cuda_devices"] == DEVICES


@pytest.mark.skipif(DEVICES > 0, reason="a CUDA device is present")
def test_cuda_calls_fail_cleanly_without_a_device():
    table = pq.codebook("nf4")
    # never dereferenced: the device check comes first; apart, so that no output overlaps an input
    a, b, c = 1 << 16, 2 << 16, 3 << 16
    with pytest.raises(RuntimeError, match="CUDA error in cudaGetDevice" if BUILT else "built without CUDA"):
        ext.cuda_dequantize(4, a, b, 64, 64, table, c, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA" if BUILT else "built without CUDA"):
        ext.cuda_quantize(4, a, 0, 64, 64, table, b, c, 0)
    if BUILT:  # argument errors come first, naming the argument
        with pytest.raises(ValueError, match="blocksize"):
            ext.cuda_dequantize(4, a, b, 64, 48, table, c, 0, 0)
        bad = table.copy()
        bad[3] = np.nan
        dyn = pq._codebooks.lookup_table("dynamic", 256)
        d, e = 4 << 16, 5 << 16
        with pytest.raises(ValueError, match="codebook entry 3 is not finite"):
            ext.cuda_gemv_dq(a, 0, 1, 64, 128, b, c, d, 0.0, 64, bad, dyn, e, 0)
        bad_dyn = dyn.copy()
        bad_dyn[200] = np.inf
        with pytest.raises(ValueError, match="dyn_code entry 200 is not finite"):
            ext.cuda_gemv_dq(a, 0, 1, 64, 128, b, c, d, 0.0, 64, table, bad_dyn, e, 0)


def test_is_cuda_array_recognises_the_interface():
    class Fake:
        @property
        def __cuda_array_interface__(self):
            return {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}

    assert _cuda.is_cuda_array(Fake())
    assert not _cuda.is_cuda_array(np.zeros(4, np.float32))


# ---------------------------------------------------------------- GPU tests


@pytest.fixture(scope="module")
def torch_cuda():
    if not BUILT:
        pytest.skip("nf4core was built without CUDA")
    if DEVICES == 0:
        pytest.skip("no CUDA device (nf4_cuda_available reports 0)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support here")
    return torch


def _torch_dtype(torch, name):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _numpy_of(torch, t):
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(pq._dtypes.bfloat16)
    return t.numpy()


@pytest.mark.gpu
@pytest.mark.parametrize("codebook", ["nf4", "fp4", "int4", "nf3"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_quantize_is_byte_identical_to_cpu(torch_cuda, codebook, dtype):
    torch = torch_cuda
    gen = torch.Generator().manual_seed(hash((codebook, dtype)) % 2**31)
    for blocksize in pq.BLOCKSIZES:
        for n in (1, 7, 3 * blocksize + 5, 4 * blocksize):
            x = torch.randn(n, generator=gen).to(_torch_dtype(torch, dtype))
            x[: min(n, 32)] = 0  # an all-zero block
            for dq in (False, True):
                q_cpu = pq.quantize(_numpy_of(torch, x), codebook=codebook, blocksize=blocksize, double_quant=dq)
                q_gpu = pq.quantize(x.cuda(), codebook=codebook, blocksize=blocksize, double_quant=dq)
                assert isinstance(q_gpu, _cuda.CudaQuantizedArray)
                back = q_gpu.cpu()
                assert back.packed.tobytes() == q_cpu.packed.tobytes()
                assert back.absmax.tobytes() == q_cpu.absmax.tobytes()
                if dq:
                    assert back.nested_absmax.tobytes() == q_cpu.nested_absmax.tobytes()
                    assert np.float32(q_gpu.nested_offset).tobytes() == np.float32(q_cpu.nested_offset).tobytes()
                for out in ("float32", "float16", "bfloat16"):
                    y_cpu = pq.dequantize(q_cpu, dtype=out)
                    y_gpu = pq.dequantize(q_gpu, dtype=out)
                    assert y_gpu.is_cuda
                    assert _numpy_of(torch, y_gpu).tobytes() == y_cpu.tobytes()


@pytest.mark.gpu
def test_nan_is_rejected_with_its_index(torch_cuda):
    torch = torch_cuda
    x = torch.ones(1000, device="cuda")
    x[700] = float("nan")
    x[900] = float("inf")
    with pytest.raises(pq.NonFiniteError, match="700"):
        pq.quantize(x)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_matches_cpu_reference(torch_cuda, M, dtype):
    torch = torch_cuda
    gen = torch.Generator().manual_seed(M)
    N, K = 96, 1024
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(M, K, generator=gen).to(_torch_dtype(torch, dtype))
    for dq in (False, True):
        q = pq.quantize(w.numpy(), double_quant=dq)
        want = pq.matmul_4bit(_numpy_of(torch, x).astype(np.float32), q).astype(np.float64)
        qg = pq.quantize(w.cuda(), double_quant=dq)
        got = _cuda.gemv(x.cuda(), qg).float().cpu().numpy().astype(np.float64)
        wd = pq.dequantize(q).astype(np.float64)
        mag = np.abs(_numpy_of(torch, x).astype(np.float64)) @ np.abs(wd).T
        tol = (1e-5 if dtype == "float32" else 8e-3) * mag + 1e-6  # bf16 output rounds to 2^-8
        assert np.all(np.abs(got - want) <= tol)


@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_to_the_31_elements(torch_cuda):
    # 64-bit indexing: the last blocks of a 2^31 + 133 element bf16 tensor
    torch = torch_cuda
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB or more")
    n = 2**31 + 133
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    q = pq.quantize(x, blocksize=64, double_quant=False)
    start = (n // 64 - 3) * 64  # block-aligned: blocks are independent
    tail = _numpy_of(torch, x[start:])
    q_cpu = pq.quantize(tail, blocksize=64, double_quant=False)
    assert q.packed[start // 2 :].cpu().numpy().tobytes() == q_cpu.packed.tobytes()
    assert q.absmax[start // 64 :].cpu().numpy().tobytes() == q_cpu.absmax.tobytes()
    y = pq.dequantize(q)
    assert _numpy_of(torch, y[start:]).tobytes() == pq.dequantize(q_cpu).tobytes()


# ---------------------------------------------------------------- 8-bit Adam and the CUDA pager (issue 5/8)


@pytest.mark.skipif(DEVICES > 0, reason="a CUDA device is present")
def test_adam8bit_and_cuda_pager_fail_cleanly_without_a_device():
    q = np.zeros(256, np.float32)
    # never dereferenced: the device check comes first; apart, so that no output overlaps an input
    p, g, m1, m2, s1, s2 = (k << 16 for k in range(1, 7))
    with pytest.raises(RuntimeError, match="CUDA error in cudaGetDevice" if BUILT else "built without CUDA"):
        ext.cuda_adam8bit_update(p, g, 0, 64, m1, m2, s1, s2, q, q, 64, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(RuntimeError, match="CUDA" if BUILT else "built without CUDA"):
        pq.Pager(device="cuda")
    if BUILT:  # argument errors come first, naming the argument
        with pytest.raises(ValueError, match="step"):
            ext.cuda_adam8bit_update(p, g, 0, 64, m1, m2, s1, s2, q, q, 64, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)


def _adam_state(torch, n, blocksize, device):
    nb = -(-n // blocksize)
    return [torch.full((n,), 127, dtype=torch.uint8, device=device), torch.zeros(n, dtype=torch.uint8, device=device),
            torch.zeros(nb, device=device), torch.zeros(nb, device=device)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
def test_adam8bit_is_byte_identical_to_cpu(torch_cuda, dtype, blocksize):
    torch = torch_cuda
    q1 = np.ascontiguousarray(pq.dynamic_codebook(signed=True), np.float32)
    q2 = np.ascontiguousarray(pq.dynamic_codebook(signed=False), np.float32)
    kdt = _cuda._kernel_dtype(_torch_dtype(torch, dtype))
    n = 5 * blocksize + 77
    gen = torch.Generator().manual_seed(blocksize)
    p_cpu = torch.randn(n, generator=gen).to(_torch_dtype(torch, dtype))
    p_gpu = p_cpu.cuda()
    st_cpu, st_gpu = _adam_state(torch, n, blocksize, "cpu"), _adam_state(torch, n, blocksize, "cuda")
    stream = torch.cuda.current_stream().cuda_stream
    for step in (1, 2, 3, 4):
        g = (torch.randn(n, generator=gen) * 0.1).to(p_cpu.dtype)
        g[n // 3] = float("nan")
        g[-1] = float("inf")
        hp = (1e-3 * step, 0.9, 0.999, 1e-8, 0.01 if step % 2 else 0.0, step)
        sk_cpu = ext.adam8bit_update(p_cpu.view(torch.uint8).numpy(), g.view(torch.uint8).numpy(), kdt, n,
                                     *[t.numpy() for t in st_cpu], q1, q2, blocksize, *hp)
        g_gpu = g.cuda()
        sk_gpu = ext.cuda_adam8bit_update(p_gpu.data_ptr(), g_gpu.data_ptr(), kdt, n,
                                          *[t.data_ptr() for t in st_gpu], q1, q2, blocksize, *hp, stream)
        assert sk_cpu == sk_gpu == 2
        assert p_gpu.cpu().view(torch.uint8).numpy().tobytes() == p_cpu.view(torch.uint8).numpy().tobytes()
        for a, b in zip(st_gpu, st_cpu):
            assert a.cpu().numpy().tobytes() == b.numpy().tobytes()
    assert int((st_cpu[1] != 0).sum()) > n // 2  # the state really moved


MiB = 1 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("managed_prefetch", [True, False])
def test_cuda_pager_under_a_device_budget(torch_cuda, managed_prefetch):
    torch = torch_cuda
    budget = 4 * MiB
    pager = pq.Pager(budget_bytes=budget, page_bytes=MiB, device="cuda", managed_prefetch=managed_prefetch)
    assert pager.device == "cuda:0" and "device='cuda:0'" in repr(pager)
    if not managed_prefetch:
        assert pager.concurrent_managed is False
    rng = np.random.default_rng(0)
    arrays = [pager.zeros((3 * MiB // 4,), np.float32) for _ in range(3)]  # 3 x 3 MiB through 4 MiB
    shadows = []
    for a in arrays:
        assert not a.any()
        a[:] = rng.standard_normal(a.shape, dtype=np.float32)
        shadows.append(a.copy())
    for _ in range(2):
        for a, shadow in zip(arrays, shadows):
            pager.prefetch(a)
            t = pager.as_tensor(a)
            assert t.is_cuda and t.data_ptr() == a.__array_interface__["data"][0]
            t.mul_(2.0)  # on the device, in place
            shadow *= 2.0
            pager.synchronize()
            torch.cuda.synchronize()
            s = pager.stats()
            assert a.nbytes <= s["resident_bytes"] <= budget
    s = pager.stats()
    assert s["page_outs"] > 0 and s["page_ins"] >= 6 * 3
    assert s["allocated_bytes"] == 9 * MiB and s["spilled_bytes"] == 9 * MiB - s["resident_bytes"]
    pager.evict()
    pager.synchronize()
    assert pager.stats()["resident_bytes"] == 0
    for a, shadow in zip(arrays, shadows):
        np.testing.assert_array_equal(a, shadow)  # exact: x2 is exact in float32


@pytest.mark.gpu
def test_cuda_pager_accepts_cuda_tensors_and_checks_ranges(torch_cuda):
    torch = torch_cuda
    pager = pq.Pager(device="cuda")
    a = pager.zeros(1000, "bfloat16")
    t = pager.as_tensor(a)
    assert t.dtype == torch.bfloat16 and t.is_cuda
    pager.prefetch(t)
    pager.prefetch(t[10:20])
    pager.evict(t)
    with pytest.raises(ValueError, match="this pager"):
        pager.prefetch(torch.zeros(10, device="cuda"))
    stream = torch.cuda.Stream()
    pager.set_stream(stream)
    pager.prefetch(a)
    stream.synchronize()
    pager.set_stream(None)



# ---------------------------------------------------------------- Linear4bit and LoRA on a CUDA device


def _linear(torch, n_out, n_in, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(n_out, generator=gen))
    return lin


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear4bit_on_cuda_equals_the_cpu_layer(torch_cuda, dtype):
    import copy

    from pyqlora.nn import Linear4bit

    torch = torch_cuda
    td = _torch_dtype(torch, dtype)
    lin = _linear(torch, 192, 512, seed=7)
    cpu = Linear4bit.from_linear(lin)
    moved = Linear4bit.from_linear(lin).to("cuda")  # quantized on the CPU, then moved
    direct = Linear4bit.from_linear(copy.deepcopy(lin).cuda())  # quantized by the CUDA kernels
    assert direct.weight.device.type == "cuda"
    want_sd = cpu.state_dict()
    for layer in (moved, direct):
        sd = layer.state_dict()  # written from a host copy, in bitsandbytes' keys
        assert sorted(sd) == sorted(want_sd)
        for k, v in want_sd.items():
            assert sd[k].cpu().numpy().tobytes() == v.numpy().tobytes(), k
    w = cpu.dequantized_weight(td)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 512), (3, 2, 512), (8, 512), (40, 512)]:  # the GEMV (<= 8 rows) and the dense path
        x = torch.randn(*shape, generator=gen).to(td)
        want = torch.nn.functional.linear(x.double(), w.double(), lin.bias.double())
        mag = x.double().abs() @ w.double().abs().T + lin.bias.double().abs()
        tol = (1e-5 if dtype == "float32" else 1e-2) * mag + 1e-5
        for layer in (moved, direct):
            assert torch.equal(layer.dequantized_weight(td).cpu(), w)
            with torch.no_grad():
                y = layer(x.cuda())
            assert y.device.type == "cuda" and y.dtype == td and y.shape == (*shape[:-1], 192)
            assert bool(((y.cpu().double() - want).abs() <= tol).all()), shape
        # backward through the frozen 4-bit weight: grad_x = grad_y . W
        xg = x.cuda().requires_grad_()
        y = moved(xg)
        y.float().square().sum().backward()
        gy = 2 * y.detach().cpu().double()
        want_g = gy @ w.double()
        tol_g = (1e-5 if dtype == "float32" else 1e-2) * (gy.abs() @ w.double().abs()) + 1e-5
        assert xg.grad.dtype == td
        assert bool(((xg.grad.cpu().double() - want_g).abs() <= tol_g).all()), shape
    # a clear error, not a crash, when input and weight are on different devices
    with pytest.raises(ValueError, match="move the layer"):
        moved(torch.randn(1, 512))
    with pytest.raises(ValueError, match="move the layer"):
        cpu(torch.randn(1, 512, device="cuda"))
    # a state dict loaded into a layer on the GPU stays on the GPU
    other = Linear4bit.from_linear(_linear(torch, 192, 512, seed=8)).to("cuda")
    other.load_state_dict(want_sd)
    assert other.weight.device.type == "cuda"
    assert torch.equal(other.dequantized_weight(td).cpu(), w)


@pytest.mark.gpu
def test_qlora_step_on_cuda_equals_the_cpu_step(torch_cuda):
    import copy

    from pyqlora.lora import LoraConfig, lora_layers, prepare_model

    torch = torch_cuda
    torch.manual_seed(0)
    model = torch.nn.Sequential(_linear(torch, 384, 256, 1), torch.nn.ReLU(), _linear(torch, 128, 384, 2))
    prepare_model(model, LoraConfig(r=4, lora_alpha=8))
    for _, layer in lora_layers(model):  # B = 0 at creation would leave A's gradient zero
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.05)
    on_gpu = copy.deepcopy(model).cuda()
    x = torch.randn(6, 256)
    for m, xx in ((model, x), (on_gpu, x.cuda())):
        m(xx).square().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    gpu_grads = dict((n, p.grad) for n, p in on_gpu.named_parameters() if p.requires_grad)
    assert len(grads) == 4  # A and B of the two layers; nothing of the frozen base
    for n, g in grads:
        assert g is not None and gpu_grads[n] is not None, n
        torch.testing.assert_close(gpu_grads[n].cpu(), g, rtol=1e-4, atol=1e-6)
