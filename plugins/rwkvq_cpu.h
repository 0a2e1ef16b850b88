/* The CPU kernels of cpu_kernels.c, shared by the onnxruntime op library (ort_ops.c) and ctypes users. */
#ifndef RWKVQ_CPU_H
#define RWKVQ_CPU_H
#include <stdint.h>

/* at most this many activation rows take the table-lookup GEMV; more take the panel GEMM (measured
 * crossover at 3072x768: 4 rows GEMV 1.9 ms = GEMM 2.0 ms; 6 rows 2.8 vs 1.9) */
#define RWKVQ_GEMV_MAX_ROWS 4

/* y[M, N] = x[M, K] @ W^T for a vector-quantized W (table-lookup GEMV for few rows, tiled GEMM otherwise).
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int rwkvq_vq_matmul(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                    const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits);
int rwkvq_vq_gemv(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits);
/* below this much work (N * K * M) a GEMV runs on the calling thread alone */
#define RWKVQ_PARALLEL_MIN_WORK 262144
/* The GEMV split into independent pieces for a caller's own thread pool: rwkvq_vq_gemv_chunks pieces, piece
 * `chunk` computing a disjoint range of y's columns (0, or -1 when scratch memory cannot be allocated). */
int rwkvq_vq_gemv_chunks(int N, int K, int M, int group_rows);
int rwkvq_vq_gemv_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks);
/* The same split for the GEMM (prefill): pieces compute disjoint panels of y's columns. */
int rwkvq_vq_gemm_chunks(int N);
int rwkvq_vq_gemm_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks);
int rwkvq_vq_gemm(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits);
/* A piece of a split kernel (rwkvq_vq_gemv_chunk or rwkvq_vq_gemm_chunk). */
typedef int (*rwkvq_chunk_fn)(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                              const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                              int bits, int chunk, int chunks);
/* What rwkvq_vq_matmul runs for M activation rows: the piece function (GEMV up to RWKVQ_GEMV_MAX_ROWS rows, else
 * GEMM) and, in *chunks, how many pieces; for callers that bring their own thread pool. */
rwkvq_chunk_fn rwkvq_vq_matmul_plan(int M, int N, int K, int group_rows, int* chunks);
int rwkvq_vq_decode(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, float* w, int N,
                    int K, int dim, int group_rows, int group_cols, int bits);
/* v[j] = book[index j of the bit stream codes (n_bytes long)], j < n */
void rwkvq_decode_vector(const uint8_t* codes, int n_bytes, int bits, const float* book, float* v, int n);
/* y[i] = x[i] * v[i % n] */
void rwkvq_scale_rows(const float* x, const float* v, float* y, int64_t total, int64_t n);

#endif
