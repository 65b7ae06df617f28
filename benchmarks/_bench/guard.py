"""The guard before timing: pyqlora and bitsandbytes must agree (within GUARD_RTOL) on
the first size, or the run stops: a fast kernel that decodes other bytes would make
every ratio meaningless."""
import numpy as np

from .harness import make_input
from .operations import BLOCK_4BIT, BLOCK_8BIT

GUARD_RTOL = 1e-6


def check_bit_compatibility(shape):
    """pyqlora against bitsandbytes on one float32 matrix, within GUARD_RTOL relative:

    1. NF4 without DQ: each library dequantizes its own quantization;
    2. NF4+DQ: each dequantizes the other's bytes (checkpoint dictionaries), and
       pyqlora's own round trip equals bitsandbytes' decoding of pyqlora's bytes;
    3. 8-bit: bitsandbytes decodes pyqlora's codes.

    With DQ the libraries' own quantizations need not agree byte for byte on CPU:
    bitsandbytes' 8-bit CPU kernel (used for the DQ codes) picks the second-nearest
    code for inputs within 3e-5 of a midpoint (docs/format.md, section 6); the number
    of such scales is reported, not failed. Returns a dict; raises SystemExit on a
    mismatch.
    """
    try:
        import bitsandbytes.functional as F
        import torch
    except ImportError as exc:
        return {"status": f"skipped: bitsandbytes missing ({exc})"}
    import pyqlora as pq

    x = make_input(shape, "float32", seed=1)
    xt = torch.from_numpy(x)
    failures = []

    def same(name, ours, theirs):
        theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
        if not np.allclose(ours, theirs, rtol=GUARD_RTOL, atol=0):
            worst = np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), np.finfo(np.float32).tiny))
            failures.append(f"{name}: max relative difference {worst:.3g}")

    packed, state = F.quantize_4bit(xt, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=False)
    q = pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=False)
    same("NF4 round trip", pq.dequantize(q), F.dequantize_4bit(packed, state))

    packed, state = F.quantize_4bit(xt, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=True)
    q = pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=True)
    theirs_as_ours = pq.QuantizedArray.from_bnb_dict(
        {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}, prefix="w")
    same("NF4+DQ, bitsandbytes' bytes", pq.dequantize(theirs_as_ours), F.dequantize_4bit(packed, state))
    ours_dict = {k: torch.from_numpy(v) for k, v in q.to_bnb_dict("w").items()}
    ours_state = F.QuantState.from_dict({k[2:]: v for k, v in ours_dict.items() if k != "w"}, device="cpu")
    same("NF4+DQ, pyqlora's bytes", pq.dequantize(q), F.dequantize_4bit(ours_dict["w"], ours_state))
    dq_codes_differ = int(np.count_nonzero(q.absmax != state.absmax.numpy()))

    codes, absmax = pq.quantize_blockwise(x, blocksize=BLOCK_8BIT)
    same("8-bit, pyqlora's codes", pq.dequantize_blockwise(codes, absmax, blocksize=BLOCK_8BIT),
         F.dequantize_blockwise(torch.from_numpy(codes), absmax=torch.from_numpy(absmax),
                                code=F.create_dynamic_map(signed=True), blocksize=BLOCK_8BIT))

    case = f"{shape[0]}x{shape[1]} float32"
    if failures:
        raise SystemExit(f"bit-compatibility check FAILED on {case}: pyqlora and bitsandbytes differ by "
                         f"more than {GUARD_RTOL:g} relative: " + "; ".join(failures))
    nb = state.absmax.numel()
    return {"status": "ok", "case": case, "rtol": GUARD_RTOL,
            "dq_codes_where_bnb_cpu_kernel_differs": dq_codes_differ, "dq_codes": nb,
            "line": f"bit-compatibility check ({case}): pyqlora == bitsandbytes within {GUARD_RTOL:g} relative "
                    f"(NF4 round trips; NF4+DQ bytes decoded both ways; 8-bit codes). bitsandbytes' CPU kernel "
                    f"chose a second-nearest DQ code for {dq_codes_differ} of {nb} scales (docs/format.md, section 6)."}
