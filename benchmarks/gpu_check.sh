#!/usr/bin/env bash
# The prepared GPU check of nf4core's CUDA path (issue 8). On a machine with an
# NVIDIA GPU, nvcc and a CUDA build of torch, in about 3-5 minutes:
#   1. builds nf4core for this GPU's architecture and runs its C++ tests
#      (test_cuda: every CUDA kernel byte-identical to the CPU path;
#      test_cuda_adam: the 8-bit Adam kernel == the CPU's bytes; test_cuda_pager:
#      the pager's CUDA backend under a device budget);
#   2. installs pyqlora with pip --target beside the system torch and runs tests/test_cuda.py
#      (marker gpu: pq.quantize/dequantize of CUDA tensors == CPU bytes);
#   3. measures NF4+DQ dequantize -> bf16 in GB/s against the device's peak
#      (nominal, and a measured device-to-device copy), and the GEMV
#      1x8192 . (8192x8192)^T against torch bf16/fp16 dense (bitsandbytes too
#      when it is installed with CUDA); the pager's CUDA backend under a
#      device budget (3 x 512 MiB through a 1 GiB budget: evictions, data
#      intact, time against no budget); the 8-bit Adam kernel (bytes == CPU
#      on 2^24 elements, GB/s on 2^26);
#   4. prints one summary table (also written to $OUT/gpu_check.json).
#
# Usage: bash benchmarks/gpu_check.sh        (OUT=/tmp/gpu_check, PYTHON=python3)
# Needs: python3 with numpy, ml_dtypes, torch (CUDA), pytest, meson, meson-python,
# Cython, ninja; nvcc on PATH. Run on an H200 (2026-12-04): docs/performance.md "CUDA".
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
mkdir -p "$OUT"
T0=$(date +%s)
declare -a SUMMARY=()
FAILED=0

note() { printf '[gpu_check %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
record() { SUMMARY+=("$1|$2"); }  # step|result

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed); nothing to check" >&2
    exit 2
fi
if ! command -v nvcc >/dev/null 2>&1; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && PATH="$d:$PATH" && break; done
fi
command -v nvcc >/dev/null 2>&1 || { echo "gpu_check: nvcc not found" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
# Build only for the GPU in front of us (the library's default list is for wheels).
CC_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
ARCH="${CC_ARCH}+PTX"
note "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), building for sm_${CC_ARCH}"

# 1. standalone nf4core + its C++ tests (cuda: byte-identical to the CPU path)
BUILD="$OUT/build-nf4core"
rm -rf "$BUILD"
if timeout 240 meson setup "$BUILD" "$REPO/nf4core" -Dcuda=enabled "-Dnvcc_arch=$ARCH" >"$OUT/meson-setup.log" 2>&1 &&
   timeout 240 meson compile -C "$BUILD" -j "$JOBS" >"$OUT/meson-compile.log" 2>&1; then
    if timeout 200 meson test -C "$BUILD" cuda cuda_adam cuda_pager cuda_adam_math cuda_api shared_math quantize \
        numeric matmul c_api \
        --print-errorlogs >"$OUT/meson-test.log" 2>&1; then
        record "C++ tests (test_cuda: CUDA == CPU bytes)" "PASS"
    else
        record "C++ tests (test_cuda: CUDA == CPU bytes)" "FAIL (see $OUT/meson-test.log)"; FAILED=1
    fi
else
    record "nf4core build with CUDA" "FAIL (see $OUT/meson-*.log)"; FAILED=1
fi
note "C++ done"

# 1b. host time of the launch path (cudaGetDevice, launches with small and large
# parameters, the GEMV and the fused DQ dequantize on a tiny problem)
if [ -f "$BUILD/libnf4core.so" ] &&
   nvcc -std=c++17 -O2 "-arch=sm_${CC_ARCH}" "$REPO/benchmarks/cuda_launch_cost.cu" -I "$REPO/nf4core/include" \
        -L "$BUILD" -lnf4core -Xlinker "-rpath=$BUILD" -o "$OUT/cuda_launch_cost" >"$OUT/launch-cost.log" 2>&1 &&
   timeout 60 "$OUT/cuda_launch_cost" >>"$OUT/launch-cost.log" 2>&1; then
    record "host us per call" "$(grep -v '^status' "$OUT/launch-cost.log" | tr '\n' ';' | sed 's/;$//')"
else
    record "host us per call" "FAIL (see $OUT/launch-cost.log)"
fi

# 2. the Python package beside the system's torch, GPU tests
# Installed with --target into $OUT/site, not into a new venv: a venv made from
# inside another venv (the usual home of a CUDA torch) would see the base
# interpreter's site-packages, not the one that holds torch.
SITE="$OUT/site"
rm -rf "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps --target "$SITE" \
        "-Csetup-args=-Dnf4core:nvcc_arch=$ARCH" "$REPO" >"$OUT/pip.log" 2>&1; then
    # run from $OUT so that the source tree's pyqlora/ does not shadow the installed one
    if (cd "$OUT" && PYQLORA_EXPECT_CUDA=1 timeout 240 "$PY" -m pytest "$REPO/tests/test_cuda.py" \
            -q -rs -p no:cacheprovider --rootdir "$REPO" >"$OUT/pytest.log" 2>&1); then
        record "pytest tests/test_cuda.py (incl. gpu)" "PASS: $(tail -n1 "$OUT/pytest.log")"
    else
        record "pytest tests/test_cuda.py (incl. gpu)" "FAIL: $(tail -n1 "$OUT/pytest.log")"; FAILED=1
    fi
else
    record "pip install (CUDA build)" "FAIL (see $OUT/pip.log)"; FAILED=1
fi
note "pytest done"

# 3. measurements
cd "$OUT" || exit 2
timeout 240 "$PY" - "$OUT/gpu_check.json" >"$OUT/bench.txt" 2>"$OUT/bench.err" <<'PYEOF'
import json
import os
import sys
import time

import torch

import pyqlora as pq
from pyqlora import _cuda
from pyqlora import _nf4core as ext

out_json = sys.argv[1]
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
name = props.name
# Nominal HBM bandwidth (vendor data sheets), GB/s; measured copy bandwidth too.
NOMINAL = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350,
           "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100": 1555,
           "L40S": 864, "L4": 300, "RTX 4090": 1008, "A10": 600, "GH200": 4000}
nominal = next((v for k, v in NOMINAL.items() if k in name), None)


def timed(fn, reps=50, warmup=5, inner=1):
    """Median seconds per call of the GPU work; `inner` back-to-back calls per
    timing. Before each timing the GPU is held busy (torch.cuda._sleep, ~150 us
    per call) while the host queues the calls, so that microsecond kernels are
    timed on the GPU's queue, not at the host's launch rate."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(300_000 * inner)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / inner)
    times.sort()
    return times[len(times) // 2]


res = {"device": name, "nominal_GBps": nominal, "built": list(_cuda.cuda_available())}

# measured peak: device-to-device copy of 2 GiB (read + write)
src = torch.empty(2**29, dtype=torch.float32, device=dev)
dst = torch.empty_like(src)
t = timed(lambda: dst.copy_(src), reps=20)
res["copy_GBps"] = 2 * src.numel() * 4 / t / 1e9
del src, dst

# dequantize NF4 + DQ -> bf16, 2^28 weights (as one large layer group)
n = 2**28
w = torch.randn(n, device=dev, dtype=torch.bfloat16)
q = pq.quantize(w, blocksize=64, double_quant=True)
out = torch.empty(n, dtype=torch.bfloat16, device=dev)
moved = n // 2 + (n // 64) + (n // 64 // 256) * 4 + 2 * n  # codes + DQ codes + nested + bf16 out
os.environ["NF4CORE_CUDA_KERNELS"] = "v1"  # the first kernel, for the same-run comparison
res["dequant_v1_GBps"] = moved / timed(lambda: pq.dequantize(q, out=out.view(q.shape)), reps=30) / 1e9
del os.environ["NF4CORE_CUDA_KERNELS"]
t = timed(lambda: pq.dequantize(q, out=out.view(q.shape)), reps=30)
res["dequant_s"] = t
res["dequant_GBps"] = moved / t / 1e9
res["dequant_frac_copy"] = res["dequant_GBps"] / res["copy_GBps"]
res["dequant_frac_nominal"] = res["dequant_GBps"] / nominal if nominal else None
del w, out

# bitsandbytes peer, same tensor size (optional)
try:
    import bitsandbytes.functional as bnbf

    wb = torch.randn(n, device=dev, dtype=torch.bfloat16)
    qb, st = bnbf.quantize_4bit(wb, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = timed(lambda: bnbf.dequantize_4bit(qb, st), reps=30)
    res["bnb_dequant_GBps"] = moved / t / 1e9
    del wb, qb
except Exception as exc:  # noqa: BLE001 - a missing or CPU-only peer is reported, not fatal
    res["bnb_dequant_GBps"] = None
    res["bnb_note"] = f"{type(exc).__name__}: {exc}"[:120]

# GEMV 1x8192 . (8192x8192)^T: NF4 + DQ vs dense bf16 / fp16
N = K = 8192
W = torch.randn(N, K, device=dev, dtype=torch.float32)
qw = pq.quantize(W, blocksize=64, double_quant=True)
for dt_name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    x = torch.randn(1, K, device=dev, dtype=dt)
    Wd = W.to(dt)
    y = torch.empty(1, N, device=dev, dtype=dt)
    stream = torch.cuda.current_stream(dev).cuda_stream
    kdt = _cuda._kernel_dtype(dt)
    nf4, dyn = pq._codebooks.lookup_table("nf4", 16), pq._codebooks.lookup_table("dynamic", 256)

    def nf4_gemv():  # the binding itself: pq-level validation would dominate a ~10 us kernel
        ext.cuda_gemv_dq(x.data_ptr(), kdt, 1, N, K, qw.packed.data_ptr(), qw.absmax.data_ptr(),
                         qw.nested_absmax.data_ptr(), qw.nested_offset, 64, nf4, dyn, y.data_ptr(), stream)

    t_dense = timed(lambda: torch.nn.functional.linear(x, Wd), reps=20, inner=100)
    t_nf4 = timed(nf4_gemv, reps=20, inner=100)
    res[f"gemv_{dt_name}_pq_call_us"] = timed(lambda: _cuda.gemv(x, qw), reps=20, inner=100) * 1e6
    ref = torch.nn.functional.linear(x.float(), pq.dequantize(qw, dtype="float32"))
    err = (_cuda.gemv(x, qw).float() - ref).abs().max().item() / ref.abs().max().item()
    res[f"gemv_{dt_name}_dense_us"] = t_dense * 1e6
    res[f"gemv_{dt_name}_nf4_us"] = t_nf4 * 1e6
    res[f"gemv_{dt_name}_speedup"] = t_dense / t_nf4
    res[f"gemv_{dt_name}_relerr"] = err
    res[f"gemv_{dt_name}_weight_GBps"] = (N * K // 2 + N * K // 64) / t_nf4 / 1e9
# the same-run comparison of the GEMV kernels, bf16, 1x8192.(8192x8192)^T: the
# first kernel (v1) and gemv_rows_kernel with each forced row count
x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
y = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
kdt = _cuda._kernel_dtype(torch.bfloat16)
for name, env in (("v1", {"NF4CORE_CUDA_KERNELS": "v1"}), ("R1", {"NF4CORE_CUDA_GEMV_ROWS": "1"}),
                  ("R2", {"NF4CORE_CUDA_GEMV_ROWS": "2"}), ("R4", {"NF4CORE_CUDA_GEMV_ROWS": "4"}),
                  ("R8", {"NF4CORE_CUDA_GEMV_ROWS": "8"})):
    os.environ.update(env)
    res[f"gemv_variant_{name}_us"] = timed(
        lambda: ext.cuda_gemv_dq(x.data_ptr(), kdt, 1, N, K, qw.packed.data_ptr(), qw.absmax.data_ptr(),
                                 qw.nested_absmax.data_ptr(), qw.nested_offset, 64, nf4, dyn, y.data_ptr(), stream),
        reps=20, inner=100) * 1e6
    for k in env:
        del os.environ[k]

# the default kernel on the shapes of a 7B/8B decoder (bf16, NF4 + DQ, M = 1 and 4)
shapes = []
for (n_, k_) in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)):
    Wk = torch.randn(n_, k_, device=dev, dtype=torch.bfloat16)
    qk = pq.quantize(Wk, blocksize=64, double_quant=True)
    for m_ in (1, 4):
        xk = torch.randn(m_, k_, device=dev, dtype=torch.bfloat16)
        yk = torch.empty(m_, n_, device=dev, dtype=torch.bfloat16)
        td = timed(lambda: torch.nn.functional.linear(xk, Wk), reps=20, inner=100)
        tq = timed(lambda: ext.cuda_gemv_dq(xk.data_ptr(), kdt, m_, n_, k_, qk.packed.data_ptr(), qk.absmax.data_ptr(),
                                            qk.nested_absmax.data_ptr(), qk.nested_offset, 64, nf4, dyn,
                                            yk.data_ptr(), stream), reps=20, inner=100)
        shapes.append({"M": m_, "N": n_, "K": k_, "dense_us": td * 1e6, "nf4_us": tq * 1e6, "speedup": td / tq,
                       "weight_GBps": (n_ * k_ // 2 + n_ * k_ // 64) / tq / 1e9})
    del Wk, qk
res["gemv_shapes"] = shapes

# where the host time of _cuda.gemv goes (us per call, host clock, 200 calls
# each, queued behind a GPU sleep so that a full launch queue never blocks them)
def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    secs = time.perf_counter() - t0
    torch.cuda.synchronize()
    return secs / n * 1e6

x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
res["host_us"] = {
    "_cuda.gemv": host_us(lambda: _cuda.gemv(x, qw)),
    "binding": host_us(lambda: ext.cuda_gemv_dq(x.data_ptr(), kdt, 1, N, K, qw.packed.data_ptr(), qw.absmax.data_ptr(),
                                                qw.nested_absmax.data_ptr(), qw.nested_offset, 64, nf4, dyn,
                                                y.data_ptr(), stream)),
    "torch.empty": host_us(lambda: torch.empty((1, N), dtype=x.dtype, device=x.device)),
    "_as_tensor": host_us(lambda: _cuda._as_tensor(x)),
    "torch.cuda.device ctx": host_us(lambda: torch.cuda.device(x.device).__enter__()),
    "current_stream": host_us(lambda: torch.cuda.current_stream(x.device).cuda_stream),
    "lookup_table x2": host_us(lambda: (pq._codebooks.lookup_table("nf4", 16),
                                        pq._codebooks.lookup_table("dynamic", 256))),
}
# the C function itself through ctypes (no Cython, no numpy memoryviews), and
# its checks alone (M = 0 fails after the argument checks, before any CUDA call)
try:
    import ctypes

    lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(out_json)), "build-nf4core", "libnf4core.so"))
    f_dq = lib.nf4_cuda_gemv_4bit_dq
    f_dq.restype = ctypes.c_int
    f_dq.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    cb_p, dyn_p = nf4.ctypes.data, dyn.ctypes.data
    args = (x.data_ptr(), kdt, 1, N, K, qw.packed.data_ptr(), qw.absmax.data_ptr(), qw.nested_absmax.data_ptr(),
            qw.nested_offset, 64, cb_p, dyn_p, y.data_ptr(), stream)
    assert f_dq(*args) == 0
    res["host_us"]["C call (ctypes)"] = host_us(lambda: f_dq(*args))
    bad = (x.data_ptr(), kdt, 0) + args[3:]
    res["host_us"]["C checks only (ctypes)"] = host_us(lambda: f_dq(*bad))
except Exception as exc:  # noqa: BLE001
    res["host_us"]["ctypes"] = f"{type(exc).__name__}: {exc}"[:120]
torch.cuda.synchronize()

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    qb, st = bnbf.quantize_4bit(W.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
    res["gemv_bnb_us"] = timed(lambda: bnb.matmul_4bit(x, qb.t(), quant_state=st), reps=20, inner=100) * 1e6
except Exception as exc:  # noqa: BLE001
    res["gemv_bnb_us"] = None

# the pager's CUDA backend under a device budget: 3 arrays of 512 MiB, 1 GiB budget
import time

import numpy as np

MiB = 1 << 20


def pager_rounds(budget):
    pg = pq.Pager(budget_bytes=budget, device="cuda")
    arrs = [pg.zeros(128 * MiB, dtype=np.float32) for _ in range(3)]
    for k, a in enumerate(arrs):
        a[::4096] = k  # host writes, one per 16 KiB
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        for a in arrs:
            pg.prefetch(a)
            pg.as_tensor(a).add_(1)  # the device reads and writes every byte
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    s = pg.stats()
    pg.evict()
    pg.synchronize()
    intact = all(bool(np.all(a[::4096] == k + 4)) and bool(np.all(a[1::4096] == 4)) for k, a in enumerate(arrs))
    del arrs
    pg.close()
    return secs, s, intact


try:
    secs_b, st_b, ok_b = pager_rounds(1024 * MiB)
    secs_u, st_u, ok_u = pager_rounds(None)
    res["pager_budget_s"] = secs_b
    res["pager_unlimited_s"] = secs_u
    res["pager_budget_page_ins"] = st_b["page_ins"]
    res["pager_budget_page_outs"] = st_b["page_outs"]
    res["pager_budget_max_ok"] = st_b["resident_bytes"] <= 1024 * MiB
    res["pager_intact"] = bool(ok_b and ok_u)
    res["pager_moved_GBps"] = (st_b["page_ins"] + st_b["page_outs"]) * st_b["page_bytes"] / secs_b / 1e9
except Exception as exc:  # noqa: BLE001 - reported in the table
    res["pager_error"] = f"{type(exc).__name__}: {exc}"[:200]

# 8-bit Adam on the device: bytes == CPU on 2^24 elements (fp32, NaN included), GB/s on 2^26
try:
    q1 = np.ascontiguousarray(pq.dynamic_codebook(signed=True), dtype=np.float32)
    q2 = np.ascontiguousarray(pq.dynamic_codebook(signed=False), dtype=np.float32)
    F32 = pq._dtypes.NF4_FLOAT32
    hpar = (1e-3, 0.9, 0.999, 1e-8, 0.01)

    def adam_state(n, device):
        nb = -(-n // 256)
        return (torch.full((n,), 127, dtype=torch.uint8, device=device), torch.zeros(n, dtype=torch.uint8, device=device),
                torch.zeros(nb, device=device), torch.zeros(nb, device=device))

    n = 2**24
    gen = torch.Generator().manual_seed(0)
    p_cpu = torch.randn(n, generator=gen)
    p_gpu = p_cpu.cuda()
    st_cpu, st_gpu = adam_state(n, "cpu"), adam_state(n, dev)
    same = True
    for step in (1, 2, 3):
        g = torch.randn(n, generator=gen) * 0.1
        g[12345] = float("nan")
        sk_c = ext.adam8bit_update(p_cpu.view(torch.uint8).numpy(), g.view(torch.uint8).numpy(), F32, n,
                                   *[t.numpy() for t in st_cpu], q1, q2, 256, *hpar, step)
        gg = g.cuda()
        sk_g = ext.cuda_adam8bit_update(p_gpu.data_ptr(), gg.data_ptr(), F32, n, *[t.data_ptr() for t in st_gpu], q1,
                                        q2, 256, *hpar, step, torch.cuda.current_stream().cuda_stream)
        same = same and sk_c == sk_g == 1 and torch.equal(p_gpu.cpu().view(torch.int32), p_cpu.view(torch.int32))
        same = same and all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
                            for a, b in zip(st_gpu, st_cpu))
    res["adam8bit_bytes_equal_cpu"] = bool(same)
    n = 2**26
    p = torch.randn(n, device=dev)
    g = torch.randn(n, device=dev) * 0.1
    st = adam_state(n, dev)
    stream = torch.cuda.current_stream().cuda_stream
    step_box = [0]

    def adam_call():
        step_box[0] += 1
        ext.cuda_adam8bit_update(p.data_ptr(), g.data_ptr(), F32, n, *[t.data_ptr() for t in st], q1, q2, 256, *hpar,
                                 step_box[0], stream)

    t = timed(adam_call, reps=20)
    res["adam8bit_us"] = t * 1e6
    res["adam8bit_GBps"] = n * 16 / t / 1e9  # nominal traffic: p r/w 8, g 4, two codes r/w 4 (absmax ~0)
except Exception as exc:  # noqa: BLE001
    res["adam8bit_error"] = f"{type(exc).__name__}: {exc}"[:200]

with open(out_json, "w") as f:
    json.dump(res, f, indent=1)
for k, v in res.items():
    print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
PYEOF
BENCH_RC=$?
if [ $BENCH_RC -ne 0 ]; then
    record "benchmarks" "FAIL rc=$BENCH_RC: $(tail -n2 "$OUT/bench.err" | tr '\n' ' ')"; FAILED=1
fi

# 4. the summary table
"$PY" - "$OUT/gpu_check.json" "$(( $(date +%s) - T0 ))" "${SUMMARY[@]}" <<'PYEOF'
import json
import os
import sys

path, secs, rows = sys.argv[1], sys.argv[2], [r.split("|", 1) for r in sys.argv[3:]]
res = json.load(open(path)) if os.path.exists(path) else {}


def f(key, fmt="{:.1f}"):
    v = res.get(key)
    return "n/a" if v is None else fmt.format(v)


print()
print("=" * 78)
print(f"nf4core CUDA check on {res.get('device', '?')}  ({secs} s)")
print("-" * 78)
for step, result in rows:
    print(f"{step:<44} {result}")
if res:
    print("-" * 78)
    print(f"{'device copy bandwidth (measured)':<44} {f('copy_GBps')} GB/s   nominal {res.get('nominal_GBps')} GB/s")
    print(f"{'dequantize NF4+DQ -> bf16, 2^28 weights':<44} {f('dequant_GBps')} GB/s = "
          f"{f('dequant_frac_nominal', '{:.0%}')} of nominal, {f('dequant_frac_copy', '{:.0%}')} of copy "
          "(target >= 80%)")
    print(f"{'  bitsandbytes dequantize_4bit (same size)':<44} {f('bnb_dequant_GBps')} GB/s")
    for dt in ("bf16", "fp16"):
        print(f"{'GEMV 1x8192.(8192x8192)^T NF4+DQ, ' + dt:<44} {f('gemv_' + dt + '_nf4_us')} us vs dense "
              f"{f('gemv_' + dt + '_dense_us')} us: {f('gemv_' + dt + '_speedup', '{:.2f}')}x (target >= 3x), "
              f"rel.err {f('gemv_' + dt + '_relerr', '{:.1e}')}")
    print(f"{'  same through pq (_cuda.gemv), bf16':<44} {f('gemv_bf16_pq_call_us')} us per call (host overhead incl.)")
    print(f"{'  kernels, same shape, bf16 (us)':<44} " + ", ".join(
        f"{k[len('gemv_variant_'):-3]} {res[k]:.1f}" for k in res if k.startswith("gemv_variant_")))
    print(f"{'  first dequantize kernel (v1), same tensor':<44} {f('dequant_v1_GBps')} GB/s")
    for r in res.get("gemv_shapes", []):
        print(f"{'  GEMV %dx%d.(%dx%d)^T bf16' % (r['M'], r['K'], r['N'], r['K']):<44} {r['nf4_us']:.1f} us vs dense "
              f"{r['dense_us']:.1f} us: {r['speedup']:.2f}x, weights at {r['weight_GBps']:.0f} GB/s")
    if "host_us" in res:
        print(f"{'  host us per call':<44} " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res["host_us"].items()))
    print(f"{'  bitsandbytes matmul_4bit (bf16)':<44} {f('gemv_bnb_us')} us")
    if "pager_error" in res:
        print(f"{'CUDA pager, 3x512 MiB through a 1 GiB budget':<44} ERROR {res['pager_error']}")
    else:
        print(f"{'CUDA pager, 3x512 MiB through a 1 GiB budget':<44} {f('pager_budget_s', '{:.2f}')} s for 4 rounds "
              f"vs {f('pager_unlimited_s', '{:.2f}')} s unlimited; page-ins {res.get('pager_budget_page_ins')}, "
              f"page-outs {res.get('pager_budget_page_outs')}, resident<=budget {res.get('pager_budget_max_ok')}, "
              f"data intact {res.get('pager_intact')}, {f('pager_moved_GBps')} GB/s moved")
    if "adam8bit_error" in res:
        print(f"{'8-bit Adam kernel':<44} ERROR {res['adam8bit_error']}")
    else:
        print(f"{'8-bit Adam kernel, 2^26 fp32 params':<44} {f('adam8bit_us')} us = {f('adam8bit_GBps')} GB/s "
              f"(16 B/param); bytes == CPU (2^24, 3 steps): {res.get('adam8bit_bytes_equal_cpu')}")
print("=" * 78)
PYEOF
exit $FAILED
