/* CPU kernels for rwkvq.VQMatMul (see rwkvq_onnx/ops.py for the semantics and the numpy reference).
 *
 * Called by the onnxruntime op library (ort_ops.c) and, through ctypes, by rwkvq_onnx.cpu_kernels; built by the
 * package install (setuptools extension,
 * -O3 -march=native -fopenmp). Decode is memory-bound in theory, table-lookup-bound in practice: each
 * thread decodes its row block's codebooks (scale folded in) into a small float table that stays in L1,
 * then streams each row's packed codes eight at a time through table lookups.
 *
 *   x      float  [M, K]            activations
 *   codes  uint8  [N, row_bytes]    each row a little-endian bit stream of K/dim indices
 *   books  int8   [R, C, E, dim]    codebook of row block n / group_rows and column group col / group_cols
 *   scales float  [R, C]
 *   y      float  [M, N]            (rwkvq_vq_gemv)      W float [N, K] (rwkvq_vq_decode)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "rwkvq_cpu.h"

static void unpack_row(const uint8_t* row, int n, int bits, int32_t* out) {
    uint64_t buf = 0;
    int have = 0;
    const uint32_t mask = (1u << bits) - 1u;
    for (int j = 0; j < n; ++j) {
        while (have < bits) {
            buf |= (uint64_t)(*row++) << have;
            have += 8;
        }
        out[j] = (int32_t)(buf & mask);
        buf >>= bits;
        have -= bits;
    }
}

static void decode_table(const int8_t* books, const float* scales, int rb, int C, int per_book, float* table) {
    const int8_t* src = books + (size_t)rb * C * per_book;
    for (int c = 0; c < C; ++c) {
        const float s = scales[(size_t)rb * C + c];
        for (int i = 0; i < per_book; ++i) table[c * per_book + i] = s * (float)src[c * per_book + i];
    }
}

static inline uint32_t read_code(const uint8_t* row, int row_bytes, int j, int bits) {
    const int bit = j * bits, byte = bit >> 3;
    uint32_t w = 0;
    for (int b = 0; b < 4 && byte + b < row_bytes; ++b) w |= (uint32_t)row[byte + b] << (8 * b);
    return (w >> (bit & 7)) & ((1u << bits) - 1u);
}

/* sum over codes [j0, j1) of one row (one column group, codebook `tab`) of tab[code*dim + t] * x[j*dim + t].
 * Eight codes at a time come from one unaligned 64-bit load (8 * bits + 7 <= 64 bits for bits <= 7, and bits = 8
 * is byte aligned); entries are looked up in the L1-resident table with independent accumulators. (AVX2 gathers
 * were measured slower than this on the 2-core AMD EPYC machines the project runs on.) */
static float row_group_dot(const uint8_t* row, int row_bytes, int bits, const float* tab, const float* x, int j0,
                           int j1, int dim) {
    const uint64_t mask = (1u << bits) - 1u;
    /* 8 independent accumulators: the FMA latency chain, not the loads, bounds a scalar lookup loop */
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int j = j0;
    if (bits <= 8 && (dim == 1 || dim == 2)) {
        for (; j + 8 <= j1; j += 8) {
            const int bit = j * bits, byte = bit >> 3;
            if (byte + 8 > row_bytes) break;
            uint64_t w;
            memcpy(&w, row + byte, 8);
            w >>= (bit & 7);
            const float* xp = x + (size_t)(j - j0) * dim;
            if (dim == 2) {
                for (int i = 0; i < 8; ++i) {
                    const float* e = tab + ((w >> (i * bits)) & mask) * 2;
                    a[i] += e[0] * xp[2 * i] + e[1] * xp[2 * i + 1];
                }
            } else {
                for (int i = 0; i < 8; ++i) a[i] += tab[(w >> (i * bits)) & mask] * xp[i];
            }
        }
    }
    float acc = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (; j < j1; ++j) {
        const float* e = tab + read_code(row, row_bytes, j, bits) * dim;
        for (int t = 0; t < dim; ++t) acc += e[t] * x[(j - j0) * dim + t];
    }
    return acc;
}

#if defined(__AVX2__) && defined(__FMA__)
/* The common case (dim 2, 4..8 index bits) vectorised over one whole row: each code's entry is one 64-bit load of
 * two floats, four entries are assembled into a 256-bit register against eight contiguous activations, one FMA.
 * BITS is a compile-time constant in each instantiation (constant shifts and masks: measured 1.7x faster than a
 * run-time width). Codes [0, safe) are read eight at a time with one unaligned 64-bit load that stays inside the
 * row; the rest one by one. */
static inline __attribute__((always_inline)) float row_dot_dim2(const uint8_t* row, int row_bytes, const int BITS,
                                                                const float* table, int per_book, const float* x,
                                                                int n_codes, int codes_per_group) {
    const uint64_t mask = (1u << BITS) - 1u;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float tail = 0.f;
    for (int j0 = 0, c = 0; j0 < n_codes; j0 += codes_per_group, ++c) {
        const int j1 = j0 + codes_per_group < n_codes ? j0 + codes_per_group : n_codes;
        const double* t = (const double*)(table + (size_t)c * per_book);
        int j = j0;
        for (; j + 8 <= j1 && ((j * BITS) >> 3) + 8 <= row_bytes; j += 8) {
            const int bit = j * BITS;
            uint64_t w;
            memcpy(&w, row + (bit >> 3), 8);
            w >>= (bit & 7);
            const __m128d lo0 = _mm_loadh_pd(_mm_load_sd(t + (w & mask)), t + ((w >> BITS) & mask));
            const __m128d hi0 = _mm_loadh_pd(_mm_load_sd(t + ((w >> (2 * BITS)) & mask)), t + ((w >> (3 * BITS)) & mask));
            const __m128d lo1 = _mm_loadh_pd(_mm_load_sd(t + ((w >> (4 * BITS)) & mask)), t + ((w >> (5 * BITS)) & mask));
            const __m128d hi1 = _mm_loadh_pd(_mm_load_sd(t + ((w >> (6 * BITS)) & mask)), t + ((w >> (7 * BITS)) & mask));
            const float* xp = x + (size_t)j * 2;
            a0 = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_set_m128d(hi0, lo0)), _mm256_loadu_ps(xp), a0);
            a1 = _mm256_fmadd_ps(_mm256_castpd_ps(_mm256_set_m128d(hi1, lo1)), _mm256_loadu_ps(xp + 8), a1);
        }
        for (; j < j1; ++j) {
            const float* e = (const float*)t + read_code(row, row_bytes, j, BITS) * 2;
            tail += e[0] * x[(size_t)j * 2] + e[1] * x[(size_t)j * 2 + 1];
        }
    }
    const __m256 a = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1))) + tail;
}

/* One specialised row kernel per index width; 0 when the width has none. */
static int row_dot_dim2_any(const uint8_t* row, int row_bytes, int bits, const float* table, int per_book,
                            const float* x, int n_codes, int codes_per_group, float* out) {
    switch (bits) {
#define RWKVQ_CASE(B) \
    case B: *out = row_dot_dim2(row, row_bytes, B, table, per_book, x, n_codes, codes_per_group); return 1;
        RWKVQ_CASE(4) RWKVQ_CASE(5) RWKVQ_CASE(6) RWKVQ_CASE(7) RWKVQ_CASE(8)
#undef RWKVQ_CASE
    default:
        return 0;
    }
}
#endif

/* y[M, N] = x[M, K] @ W^T. Returns 0, or -1 when scratch memory cannot be allocated. */
int rwkvq_vq_gemv(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int n_codes = K / dim;
    const int codes_per_group = group_cols / dim;
    const long long work = (long long)N * K * M;
    int failed = 0;
#pragma omp parallel if (work >= 262144)
    {
        float* table = (float*)malloc(sizeof(float) * (size_t)C * per_book);
        int cur = -1;
        if (!table) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int n = 0; n < N; ++n) {
                const int rb = n / group_rows;
                if (rb != cur) {
                    decode_table(books, scales, rb, C, per_book, table);
                    cur = rb;
                }
                const uint8_t* row = codes + (size_t)n * row_bytes;
                for (int m = 0; m < M; ++m) {
                    float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
                    if (dim == 2 && row_dot_dim2_any(row, row_bytes, bits, table, per_book, x + (size_t)m * K, n_codes,
                                                     codes_per_group, &acc)) {
                        y[(size_t)m * N + n] = acc;
                        continue;
                    }
#endif
                    for (int c = 0; c < C; ++c) {
                        const int j0 = c * codes_per_group;
                        const int j1 = j0 + codes_per_group < n_codes ? j0 + codes_per_group : n_codes;
                        acc += row_group_dot(row, row_bytes, bits, table + (size_t)c * per_book,
                                             x + (size_t)m * K + (size_t)j0 * dim, j0, j1, dim);
                    }
                    y[(size_t)m * N + n] = acc;
                }
            }
        }
        free(table);
    }
    return failed ? -1 : 0;
}

/* Rows [n0, n1) of W into out [(n1 - n0), K]; table holds C codebooks, idx n_codes ints (caller's scratch). */
static void decode_rows(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, int n0, int n1,
                        int K, int dim, int group_rows, int group_cols, int bits, float* table, int* cur,
                        int32_t* idx, float* out) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int n_codes = K / dim;
    for (int n = n0; n < n1; ++n) {
        const int rb = n / group_rows;
        if (rb != *cur) {
            decode_table(books, scales, rb, C, per_book, table);
            *cur = rb;
        }
        unpack_row(codes + (size_t)n * row_bytes, n_codes, bits, idx);
        float* o = out + (size_t)(n - n0) * K;
        for (int j = 0; j < n_codes; ++j) {
            const float* e = table + (size_t)((j * dim) / group_cols) * per_book + idx[j] * dim;
            for (int t = 0; t < dim; ++t) o[j * dim + t] = e[t];
        }
    }
}

/* W[N, K] (float) from the payload. */
int rwkvq_vq_decode(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, float* w, int N,
                    int K, int dim, int group_rows, int group_cols, int bits) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    int failed = 0;
#pragma omp parallel if ((long long)N * K >= 262144)
    {
        float* table = (float*)malloc(sizeof(float) * (size_t)C * per_book);
        int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(K / dim));
        int cur = -1;
        if (!table || !idx) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int n = 0; n < N; ++n)
                decode_rows(codes, row_bytes, books, scales, n, n + 1, K, dim, group_rows, group_cols, bits, table,
                            &cur, idx, w + (size_t)n * K);
        }
        free(table);
        free(idx);
    }
    return failed ? -1 : 0;
}

enum { GEMM_TILE = 8 }; /* W rows decoded at a time: 8 x K floats stay in L1/L2 while every x row passes */

/* y[m, 0..rows) = x[m] . w[r] for one tile of decoded rows, all M activation rows. */
static void tile_dot(const float* x, int M, int K, const float* w, int rows, float* y, int ldy) {
    for (int m = 0; m < M; ++m) {
        const float* xm = x + (size_t)m * K;
        int r = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; r + 4 <= rows; r += 4) {
            const float* w0 = w + (size_t)r * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int k = 0;
            for (; k + 8 <= K; k += 8) {
                const __m256 xv = _mm256_loadu_ps(xm + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + K + k), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 2 * (size_t)K + k), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + 3 * (size_t)K + k), xv, a3);
            }
            /* horizontal sums of the four accumulators at once */
            const __m256 s01 = _mm256_hadd_ps(a0, a1), s23 = _mm256_hadd_ps(a2, a3);
            const __m256 s = _mm256_hadd_ps(s01, s23);
            __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            float out[4];
            _mm_storeu_ps(out, t);
            for (; k < K; ++k)
                for (int i = 0; i < 4; ++i) out[i] += w0[(size_t)i * K + k] * xm[k];
            for (int i = 0; i < 4; ++i) y[(size_t)m * ldy + r + i] = out[i];
        }
#endif
        for (; r < rows; ++r) {
            const float* wr = w + (size_t)r * K;
            float acc = 0.f;
            for (int k = 0; k < K; ++k) acc += wr[k] * xm[k];
            y[(size_t)m * ldy + r] = acc;
        }
    }
}

/* y[M, N] = x[M, K] @ W^T for many activation rows (prefill): each thread decodes a tile of W rows into a small
 * buffer and multiplies every activation row by it, so W is decoded once per call and never held in full. */
int rwkvq_vq_gemm(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int tiles = (N + GEMM_TILE - 1) / GEMM_TILE;
    int failed = 0;
#pragma omp parallel
    {
        float* table = (float*)malloc(sizeof(float) * (size_t)C * per_book);
        int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(K / dim));
        float* w = (float*)malloc(sizeof(float) * (size_t)GEMM_TILE * K);
        int cur = -1;
        if (!table || !idx || !w) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int t = 0; t < tiles; ++t) {
                const int n0 = t * GEMM_TILE, n1 = n0 + GEMM_TILE < N ? n0 + GEMM_TILE : N;
                decode_rows(codes, row_bytes, books, scales, n0, n1, K, dim, group_rows, group_cols, bits, table,
                            &cur, idx, w);
                tile_dot(x, M, K, w, n1 - n0, y + n0, N);
            }
        }
        free(table);
        free(idx);
        free(w);
    }
    return failed ? -1 : 0;
}

int rwkvq_vq_matmul(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                    const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits) {
    if (M <= RWKVQ_GEMV_MAX_ROWS)
        return rwkvq_vq_gemv(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits);
    return rwkvq_vq_gemm(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits);
}

void rwkvq_decode_vector(const uint8_t* codes, int bits, const float* book, float* v, int64_t n) {
    uint64_t buf = 0;
    int have = 0;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t j = 0; j < n; ++j) {
        while (have < bits) {
            buf |= (uint64_t)(*codes++) << have;
            have += 8;
        }
        v[j] = book[buf & mask];
        buf >>= bits;
        have -= bits;
    }
}

void rwkvq_scale_rows(const float* x, const float* v, float* y, int64_t total, int64_t n) {
    for (int64_t i0 = 0; i0 < total; i0 += n)
        for (int64_t i = 0; i < n && i0 + i < total; ++i) y[i0 + i] = x[i0 + i] * v[i];
}
