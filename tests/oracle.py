"""Independent scalar oracles, written from the format spec (docs/format.md)
without calling pyqlora: nearest-code choice, scaling, packing."""
import numpy as np


def nearest_codes(table, s):
    """Code chosen for each scaled value s (float32) by the spec's rule.

    Brute force over all codes: take the largest table value a <= s and the
    smallest b > s; pick b if s > float32((a + b) / 2), else a. Among codes
    sharing the picked value (FP4/INT4 +0 and -0) take the first code when
    s <= value and the last code when s > value.
    """
    table = np.asarray(table, dtype=np.float32)
    s = np.asarray(s, dtype=np.float32).reshape(-1)
    out = np.empty(s.size, dtype=np.uint8)
    uniq = np.unique(table)  # sorted, -0 == +0
    for i, v in enumerate(s):
        below = uniq[uniq <= v]
        above = uniq[uniq > v]
        if below.size == 0:
            value = above[0]
        elif above.size == 0:
            value = below[-1]
        else:
            a, b = below[-1], above[0]
            mid = np.float32(np.float32(a + b) / np.float32(2))
            value = b if v > mid else a
        codes = np.flatnonzero(table == value)
        out[i] = codes[-1] if v > value else codes[0]
    return out


def scaled_blocks(x, blocksize):
    """x (float32, flat) scaled the way the format specifies, and the absmax per block."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    absmax = np.zeros(nb, dtype=np.float32)
    s = np.empty(n, dtype=np.float32)
    for b in range(nb):
        blk = x[b * blocksize : (b + 1) * blocksize]
        am = np.float32(np.max(np.abs(blk)))
        scale = max(am, np.float32(1e-38))
        absmax[b] = am if blk.size == blocksize else scale  # the tail stores the clamped scale
        if blk.size == blocksize:
            s[b * blocksize : b * blocksize + blk.size] = blk * (np.float32(1) / scale)
        else:  # the short tail block divides (bitsandbytes' CPU backend)
            s[b * blocksize :] = blk / scale
    return np.clip(s, -1, 1).astype(np.float32), absmax


def pack_nibbles(codes, pad_code):
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad_code))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed, n):
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 15
    return out[:n]
