/* CPU kernels for rwkvq.VQMatMul (see rwkvq_onnx/ops.py for the semantics and the numpy reference).
 *
 * Called by the onnxruntime op library (ort_ops.c) and, through ctypes, by rwkvq_onnx.cpu_kernels; built by the
 * package install (setuptools extension,
 * -O3 -fopenmp, baseline instruction set: the AVX2 functions carry __attribute__((target)) and run only when the
 * caller's rwkvq_mode names an instruction set the CPU has, see rwkvq_dispatch.h). Decode is memory-bound in theory, table-lookup-bound in practice: each
 * thread decodes its row block's codebooks (scale folded in) into a small float table that stays in L1,
 * then streams each row's packed codes eight at a time through table lookups.
 *
 *   x      float  [M, K]            activations
 *   codes  uint8  [N, row_bytes]    each row a little-endian bit stream of K/dim indices
 *   books  int8   [R, C, E, dim]    codebook of row block n / group_rows and column group col / group_cols
 *   scales float  [R, C]
 *   y      float  [M, N]            (rwkvq_vq_gemv)      W float [N, K] (rwkvq_vq_decode)
 *
 * The kernels index with int. Every exported entry point first checks its sizes against each other in 64-bit
 * arithmetic (rwkvq_vq_check_layout and friends, below) and returns -2 instead of computing with sizes that
 * would overflow an index, divide by zero or address past the buffers those sizes describe.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
/* the AVX2 kernels: compiled for AVX2 + FMA + BMI1/2 whatever the build's -m flags, called only when
 * rwkvq_isa_supported(RWKVQ_ISA_AVX2) (which checks those four features) */
#define RWKVQ_AVX2 __attribute__((target("avx2,fma,bmi,bmi2")))
#endif

#include "rwkvq_cpu.h"
#include "vq_fast.h"

static inline uint32_t read_code(const uint8_t* row, int row_bytes, int j, int bits);

enum { PANEL = 16, MR = 6 }; /* W rows decoded per GEMM panel; activation rows per micro-kernel call */

/* ---- validation (see rwkvq_cpu.h): 64-bit arithmetic, before any size is narrowed to int ---------------- */

/* bit offsets inside a row or vector are ints, and unpack_row reads up to 8 bytes past one */
#define RWKVQ_MAX_BITS_OFFSET ((int64_t)INT_MAX - 64)

static const char* refuse(char* msg, size_t cap, const char* fmt, long long a, long long b) {
    snprintf(msg, cap, fmt, a, b);
    return msg;
}

static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

const char* rwkvq_vq_check_layout(int64_t N, int64_t K, int64_t dim, int64_t group_rows, int64_t group_cols,
                                  int64_t bits, char* msg, size_t cap) {
    const int64_t sizes[5] = {N, K, dim, group_rows, group_cols};
    static const char* names[5] = {"N", "K", "dim", "group_rows", "group_cols"};
    for (int i = 0; i < 5; ++i)
        if (sizes[i] < 1 || sizes[i] > INT_MAX) {
            snprintf(msg, cap, "%s=%lld is outside [1, 2^31)", names[i], (long long)sizes[i]);
            return msg;
        }
    if (bits < 1 || bits > 12) return refuse(msg, cap, "index_bits=%lld is outside [1, 12]", bits, 0);
    if (K % dim) return refuse(msg, cap, "K=%lld is not a multiple of dim=%lld", K, dim);
    if (group_cols % dim) return refuse(msg, cap, "group_cols=%lld is not a multiple of dim=%lld", group_cols, dim);
    /* the kernels' row and column block bounds (n + group_rows, panels of PANEL rows, k + group_cols) are ints */
    if (N + (group_rows > PANEL ? group_rows : PANEL) - 1 > INT_MAX)
        return refuse(msg, cap, "N=%lld with group_rows=%lld overflows 32-bit row indices", N, group_rows);
    if (K + group_cols - 1 > INT_MAX)
        return refuse(msg, cap, "K=%lld with group_cols=%lld overflows 32-bit column indices", K, group_cols);
    if (K / dim * bits > RWKVQ_MAX_BITS_OFFSET)
        return refuse(msg, cap, "a row of K/dim=%lld codes of %lld bits overflows 32-bit bit offsets", K / dim, bits);
    /* the decoded codebooks of one row block, C * 2^bits * dim floats, are indexed with ints */
    int64_t table;
    if (__builtin_mul_overflow(ceil_div(K, group_cols), dim << bits, &table) || table > INT_MAX)
        return refuse(msg, cap, "%lld codebooks of 2^index_bits x dim=%lld entries overflow 32-bit table indices",
                      ceil_div(K, group_cols), dim);
    return NULL;
}

/* "[a, b, c]" of a shape into buf */
static const char* shape_text(int rank, const int64_t* dims, char* buf, size_t cap) {
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < rank && used < cap; ++i)
        used += (size_t)snprintf(buf + used, cap - used, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
    return buf;
}

/* NULL when the tensor has exactly the expected shape, else the reason in msg */
static const char* expect_shape(const char* what, int rank, const int64_t* dims, int want_rank, const int64_t* want,
                                char* msg, size_t cap) {
    int same = rank == want_rank;
    for (int i = 0; same && i < rank; ++i) same = dims[i] == want[i];
    if (same) return NULL;
    char got[160], expected[160];
    snprintf(msg, cap, "%s has shape %s, expected %s", what, shape_text(rank, dims, got, sizeof got),
             shape_text(want_rank, want, expected, sizeof expected));
    return msg;
}

const char* rwkvq_vq_check_payload(int64_t N, int64_t K, int64_t dim, int64_t group_rows, int64_t group_cols,
                                   int64_t bits, int codes_rank, const int64_t* codes_dims, int books_rank,
                                   const int64_t* books_dims, int scales_rank, const int64_t* scales_dims, char* msg,
                                   size_t cap) {
    const char* bad = rwkvq_vq_check_layout(N, K, dim, group_rows, group_cols, bits, msg, cap);
    if (bad) return bad;
    const int64_t R = ceil_div(N, group_rows), C = ceil_div(K, group_cols);
    const int64_t codes[2] = {N, ceil_div(K / dim * bits, 8)}, books[4] = {R, C, (int64_t)1 << bits, dim},
                  scales[2] = {R, C};
    if ((bad = expect_shape("codes", codes_rank, codes_dims, 2, codes, msg, cap))) return bad;
    if ((bad = expect_shape("codebooks", books_rank, books_dims, 4, books, msg, cap))) return bad;
    return expect_shape("scales", scales_rank, scales_dims, 2, scales, msg, cap);
}

const char* rwkvq_vq_check_rows(int64_t K, int x_rank, const int64_t* x_dims, int64_t* rows, char* msg, size_t cap) {
    if (x_rank < 1) return refuse(msg, cap, "the input has rank %lld, expected [..., K=%lld]", x_rank, K);
    if (x_dims[x_rank - 1] != K)
        return refuse(msg, cap, "the input's last dimension is %lld, expected K=%lld", x_dims[x_rank - 1], K);
    int64_t m = 1;
    for (int i = 0; i < x_rank - 1; ++i)
        if (x_dims[i] < 0 || __builtin_mul_overflow(m, x_dims[i], &m) || m > INT_MAX)
            return refuse(msg, cap, "the input's leading dimensions (%lld at axis %lld) exceed 2^31 - 1 rows",
                          x_dims[i], i);
    *rows = m;
    return NULL;
}

const char* rwkvq_ew_check_layout(int64_t bits, int64_t n, char* msg, size_t cap) {
    if (bits < 1 || bits > 16) return refuse(msg, cap, "index_bits=%lld is outside [1, 16]", bits, 0);
    if (n < 1 || n > RWKVQ_MAX_BITS_OFFSET / bits)
        return refuse(msg, cap, "a vector of %lld values of %lld bits is outside [1, 2^31) bits", n, bits);
    return NULL;
}

const char* rwkvq_ew_check_payload(int64_t bits, int64_t n, int codes_rank, const int64_t* codes_dims, int book_rank,
                                   const int64_t* book_dims, char* msg, size_t cap) {
    const char* bad = rwkvq_ew_check_layout(bits, n, msg, cap);
    if (bad) return bad;
    const int64_t codes[1] = {ceil_div(n * bits, 8)}, book[1] = {(int64_t)1 << bits};
    if ((bad = expect_shape("codes", codes_rank, codes_dims, 1, codes, msg, cap))) return bad;
    return expect_shape("codebook", book_rank, book_dims, 1, book, msg, cap);
}

/* The int arguments of a kernel entry point: a valid layout, row_bytes its own, M >= 0. */
static int sizes_ok(int M, int row_bytes, int N, int K, int dim, int group_rows, int group_cols, int bits) {
    char msg[160];
    return M >= 0 && !rwkvq_vq_check_layout(N, K, dim, group_rows, group_cols, bits, msg, sizeof msg) &&
           row_bytes == ceil_div((int64_t)(K / dim) * bits, 8);
}

/* A mode the kernels can run: known numerics and an instruction set this CPU has (running AVX2 code on a CPU
 * without it would be an illegal instruction, so every entry point checks). */
static int mode_ok(rwkvq_mode mode) {
    return (mode.kernels == RWKVQ_KERNELS_EXACT || mode.kernels == RWKVQ_KERNELS_FAST) &&
           rwkvq_isa_supported(mode.isa);
}

/* The first n indices of a row's bit stream; eight at a time from one unaligned 64-bit load while it stays inside
 * the row (bits <= 8), then one by one. */
static void unpack_row(const uint8_t* row, int row_bytes, int n, int bits, int32_t* out) {
    const uint64_t mask = (1u << bits) - 1u;
    int j = 0;
    if (bits <= 8)
        for (; j + 8 <= n && ((j * bits) >> 3) + 8 <= row_bytes; j += 8) {
            const int bit = j * bits;
            uint64_t w;
            memcpy(&w, row + (bit >> 3), 8);
            w >>= (bit & 7);
            for (int i = 0; i < 8; ++i) out[j + i] = (int32_t)((w >> (i * bits)) & mask);
        }
    for (; j < n; ++j) out[j] = (int32_t)read_code(row, row_bytes, j, bits);
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

#if defined(__x86_64__)
/* The common case (dim 2, 4..8 index bits) vectorised over one whole row: each code's entry is one 64-bit load of
 * two floats, four entries are assembled into a 256-bit register against eight contiguous activations, one FMA.
 * BITS is a compile-time constant in each instantiation (constant shifts and masks: measured 1.7x faster than a
 * run-time width). Codes are read eight at a time with one unaligned 64-bit load, which may reach into the next
 * row (the bits beyond are never used) but not past the buffer (`avail` bytes from the row's start); the rest
 * one by one. */
static inline __attribute__((always_inline)) RWKVQ_AVX2 float row_dot_dim2(const uint8_t* row, int row_bytes, long long avail,
                                                                const int BITS, const float* table, int per_book,
                                                                const float* x, int n_codes, int codes_per_group) {
    const uint64_t mask = (1u << BITS) - 1u;
    (void)mask;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float tail = 0.f;
    for (int j0 = 0, c = 0; j0 < n_codes; j0 += codes_per_group, ++c) {
        const int j1 = j0 + codes_per_group < n_codes ? j0 + codes_per_group : n_codes;
        const double* t = (const double*)(table + (size_t)c * per_book);
        int j = j0;
        for (; j + 8 <= j1 && ((j * BITS) >> 3) + 8 <= avail; j += 8) {
            const int bit = j * BITS;
            uint64_t w;
            memcpy(&w, row + (bit >> 3), 8);
            w >>= (bit & 7);
/* one bit-field-extract instruction per index instead of a shift and a mask: measured 15% faster */
#define RWKVQ_CODE(i) (t + _bextr_u64(w, (i) * BITS, BITS))
            const __m128d lo0 = _mm_loadh_pd(_mm_load_sd(RWKVQ_CODE(0)), RWKVQ_CODE(1));
            const __m128d hi0 = _mm_loadh_pd(_mm_load_sd(RWKVQ_CODE(2)), RWKVQ_CODE(3));
            const __m128d lo1 = _mm_loadh_pd(_mm_load_sd(RWKVQ_CODE(4)), RWKVQ_CODE(5));
            const __m128d hi1 = _mm_loadh_pd(_mm_load_sd(RWKVQ_CODE(6)), RWKVQ_CODE(7));
#undef RWKVQ_CODE
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
static RWKVQ_AVX2 int row_dot_dim2_any(const uint8_t* row, int row_bytes, long long avail, int bits, const float* table,
                            int per_book, const float* x, int n_codes, int codes_per_group, float* out) {
    switch (bits) {
#define RWKVQ_CASE(B) \
    case B: *out = row_dot_dim2(row, row_bytes, avail, B, table, per_book, x, n_codes, codes_per_group); return 1;
        RWKVQ_CASE(4) RWKVQ_CASE(5) RWKVQ_CASE(6) RWKVQ_CASE(7) RWKVQ_CASE(8)
#undef RWKVQ_CASE
    default:
        return 0;
    }
}
#endif

/* Rows [n0, n1) of y[M, N] = x[M, K] @ W^T on the calling thread; table: C decoded codebooks (scratch). */
static void gemv_rows(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                      const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                      int n0, int n1, float* table, int isa) {
    (void)isa;
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int n_codes = K / dim;
    const int codes_per_group = group_cols / dim;
    int cur = -1;
    for (int n = n0; n < n1; ++n) {
        const int rb = n / group_rows;
        if (rb != cur) {
            decode_table(books, scales, rb, C, per_book, table);
            cur = rb;
        }
        const uint8_t* row = codes + (size_t)n * row_bytes;
        for (int m = 0; m < M; ++m) {
            float acc = 0.f;
#if defined(__x86_64__)
            if (isa >= RWKVQ_ISA_AVX2 && dim == 2 && row_dot_dim2_any(row, row_bytes, (long long)(N - n) * row_bytes, bits, table, per_book,
                                             x + (size_t)m * K, n_codes, codes_per_group, &acc)) {
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

int rwkvq_vq_gemv_chunks(int N, int K, int M, int group_rows) {
    if (N < 1 || K < 1 || M < 0 || group_rows < 1) return -1;
    long long work;
    if (__builtin_mul_overflow((long long)N * K, (long long)M, &work)) work = LLONG_MAX;
    if (work < RWKVQ_PARALLEL_MIN_WORK) return 1;
    const long long blocks = ((long long)N + group_rows - 1) / group_rows;
    long long chunks = work / (RWKVQ_PARALLEL_MIN_WORK / 2);
    if (chunks > 64) chunks = 64;
    return (int)(chunks < blocks ? chunks : blocks);
}

int rwkvq_vq_gemv_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks, rwkvq_mode mode) {
    if (!sizes_ok(M, row_bytes, N, K, dim, group_rows, group_cols, bits) || chunk < 0 || chunk >= chunks)
        return RWKVQ_BAD_SIZES;
    if (!mode_ok(mode)) return RWKVQ_BAD_MODE;
    /* chunks split the row blocks evenly, so no two chunks decode the same codebooks */
    const int blocks = (N + group_rows - 1) / group_rows;
    const int b0 = (int)((long long)blocks * chunk / chunks), b1 = (int)((long long)blocks * (chunk + 1) / chunks);
    const int n0 = b0 * group_rows, n1 = b1 * group_rows < N ? b1 * group_rows : N;
    if (mode.kernels == RWKVQ_KERNELS_FAST && rwkvq_vq_fast_ok(M, K, dim, group_cols, bits)) {
        const int rc = rwkvq_vq_fast_rows(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows,
                                          group_cols, bits, n0, n1, mode.isa);
        if (rc <= 0) return rc; /* 1: a non-finite activation, which the exact path below propagates */
    }
    const int C = (K + group_cols - 1) / group_cols;
    float* table = (float*)malloc(sizeof(float) * (size_t)C * (size_t)(1 << bits) * dim);
    if (!table) return -1;
    gemv_rows(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits, n0, n1, table,
              mode.isa);
    free(table);
    return 0;
}

/* All pieces of a split kernel, over OpenMP threads; a single piece runs on the calling thread, since entering
 * an OpenMP region costs more than a small matrix's work. Returns 0, or -1 when scratch memory ran out. */
static int run_chunks(rwkvq_chunk_fn run, int chunks, const float* x, int M, const uint8_t* codes, int row_bytes,
                      const int8_t* books, const float* scales, float* y, int N, int K, int dim, int group_rows,
                      int group_cols, int bits, rwkvq_mode mode) {
    if (!mode_ok(mode)) return RWKVQ_BAD_MODE;
    if (chunks == 1)
        return run(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits, 0, 1, mode);
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
    for (int c = 0; c < chunks; ++c)
        failed |= run(x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits, c, chunks,
                      mode) != 0;
    return failed ? -1 : 0;
}

/* y[M, N] = x[M, K] @ W^T. Returns 0, -1 when scratch memory cannot be allocated, -2 for sizes out of range. */
int rwkvq_vq_gemv(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                  rwkvq_mode mode) {
    if (!sizes_ok(M, row_bytes, N, K, dim, group_rows, group_cols, bits)) return RWKVQ_BAD_SIZES;
    return run_chunks(rwkvq_vq_gemv_chunk, rwkvq_vq_gemv_chunks(N, K, M, group_rows), x, M, codes, row_bytes, books,
                      scales, y, N, K, dim, group_rows, group_cols, bits, mode);
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
        unpack_row(codes + (size_t)n * row_bytes, row_bytes, n_codes, bits, idx);
        float* o = out + (size_t)(n - n0) * K;
        if (dim == 2) { /* one 64-bit copy per entry */
            const int per_group = group_cols / 2;
            for (int j0 = 0, c = 0; j0 < n_codes; j0 += per_group, ++c) {
                const uint64_t* t = (const uint64_t*)(table + (size_t)c * per_book);
                const int j1 = j0 + per_group < n_codes ? j0 + per_group : n_codes;
                for (int j = j0; j < j1; ++j) memcpy(o + 2 * (size_t)j, t + idx[j], 8);
            }
            continue;
        }
        for (int j = 0; j < n_codes; ++j) {
            const float* e = table + (size_t)((j * dim) / group_cols) * per_book + idx[j] * dim;
            for (int t = 0; t < dim; ++t) o[j * dim + t] = e[t];
        }
    }
}

/* W[N, K] (float) from the payload. */
int rwkvq_vq_decode(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, float* w, int N,
                    int K, int dim, int group_rows, int group_cols, int bits) {
    if (!sizes_ok(0, row_bytes, N, K, dim, group_rows, group_cols, bits)) return RWKVQ_BAD_SIZES;
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

/* Decode weight rows [n0, n0 + rows) straight into the panel p [K, PANEL], K-major (columns past `rows` zero).
 * tables: PANEL x C * per_book floats, idx: PANEL x n_codes ints (the caller's scratch). */
static void decode_panel(const uint8_t* codes, int row_bytes, const int8_t* books, const float* scales, int n0,
                         int rows, int K, int dim, int group_rows, int group_cols, int bits, float* tables,
                         int32_t* idx, float* p) {
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int n_codes = K / dim;
    const float* tab[PANEL];
    for (int r = 0, prev = -1; r < rows; ++r) {
        const int rb = (n0 + r) / group_rows;
        if (rb != prev) {
            decode_table(books, scales, rb, C, per_book, tables + (size_t)r * C * per_book);
            tab[r] = tables + (size_t)r * C * per_book;
            prev = rb;
        } else {
            tab[r] = tab[r - 1];
        }
        unpack_row(codes + (size_t)(n0 + r) * row_bytes, row_bytes, n_codes, bits, idx + (size_t)r * n_codes);
    }
    if (dim == 2) { /* the common case, with the entry width known */
        for (int j = 0; j < n_codes; ++j) {
            const size_t book = (size_t)((j * 2) / group_cols) * per_book;
            float* out = p + (size_t)j * 2 * PANEL;
            for (int r = 0; r < rows; ++r) {
                const float* e = tab[r] + book + (size_t)idx[(size_t)r * n_codes + j] * 2;
                out[r] = e[0];
                out[PANEL + r] = e[1];
            }
            for (int r = rows; r < PANEL; ++r) out[r] = out[PANEL + r] = 0.f;
        }
        return;
    }
    for (int j = 0; j < n_codes; ++j) {
        const size_t book = (size_t)((j * dim) / group_cols) * per_book;
        float* out = p + (size_t)j * dim * PANEL;
        for (int r = 0; r < rows; ++r) {
            const float* e = tab[r] + book + (size_t)idx[(size_t)r * n_codes + j] * dim;
            for (int t = 0; t < dim; ++t) out[t * PANEL + r] = e[t];
        }
        for (int r = rows; r < PANEL; ++r)
            for (int t = 0; t < dim; ++t) out[t * PANEL + r] = 0.f;
    }
}

/* y[i, 0..cols) = x[i] @ panel for MR activation rows, from the MR x PANEL results in out. */
static void store_panel(float out[MR][PANEL], int mr, float* y, int ldy, int cols) {
    for (int i = 0; i < mr; ++i) memcpy(y + (size_t)i * ldy, out[i], sizeof(float) * (size_t)cols);
}

/* The portable micro-kernel (the compiler vectorises it for the baseline instruction set). */
static void panel_kernel_scalar(const float* x, int K, int mr, const float* p, float* y, int ldy, int cols) {
    float out[MR][PANEL];
    memset(out, 0, sizeof out);
    for (int i = 0; i < MR; ++i)
        for (int k = 0; k < K; ++k)
            for (int r = 0; r < PANEL; ++r) out[i][r] += x[(size_t)i * K + k] * p[(size_t)k * PANEL + r];
    store_panel(out, mr, y, ldy, cols);
}

#if defined(__x86_64__)
/* outer products, one broadcast activation times sixteen weights per FMA pair, so no horizontal sums; the twelve
 * accumulators are named variables (an array of them was spilled to the stack every step). */
static RWKVQ_AVX2 void panel_kernel_avx2(const float* x, int K, int mr, const float* p, float* y, int ldy, int cols) {
    float out[MR][PANEL];
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * (size_t)K, *x3 = x + 3 * (size_t)K, *x4 = x + 4 * (size_t)K,
                *x5 = x + 5 * (size_t)K;
    for (int k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_loadu_ps(p + (size_t)k * PANEL), w1 = _mm256_loadu_ps(p + (size_t)k * PANEL + 8);
        __m256 xb = _mm256_broadcast_ss(x0 + k);
        c00 = _mm256_fmadd_ps(xb, w0, c00), c01 = _mm256_fmadd_ps(xb, w1, c01);
        xb = _mm256_broadcast_ss(x1 + k);
        c10 = _mm256_fmadd_ps(xb, w0, c10), c11 = _mm256_fmadd_ps(xb, w1, c11);
        xb = _mm256_broadcast_ss(x2 + k);
        c20 = _mm256_fmadd_ps(xb, w0, c20), c21 = _mm256_fmadd_ps(xb, w1, c21);
        xb = _mm256_broadcast_ss(x3 + k);
        c30 = _mm256_fmadd_ps(xb, w0, c30), c31 = _mm256_fmadd_ps(xb, w1, c31);
        xb = _mm256_broadcast_ss(x4 + k);
        c40 = _mm256_fmadd_ps(xb, w0, c40), c41 = _mm256_fmadd_ps(xb, w1, c41);
        xb = _mm256_broadcast_ss(x5 + k);
        c50 = _mm256_fmadd_ps(xb, w0, c50), c51 = _mm256_fmadd_ps(xb, w1, c51);
    }
    const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < MR; ++i) {
        _mm256_storeu_ps(out[i], acc[i][0]);
        _mm256_storeu_ps(out[i] + 8, acc[i][1]);
    }
    store_panel(out, mr, y, ldy, cols);
}
#endif

/* y[i, 0..cols) = x[i] @ panel for MR activation rows (i < mr stored), with the instruction set asked for. */
static void panel_kernel(const float* x, int K, int mr, const float* p, float* y, int ldy, int cols, int isa) {
#if defined(__x86_64__)
    if (isa >= RWKVQ_ISA_AVX2) {
        panel_kernel_avx2(x, K, mr, p, y, ldy, cols);
        return;
    }
#endif
    (void)isa;
    panel_kernel_scalar(x, K, mr, p, y, ldy, cols);
}

int rwkvq_vq_gemm_chunks(int N) {
    if (N < 1 || N > INT_MAX - PANEL) return -1;
    const int panels = (N + PANEL - 1) / PANEL;
    return panels < 64 ? panels : 64;
}

int rwkvq_vq_gemm_chunk(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                        const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols,
                        int bits, int chunk, int chunks, rwkvq_mode mode) {
    if (!sizes_ok(M, row_bytes, N, K, dim, group_rows, group_cols, bits) || chunk < 0 || chunk >= chunks)
        return RWKVQ_BAD_SIZES;
    if (!mode_ok(mode)) return RWKVQ_BAD_MODE;
    const int C = (K + group_cols - 1) / group_cols;
    const int per_book = (1 << bits) * dim;
    const int panels = (N + PANEL - 1) / PANEL;
    const int t0 = (int)((long long)panels * chunk / chunks), t1 = (int)((long long)panels * (chunk + 1) / chunks);
    float* tables = (float*)malloc(sizeof(float) * (size_t)PANEL * C * per_book);
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)PANEL * (K / dim));
    float* p = (float*)malloc(sizeof(float) * (size_t)PANEL * K);
    float* xpad = (float*)calloc((size_t)MR * K, sizeof(float)); /* the last M % MR rows, zero-padded */
    const int ok = tables && idx && p && xpad;
    for (int t = t0; ok && t < t1; ++t) {
        const int n0 = t * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
        decode_panel(codes, row_bytes, books, scales, n0, n1 - n0, K, dim, group_rows, group_cols, bits, tables,
                     idx, p);
        int m = 0;
        for (; m + MR <= M; m += MR) panel_kernel(x + (size_t)m * K, K, MR, p, y + (size_t)m * N + n0, N, n1 - n0, mode.isa);
        if (m < M) {
            memcpy(xpad, x + (size_t)m * K, sizeof(float) * (size_t)(M - m) * K);
            panel_kernel(xpad, K, M - m, p, y + (size_t)m * N + n0, N, n1 - n0, mode.isa);
        }
    }
    free(tables);
    free(idx);
    free(p);
    free(xpad);
    return ok ? 0 : -1;
}

/* y[M, N] = x[M, K] @ W^T for many activation rows (prefill): PANEL weight rows at a time are decoded, packed
 * K-major, and every activation row runs past them, so W is decoded once per call and never held in full. */
int rwkvq_vq_gemm(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                  const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                  rwkvq_mode mode) {
    if (!sizes_ok(M, row_bytes, N, K, dim, group_rows, group_cols, bits)) return RWKVQ_BAD_SIZES;
    return run_chunks(rwkvq_vq_gemm_chunk, rwkvq_vq_gemm_chunks(N), x, M, codes, row_bytes, books, scales, y, N, K,
                      dim, group_rows, group_cols, bits, mode);
}

rwkvq_chunk_fn rwkvq_vq_matmul_plan(int M, int N, int K, int group_rows, int* chunks) {
    const int gemv = M <= RWKVQ_GEMV_MAX_ROWS;
    *chunks = gemv ? rwkvq_vq_gemv_chunks(N, K, M, group_rows) : rwkvq_vq_gemm_chunks(N);
    if (*chunks < 1) return NULL;
    return gemv ? rwkvq_vq_gemv_chunk : rwkvq_vq_gemm_chunk;
}

int rwkvq_vq_matmul(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                    const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                    rwkvq_mode mode) {
    if (!sizes_ok(M, row_bytes, N, K, dim, group_rows, group_cols, bits)) return RWKVQ_BAD_SIZES;
    int chunks;
    const rwkvq_chunk_fn run = rwkvq_vq_matmul_plan(M, N, K, group_rows, &chunks);
    if (!run) return RWKVQ_BAD_SIZES;
    return run_chunks(run, chunks, x, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits,
                      mode);
}

int rwkvq_decode_vector(const uint8_t* codes, int64_t n_bytes, int bits, const float* book, int64_t book_len, float* v,
                        int64_t n) {
    char msg[160];
    if (rwkvq_ew_check_layout(bits, n, msg, sizeof msg) || n_bytes < ceil_div(n * bits, 8) || n_bytes > INT_MAX ||
        book_len < ((int64_t)1 << bits))
        return RWKVQ_BAD_SIZES;
    for (int j = 0; j < (int)n; ++j) v[j] = book[read_code(codes, (int)n_bytes, j, bits)];
    return RWKVQ_OK;
}

int rwkvq_scale_rows(const float* x, const float* v, float* y, int64_t total, int64_t n) {
    if (n < 1 || total < 0 || total % n) return RWKVQ_BAD_SIZES;
    for (int64_t i0 = 0; i0 < total; i0 += n)
        for (int64_t i = 0; i < n && i0 + i < total; ++i) y[i0 + i] = x[i0 + i] * v[i];
    return RWKVQ_OK;
}
