/* The CPU kernels of cpu_kernels.c, shared by the onnxruntime op library (ort_ops.c) and ctypes users. */
#ifndef RWKVQ_CPU_H
#define RWKVQ_CPU_H
#include <stddef.h>
#include <stdint.h>

#include "rwkvq_dispatch.h"

/* at most this many activation rows take the table-lookup GEMV; more take the panel GEMM (measured
 * crossover at 3072x768: 4 rows GEMV 1.9 ms = GEMM 2.0 ms; 6 rows 2.8 vs 1.9) */
#define RWKVQ_GEMV_MAX_ROWS 4

/* ---- validation of caller-supplied sizes ----
 * Every size reaches the kernels as an int; these checks run first, in 64-bit arithmetic, so that nothing a model
 * or a caller supplies can overflow an index, divide by zero or address outside the buffers. Each returns NULL when
 * the sizes are consistent, else a one-line reason written into msg (cap bytes) and returned. */

/* The VQMatMul attributes against each other: N, K, dim, group_rows, group_cols in [1, 2^31), index_bits in
 * [1, 12], K and group_cols multiples of dim, and every size the kernels derive from them within int range. */
const char* rwkvq_vq_check_layout(int64_t N, int64_t K, int64_t dim, int64_t group_rows, int64_t group_cols,
                                  int64_t bits, char* msg, size_t cap);
/* codes [N, ceil(K/dim * bits / 8)], codebooks [R, C, 2^bits, dim], scales [R, C] (R = ceil(N / group_rows),
 * C = ceil(K / group_cols)) for a layout that passed rwkvq_vq_check_layout; shapes as rank + dimensions. */
const char* rwkvq_vq_check_payload(int64_t N, int64_t K, int64_t dim, int64_t group_rows, int64_t group_cols,
                                   int64_t bits, int codes_rank, const int64_t* codes_dims, int books_rank,
                                   const int64_t* books_dims, int scales_rank, const int64_t* scales_dims, char* msg,
                                   size_t cap);
/* Activations x [..., K]: rank >= 1, last dimension K, at most 2^31 - 1 rows; the row count goes to *rows. */
const char* rwkvq_vq_check_rows(int64_t K, int x_rank, const int64_t* x_dims, int64_t* rows, char* msg, size_t cap);
/* VQElementwise: index_bits in [1, 16], a vector of n >= 1 values whose bit stream stays within int range. */
const char* rwkvq_ew_check_layout(int64_t bits, int64_t n, char* msg, size_t cap);
/* ... and its inputs: codes [ceil(n * bits / 8)] bytes, codebook [2^bits] values. */
const char* rwkvq_ew_check_payload(int64_t bits, int64_t n, int codes_rank, const int64_t* codes_dims, int book_rank,
                                   const int64_t* book_dims, char* msg, size_t cap);

/* Status codes of the entry points below. */
enum { RWKVQ_OK = 0, RWKVQ_NO_MEMORY = -1, RWKVQ_BAD_SIZES = -2, RWKVQ_BAD_MODE = -3 };

/* y[M, N] = x[M, K] @ W^T for a vector-quantized W (table-lookup GEMV for few rows, tiled GEMM otherwise).
 * Returns 0, -1 when scratch memory cannot be allocated, or -2 when the sizes fail rwkvq_vq_check_layout or
 * row_bytes is not the layout's (the buffers must hold what the sizes say: rwkvq_vq_check_payload), -3 when the
 * mode's numerics are unknown or its instruction set is one this CPU lacks.
 * mode.isa picks the instruction set; mode.kernels == RWKVQ_KERNELS_FAST makes the GEMV (decode) quantize the
 * activations to int8 per block of 32 where the layout allows it (vq_fast.h); the GEMM (prefill) is exact. */
int rwkvq_vq_matmul(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                    const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                    rwkvq_mode mode);
int rwkvq_vq_gemv(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                  rwkvq_mode mode);
/* below this much work (N * K * M) a GEMV runs on the calling thread alone */
#define RWKVQ_PARALLEL_MIN_WORK 262144
/* The GEMV split into independent pieces for a caller's own thread pool: rwkvq_vq_gemv_chunks pieces (-1 for
 * sizes out of range), piece `chunk` computing a disjoint range of y's columns (a status code as above; also -2 for
 * a chunk outside [0, chunks)). */
int rwkvq_vq_gemv_chunks(int N, int K, int M, int group_rows);
int rwkvq_vq_gemv_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks, rwkvq_mode mode);
/* The same split for the GEMM (prefill): pieces compute disjoint panels of y's columns (-1 for N < 1). */
int rwkvq_vq_gemm_chunks(int N);
int rwkvq_vq_gemm_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks, rwkvq_mode mode);
int rwkvq_vq_gemm(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                  rwkvq_mode mode);
/* A piece of a split kernel (rwkvq_vq_gemv_chunk or rwkvq_vq_gemm_chunk). */
typedef int (*rwkvq_chunk_fn)(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                              const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                              int bits, int chunk, int chunks, rwkvq_mode mode);
/* What rwkvq_vq_matmul runs for M activation rows: the piece function (GEMV up to RWKVQ_GEMV_MAX_ROWS rows, else
 * GEMM) and, in *chunks, how many pieces; for callers that bring their own thread pool. NULL for sizes out of
 * range. */
rwkvq_chunk_fn rwkvq_vq_matmul_plan(int M, int N, int K, int group_rows, int* chunks);
/* W [N, K] (float) from the payload; status codes as rwkvq_vq_matmul. */
int rwkvq_vq_decode(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, float* w, int N,
                    int K, int dim, int group_rows, int group_cols, int bits);
/* v[j] = book[index j of the bit stream codes (n_bytes long)], j < n; 0, or -2 when the layout fails
 * rwkvq_ew_check_layout, the codes hold fewer than n indices or the book fewer than 2^bits entries. */
int rwkvq_decode_vector(const uint8_t* codes, int64_t n_bytes, int bits, const float* book, int64_t book_len, float* v,
                        int64_t n);
/* y[i] = x[i] * v[i % n]; 0, or -2 unless n >= 1 and total is a multiple of n. */
int rwkvq_scale_rows(const float* x, const float* v, float* y, int64_t total, int64_t n);

#endif
