/* CPU kernels for rwkvq.VQMatMul (see rwkvq_onnx/ops.py for the semantics and the numpy reference).
 *
 * Loaded with ctypes by rwkvq_onnx.cpu_kernels; built by the package install (setuptools extension,
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

/* W[N, K] (float) from the payload: the prefill path decodes once, then runs a dense GEMM. */
int rwkvq_vq_decode(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, float* w, int N,
                    int K, int dim, int group_rows, int group_cols, int bits) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int n_codes = K / dim;
    int failed = 0;
#pragma omp parallel if ((long long)N * K >= 262144)
    {
        float* table = (float*)malloc(sizeof(float) * (size_t)C * per_book);
        int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)n_codes);
        int cur = -1;
        if (!table || !idx) {
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
                unpack_row(codes + (size_t)n * row_bytes, n_codes, bits, idx);
                float* out = w + (size_t)n * K;
                for (int j = 0; j < n_codes; ++j) {
                    const float* e = table + (size_t)((j * dim) / group_cols) * per_book + idx[j] * dim;
                    for (int t = 0; t < dim; ++t) out[j * dim + t] = e[t];
                }
            }
        }
        free(table);
        free(idx);
    }
    return failed ? -1 : 0;
}
