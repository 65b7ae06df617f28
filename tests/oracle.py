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


# ---- calibrated rounding (GPTQ error feedback, nf4core/include/nf4core/gptq.h) ----

def gptq_factor(h, damp=0.01, order="natural"):
    """(U, perm, dead) the textbook way (Frantar et al., 2022), float64.

    Inputs with H[i, i] == 0 are dead (their row and column zeroed, diagonal 1);
    `perm` visits large diag(H) first with order="act"; ``damp * mean(diag H)``
    is added to the diagonal; U is the upper Cholesky factor of the inverse of
    the permuted, dampened H: ``U = cholesky(inv(H_p)).T`` (``U^T U = H_p^-1``).
    """
    h = np.array(h, dtype=np.float64)
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1
    diag = np.diag(h).copy()
    perm = np.argsort(-diag, kind="stable") if order == "act" else np.arange(k)
    h = h[np.ix_(perm, perm)] + damp * diag.mean() * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    return u, perm, dead


def _gptq_common(w, perm, blocksize):
    rows, k = w.shape
    n = rows * k
    pos = np.empty(k, np.int64)
    pos[perm] = np.arange(k)
    nblocks = -(-n // blocksize)
    return rows, k, n, pos, nblocks


def gptq_reference64(w, u, perm, blocksize, table):
    """(codes, absmax) of the calibrated rounding in float64, written from the
    algorithm: at step j (column c = perm[j]) every block entered for the first
    time takes absmax = max |w| over its elements (error feedback of steps < j
    applied); each row's code is the nearest (float64 midpoints, ties low) to
    clip(w / max(absmax, 1e-38), -1, 1); err = (w - value * scale) / U[j, j]; the
    later columns of the row get w[t] -= err * U[j, t]."""
    rows, k, n, pos, nblocks = _gptq_common(w, perm, blocksize)
    table = np.asarray(table, np.float32)
    idx = np.argsort(table, kind="stable")
    vals = table[idx].astype(np.float64)
    mids = (vals[:-1] + vals[1:]) / 2
    W = np.array(w, np.float64)[:, perm]
    scale = np.full(nblocks, -1.0)
    codes = np.zeros(n, np.uint8)
    for j in range(k):
        c = perm[j]
        flat = np.arange(rows) * k + c
        blocks = flat // blocksize
        for b in np.unique(blocks):
            if scale[b] < 0:
                f = np.arange(b * blocksize, min(b * blocksize + blocksize, n))
                scale[b] = np.abs(W[f // k, pos[f % k]]).max()
        s = np.maximum(scale[blocks], 1e-38)
        x = np.clip(W[:, j] / s, -1, 1)
        code = idx[(x[:, None] > mids[None, :]).sum(axis=1)]
        codes[flat] = code
        err = (W[:, j] - table[code].astype(np.float64) * s) / u[j, j]
        W[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    absmax = scale.astype(np.float32)
    if n % blocksize:
        absmax[-1] = max(absmax[-1], np.float32(1e-38))
    return codes, absmax


def gptq_reference32(w, u, perm, blocksize, table):
    """(codes, absmax) of the float32 kernel's arithmetic, emulated: the format's
    scaling (full blocks multiply by the float32 reciprocal, the tail divides),
    nearest_codes, decoded value table[code] * absmax in float32, err = (w - dq) *
    float32(1 / U[j, j]), and every update one fused multiply-add in step order
    (emulated in float64, where the float32 product is exact)."""
    rows, k, n, pos, nblocks = _gptq_common(w, perm, blocksize)
    table = np.asarray(table, np.float32)
    u = np.asarray(u, np.float32)
    W = np.array(w, np.float32)[:, perm]
    absmax = np.zeros(nblocks, np.float32)
    started = np.zeros(nblocks, bool)
    codes = np.zeros(n, np.uint8)
    one, tiny = np.float32(1), np.float32(1e-38)
    for j in range(k):
        c = perm[j]
        flat = np.arange(rows) * k + c
        blocks = flat // blocksize
        for b in np.unique(blocks):
            if not started[b]:
                f = np.arange(b * blocksize, min(b * blocksize + blocksize, n))
                amax = np.abs(W[f // k, pos[f % k]]).max()
                tail = f.size < blocksize
                absmax[b] = max(amax, tiny) if tail else amax
                started[b] = True
        x = W[:, j]
        stored = absmax[blocks]
        scaled = np.empty(rows, np.float32)
        for r in range(rows):
            sc = max(stored[r], tiny)
            tail = (blocks[r] + 1) * blocksize > n
            scaled[r] = x[r] / sc if tail else x[r] * (one / sc)
        scaled = np.clip(scaled, -1, 1).astype(np.float32)
        code = nearest_codes(table, scaled)
        codes[flat] = code
        dq = (table[code] * stored).astype(np.float32)
        err = ((x - dq).astype(np.float32) * (one / u[j, j])).astype(np.float32)
        upd = -err.astype(np.float64)[:, None] * u[j, j + 1:].astype(np.float64)[None, :] + W[:, j + 1:]
        W[:, j + 1:] = upd.astype(np.float32)
    return codes, absmax
