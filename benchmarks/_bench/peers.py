"""The libraries bench_kernels.py compares: one adapter per library, its operations on its
own array type.

To add a peer: subclass ``Library`` (or ``TorchLibrary`` for a torch-based one), give it
a ``name``, a ``load`` that imports it, and ``quantize4``, ``dequantize4``, ``quantize8``,
``dequantize8``; set ``has_out`` if its dequantize takes ``out=``; append the class to
``LIBRARIES``. An operation it lacks is reported as failed, never skipped.
"""
import importlib
import logging
import math

import numpy as np

from .operations import BLOCK_4BIT, BLOCK_8BIT


class Library:
    """Adapter: one library's four operations on its native array type.

    ``load`` imports the library (an ImportError is reported as missing); ``as_input``
    converts a NumPy array, untimed; ``quantize*`` return whatever ``dequantize*`` of
    the same adapter takes, and ``dequantize*`` returns the input's dtype.
    """

    name = "?"
    has_out = False  # dequantize*(q, out=) writes into a preallocated output (empty_like)

    def load(self):
        raise NotImplementedError

    def as_input(self, x):
        return x

    def run(self, op, arg):
        if op.into:  # arg: (what quantize returned, the preallocated output)
            quantized, out = arg
            return getattr(self, op.method)(quantized, out=out)
        return getattr(self, op.method)(arg)


class PyQLoRA(Library):
    name = "pyqlora"
    has_out = True

    def load(self):
        self.pq = importlib.import_module("pyqlora")

    def quantize4(self, x):
        return self.pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=True)

    def dequantize4(self, q, out=None):
        return self.pq.dequantize(q, out=out)

    def quantize8(self, x):
        codes, absmax = self.pq.quantize_blockwise(x, blocksize=BLOCK_8BIT, codebook="dynamic")
        return codes, absmax, x.dtype

    def dequantize8(self, q, out=None):
        codes, absmax, dtype = q
        return self.pq.dequantize_blockwise(codes, absmax, blocksize=BLOCK_8BIT, dtype=dtype, out=out)

    def empty_like(self, x):
        return np.empty_like(x)


class TorchLibrary(Library):
    """Shared by the torch-based peers: zero-copy NumPy -> torch input."""

    def load(self):
        self.torch = importlib.import_module("torch")

    def as_input(self, x):
        return numpy_to_torch(self.torch, x)

    def empty_like(self, x):
        return self.torch.empty_like(x)


class BitsAndBytes(TorchLibrary):
    name = "bitsandbytes"
    has_out = True  # on CPU it raises NotImplementedError: reported as failed, not n/a

    def load(self):
        super().load()
        self.F = importlib.import_module("bitsandbytes.functional")

    def quantize4(self, x):
        return self.F.quantize_4bit(x, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=True)

    def dequantize4(self, q, out=None):
        return self.F.dequantize_4bit(*q, out=out)

    def quantize8(self, x):
        return self.F.quantize_blockwise(x, blocksize=BLOCK_8BIT)

    def dequantize8(self, q, out=None):
        return self.F.dequantize_blockwise(*q, out=out)


class TorchAO(TorchLibrary):
    """torchao's NF4Tensor (its DQ is a linear int8 code: not bitsandbytes' bytes, the same
    amount of work) and, for 8-bit, the blockwise dynamic-map quantizer of its 8-bit
    optimizers (division by the block absmax, binary search over the map)."""

    name = "torchao"

    def load(self):
        super().load()
        importlib.import_module("torchao")  # not installed: say so, not that a submodule is missing
        try:
            self.to_nf4 = importlib.import_module("torchao.quantization").to_nf4
        except (ImportError, AttributeError):  # torchao < 0.13 kept it in torchao.dtypes
            self.to_nf4 = importlib.import_module("torchao.dtypes.nf4tensor").to_nf4
        self.qu = importlib.import_module("torchao.optim.quant_utils")
        self.qmap = self.torch.tensor(self.qu.create_dynamic_map(signed=True), dtype=self.torch.float32)

    def quantize4(self, x):
        return self.to_nf4(x, block_size=BLOCK_4BIT, scaler_block_size=BLOCK_8BIT)

    def dequantize4(self, q):
        return q.get_original_weight()

    def quantize8(self, x):
        scaled, scale = self.qu.scale_tensor(x, BLOCK_8BIT)
        return self.qu.quantize_8bit_with_qmap(scaled, self.qmap), scale, x.dtype

    def dequantize8(self, q):
        codes, scale, dtype = q
        return self.qu.dequant_with_qmap(codes, self.qmap, scale).to(dtype)


class PlainTorch(TorchLibrary):
    """NF4+DQ and 8-bit blockwise quantization as a competent torch user writes them:
    vectorized over blocks, ``torch.bucketize`` over the midpoints of the sorted table
    (ties to the lower code, as bitsandbytes' reference), two codes per byte with the
    even element in the high nibble, and DQ of the scales (minus their mean) with the
    8-bit code in blocks of 256, exactly as bitsandbytes and pyqlora store them.
    The tables are pyqlora's (equal to bitsandbytes'); only their use is timed."""

    name = "plain torch"

    def load(self):
        super().load()
        pq = importlib.import_module("pyqlora")
        torch = self.torch
        self.nf4 = torch.from_numpy(np.asarray(pq.codebook("nf4"), np.float32))
        self.dyn = torch.from_numpy(np.asarray(pq.dynamic_codebook(signed=True), np.float32))
        self.nf4_mid = (self.nf4[:-1] + self.nf4[1:]) / 2
        self.dyn_mid = (self.dyn[:-1] + self.dyn[1:]) / 2

    def _blocks(self, flat, blocksize):
        pad = -flat.numel() % blocksize
        if pad:
            flat = self.torch.nn.functional.pad(flat, (0, pad))
        return flat.view(-1, blocksize)

    def _quantize_blocks(self, flat, blocksize, midpoints):
        blocks = self._blocks(flat.float(), blocksize)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks * (1.0 / absmax.clamp_min(1e-38)).unsqueeze(1)
        codes = self.torch.bucketize(scaled, midpoints, out_int32=True).to(self.torch.uint8)
        return codes, absmax

    def quantize8(self, x):
        codes, absmax = self._quantize_blocks(x.reshape(-1), BLOCK_8BIT, self.dyn_mid)
        return codes.view(-1)[: x.numel()], absmax, x.shape, x.dtype

    def dequantize8(self, q):
        codes, absmax, shape, dtype = q
        out = self.dyn[self._blocks(codes, BLOCK_8BIT).int()] * absmax.unsqueeze(1)
        return out.view(-1)[: math.prod(shape)].to(dtype).view(shape)

    def quantize4(self, x):
        codes, absmax = self._quantize_blocks(x.reshape(-1), BLOCK_4BIT, self.nf4_mid)
        codes = codes.view(-1)[: x.numel()]
        if codes.numel() % 2:
            codes = self.torch.nn.functional.pad(codes, (0, 1), value=7)  # NF4's code of 0.0
        packed = (codes[0::2] << 4) | codes[1::2]
        offset = absmax.mean()
        return packed, self.quantize8(absmax - offset), offset, x.shape, x.dtype

    def dequantize4(self, q):
        packed, dq, offset, shape, dtype = q
        absmax = self.dequantize8(dq) + offset
        codes = self.torch.stack((packed >> 4, packed & 15), dim=1).view(-1)
        out = self.nf4[self._blocks(codes, BLOCK_4BIT).int()] * absmax.unsqueeze(1)
        return out.view(-1)[: math.prod(shape)].to(dtype).view(shape)


LIBRARIES = (PyQLoRA, BitsAndBytes, TorchAO, PlainTorch)


def numpy_to_torch(torch, x):
    if x.dtype.name == "bfloat16":  # torch cannot take ml_dtypes' bfloat16 directly
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def load_libraries():
    """Each adapter loaded, or the reason it is missing (the import error)."""
    loaded = []
    # bitsandbytes and torchao log warnings about optional kernels (CUDA, kernels-community) on import
    logging.disable(logging.WARNING)
    try:
        for cls in LIBRARIES:
            lib = cls()
            try:
                lib.load()
                lib.missing = None
            except Exception as exc:  # ImportError, or a broken install (OSError from a .so)
                lib.missing = f"missing ({type(exc).__name__}: {exc})"
            loaded.append(lib)
    finally:
        logging.disable(logging.NOTSET)
    return loaded
