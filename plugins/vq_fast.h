/* The "fast" VQMatMul decode GEMV (rwkvq_mode.kernels == RWKVQ_KERNELS_FAST), called by cpu_kernels.c.
 *
 * Numerics (rwkvq_dispatch.h): each activation row is quantized to int8 per block of 32 consecutive values
 * (scale d = max|x| / 127, q = round-to-nearest(x / d)); inside a block the codebook entries (int8) meet the
 * int8 activations in an integer dot product; the block sums are scaled by d and the codebook's float scale and
 * accumulated in float. Every instruction set computes the same integer block sums; only the order of the float
 * accumulation differs between them.
 */
#ifndef RWKVQ_VQ_FAST_H
#define RWKVQ_VQ_FAST_H
#include <stdint.h>

/* 1 when the fast GEMV takes this call: 1 <= M <= RWKVQ_GEMV_MAX_ROWS, dim 1 or 2, index_bits <= 7, and steps of
 * 32 codes nest in the column groups (group_cols and K multiples of 32 * dim); else the exact GEMV runs. */
int rwkvq_vq_fast_ok(int M, int K, int dim, int group_cols, int bits);

/* Rows [n0, n1) of y[M, N] = x[M, K] @ W^T with the fast numerics, on the calling thread, for sizes that passed
 * the callers' checks and rwkvq_vq_fast_ok. isa: the instruction set (one the CPU supports). Returns 0, -1 when
 * scratch memory cannot be allocated, or 1 when an activation is not finite (the caller then runs the exact path,
 * which propagates it as the reference does). */
int rwkvq_vq_fast_rows(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                       const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                       int n0, int n1, int isa);

/* The activation quantization of the fast numerics, for any int8 kernel that shares them (the scalar-weight op
 * too): x [n] (n a multiple of 32) to q [n] int8 and d [n / 32] block scales, with the instruction set isa (the
 * same bytes on every one). Returns 0, 1 when a value is not finite (q, d then unspecified), -2 when n is not a
 * positive multiple of 32. */
int rwkvq_quantize_act8(const float* x, int64_t n, int8_t* q, float* d, int isa);

#endif
