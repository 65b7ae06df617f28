# Fused optimizer updates on 8-bit state (thin bindings; see pyqlora.optim).
from cnf4core cimport nf4_adam_hparams, nf4_adam8bit_update


def adam8bit_update(uint8_t[::1] param, const uint8_t[::1] grad, int dtype, int64_t n,
                    uint8_t[::1] state1, uint8_t[::1] state2, float[::1] absmax1, float[::1] absmax2,
                    const float[::1] qmap1, const float[::1] qmap2, int64_t blocksize,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step):
    # IN/OUT: param (raw bytes), state1, state2, absmax1, absmax2   IN: grad (raw bytes), qmap1, qmap2
    # Returns the number of elements skipped for a non-finite gradient or update.
    cdef int64_t esize = nf4_dtype_size(<nf4_dtype>dtype)
    cdef int64_t nb = nf4_num_blocks(n, blocksize)
    _need(param.shape[0], n * esize, "param")
    _need(grad.shape[0], n * esize, "grad")
    _need(state1.shape[0], n, "state1")
    _need(state2.shape[0], n, "state2")
    _need(absmax1.shape[0], nb, "absmax1")
    _need(absmax2.shape[0], nb, "absmax2")
    _need(qmap1.shape[0], 256, "qmap1")
    _need(qmap2.shape[0], 256, "qmap2")
    cdef nf4_adam_hparams hp
    hp.lr = lr
    hp.beta1 = beta1
    hp.beta2 = beta2
    hp.eps = eps
    hp.weight_decay = weight_decay
    hp.step = step
    cdef int64_t skipped = 0
    cdef nf4_status st
    with nogil:
        st = nf4_adam8bit_update(&param[0], &grad[0], <nf4_dtype>dtype, n, &state1[0], &state2[0], &absmax1[0],
                                 &absmax2[0], &qmap1[0], &qmap2[0], blocksize, &hp, &skipped)
    check(st)
    return skipped
