/* The fast VQMatMul decode GEMV: int8 activations per block of 32, integer block dot products (vq_fast.h).
 *
 * Work is cut into steps of 32 codes (32 activations for dim 1, 64 = two blocks for dim 2), which nest in the
 * column groups. The AVX2 kernel unpacks a step's 32 indices to bytes (four BMI2 pdep), looks the int8 codebook
 * entries up in registers with pshufb (16 entries per table; larger codebooks as a cascade of XOR-difference
 * tables: entry e = T_0[e & 15] ^ ... where table h only answers for e >= 16 h), and multiplies them with the
 * int8 activations (maddubs on |entry| and the sign-transferred activations). The exact path instead does one
 * float table load per code. The scalar kernel computes the same integer sums one code at a time.
 */
#include <math.h> /* isfinite */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define RWKVQ_AVX2 __attribute__((target("avx2,fma,bmi,bmi2")))
#endif

#include "rwkvq_cpu.h"
#include "vq_fast.h"

enum { STEP = 32, BLOCK = 32 };

/* GCC's SSE2 vectorisation of the scalar kernel's lookups (scalar loads packed into vectors) is slower than plain
 * scalar code */
#if defined(__GNUC__) && !defined(__clang__)
#define NOVEC __attribute__((optimize("no-tree-vectorize")))
#else
#define NOVEC
#endif

int rwkvq_vq_fast_ok(int M, int K, int dim, int group_cols, int bits) {
    return M >= 1 && M <= RWKVQ_GEMV_MAX_ROWS && (dim == 1 || dim == 2) && bits >= 1 && bits <= 7 &&
           group_cols % (STEP * dim) == 0 && K % (STEP * dim) == 0;
}

/* One block of 32 activations to int8: scale d = max|x| / 127, q = x * (127 / max|x|) clamped to [-127, 127] and
 * rounded to nearest, halves away from zero. 1 when a value is not finite. The AVX2 version below computes the
 * same float operations in the same order, so both give the same bytes. */
static int quantize_block_scalar(const float* xb, int8_t* out, float* d) {
    float amax = 0.f;
    for (int i = 0; i < BLOCK; ++i) {
        if (!isfinite(xb[i])) return 1;
        const float a = xb[i] < 0.f ? -xb[i] : xb[i];
        amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    *d = amax / 127.f;
    for (int i = 0; i < BLOCK; ++i) {
        float v = xb[i] * inv;
        v = v > 127.f ? 127.f : v < -127.f ? -127.f : v; /* rounding can pass 127; clamped, the conversion is defined */
        out[i] = (int8_t)(int)(v + (v < 0.f ? -0.5f : 0.5f));
    }
    return 0;
}

#if defined(__x86_64__)
static RWKVQ_AVX2 int quantize_block_avx2(const float* xb, int8_t* out, float* d) {
    const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(__builtin_inff());
    __m256 v[4], amax = _mm256_setzero_ps();
    int finite = 0xFF;
    for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        const __m256 a = _mm256_andnot_ps(sign, v[k]);
        finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_LT_OQ)); /* false for inf and NaN */
        amax = _mm256_max_ps(amax, a);
    }
    if (finite != 0xFF) return 1;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    const float inv = m > 0.f ? 127.f / m : 0.f;
    *d = m / 127.f;
    const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f),
                 half = _mm256_set1_ps(0.5f);
    __m256i r[4];
    for (int k = 0; k < 4; ++k) {
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[k], vinv), lo), hi);
        r[k] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half)));
    }
    /* 4 x 8 int32 -> 32 int8 in order: the packs work per 128-bit lane, a dword permutation restores the order */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256((__m256i*)out,
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return 0;
}
#endif

int rwkvq_quantize_act8(const float* x, int64_t n, int8_t* q, float* d, int isa) {
    if (n < BLOCK || n % BLOCK) return -2;
    for (int64_t b = 0; b < n / BLOCK; ++b) {
        int bad;
#if defined(__x86_64__)
        if (isa >= RWKVQ_ISA_AVX2 && rwkvq_isa_supported(isa))
            bad = quantize_block_avx2(x + b * BLOCK, q + b * BLOCK, d + b);
        else
#endif
            bad = quantize_block_scalar(x + b * BLOCK, q + b * BLOCK, d + b);
        if (bad) return 1;
    }
    (void)isa;
    return 0;
}

/* One activation row quantized for the kernels: q [S][dim][32] int8 (step s, entry component t, code i of the
 * step: the activation x[(32 s + i) * dim + t]) and d [S][8] floats (the block scale of each int32 lane of a
 * step's sums: for dim 1 all 8 are the step's block scale, for dim 2 lanes 0-3 the first block's (codes 0-15),
 * 4-7 the second's). Returns 0, or 1 when a value is not finite. */
static int quantize_row(const float* x, int K, int dim, int8_t* q, float* d, int isa) {
    int8_t tmp[BLOCK];
    for (int b = 0; b < K / BLOCK; ++b) {
        float scale;
        int bad;
#if defined(__x86_64__)
        if (isa >= RWKVQ_ISA_AVX2)
            bad = quantize_block_avx2(x + (size_t)b * BLOCK, tmp, &scale);
        else
#endif
            bad = quantize_block_scalar(x + (size_t)b * BLOCK, tmp, &scale);
        if (bad) return 1;
        const int s = b / dim, half = b % dim;
        for (int l = 0; l < 8 / dim; ++l) d[(size_t)s * 8 + half * 4 + l] = scale;
        if (dim == 1) {
            memcpy(q + (size_t)b * BLOCK, tmp, BLOCK);
        } else { /* block b holds codes 16 half .. + 15 of step s, two components each */
            int8_t* q0 = q + (size_t)s * 2 * STEP + half * 16;
            for (int i = 0; i < 16; ++i) q0[i] = tmp[2 * i], q0[STEP + i] = tmp[2 * i + 1];
        }
    }
    (void)isa;
    return 0;
}

/* Index j of a row's bit stream (bits <= 8), without reading past the row. */
static inline uint32_t code_at(const uint8_t* row, int row_bytes, int j, int bits) {
    const int bit = j * bits, byte = bit >> 3;
    uint32_t w = row[byte];
    if (byte + 1 < row_bytes) w |= (uint32_t)row[byte + 1] << 8;
    return (w >> (bit & 7)) & ((1u << bits) - 1u);
}

/* The first n indices of a row as bytes (bits <= 8): eight at a time from one unaligned 64-bit load while it stays
 * inside the row, then one by one. */
static void unpack_bytes(const uint8_t* row, int row_bytes, int n, int bits, uint8_t* out) {
    const uint64_t mask = (1u << bits) - 1u;
    int j = 0;
    for (; j + 8 <= n && ((j * bits) >> 3) + 8 <= row_bytes; j += 8) {
        uint64_t w;
        memcpy(&w, row + ((j * bits) >> 3), 8);
        w >>= (j * bits) & 7;
        for (int i = 0; i < 8; ++i) out[j + i] = (uint8_t)((w >> (i * bits)) & mask);
    }
    for (; j < n; ++j) out[j] = (uint8_t)code_at(row, row_bytes, j, bits);
}

/* The portable kernel for one DIM (a constant in each instantiation): rows [n0, n1), the same block sums as the
 * AVX2 kernel. They are computed in float, exactly: each product of two int8 values is an integer below 2^14 and
 * a block's sum below 2^20, so every partial sum is an integer a float holds exactly (< 2^24), whatever the
 * order; float loads and multiplies run faster here than sign-extended integer ones (measured 1.8x).
 * scratch: the row's indices (K / DIM bytes), then the row block's codebooks as floats (C * E * DIM), then the
 * quantized activations as floats (M * K). */
static inline __attribute__((always_inline)) void fast_rows_scalar_t(
    const int8_t* q, const float* d, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
    const float* scales, float* y, int N, int K, const int DIM, int group_rows, int group_cols, int bits, int n0,
    int n1, uint8_t* idx, float* ftab, float* qf) {
    const int C = (K + group_cols - 1) / group_cols, E = 1 << bits, S = K / (STEP * DIM);
    const int steps_per_group = group_cols / (STEP * DIM);
    const int per_block = STEP / DIM; /* codes per block of 32 activations */
    for (size_t i = 0; i < (size_t)M * K; ++i) qf[i] = (float)q[i];
    int cur = -1;
    const uint64_t mask = (1u << bits) - 1u;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = codes + (size_t)n * row_bytes;
        /* eight codes are `bits` bytes: word w (codes 8w .. 8w + 7) is one unaligned 64-bit load at byte w * bits
         * while that stays inside the buffer (it may reach into the next row), i.e. for w < words; the codes of
         * later words come from idx, unpacked one by one */
        const long long avail = (long long)(N - n) * row_bytes;
        const long long words = avail >= 8 ? (avail - 8) / bits + 1 : 0;
        if (words * 8 < K / DIM) unpack_bytes(row, row_bytes, K / DIM, bits, idx);
        const int rb = n / group_rows;
        if (rb != cur) {
            const int8_t* src = books + (size_t)rb * C * E * DIM;
            for (size_t i = 0; i < (size_t)C * E * DIM; ++i) ftab[i] = (float)src[i];
            cur = rb;
        }
        for (int m = 0; m < M; ++m) {
            const float* qm = qf + (size_t)m * S * DIM * STEP;
            const float* dm = d + (size_t)m * S * 8;
            float acc = 0.f;
            for (int c = 0; c < C; ++c) {
                const float* book = ftab + (size_t)c * E * DIM;
                float group = 0.f;
                const int s1 = (c + 1) * steps_per_group < S ? (c + 1) * steps_per_group : S;
                for (int s = c * steps_per_group; s < s1; ++s) {
                    const uint8_t* is = idx + (size_t)s * STEP;
                    const float* q0 = qm + (size_t)s * DIM * STEP;
                    for (int blk = 0; blk < DIM; ++blk) {
                        /* eight independent sums: one dependency chain bounded the loop */
                        float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                        for (int i = blk * per_block; i < (blk + 1) * per_block; i += 8) {
                            const int word = (s * STEP + i) / 8;
                            uint64_t w = 0;
                            if (word < words)
                                memcpy(&w, row + (size_t)word * bits, 8);
                            else
                                for (int u = 0; u < 8; ++u) w |= (uint64_t)is[i + u] << (u * bits);
                            for (int u = 0; u < 8; ++u) {
                                const float* e = book + (size_t)((w >> (u * bits)) & mask) * DIM;
                                a[u] += e[0] * q0[i + u];
                                if (DIM == 2) a[u] += e[1] * q0[STEP + i + u];
                            }
                        }
                        const float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                        group += sum * dm[(size_t)s * 8 + blk * 4];
                    }
                }
                acc += scales[(size_t)rb * C + c] * group;
            }
            y[(size_t)m * N + n] = acc;
        }
    }
}

NOVEC static void fast_rows_scalar(const int8_t* q, const float* d, int M, const uint8_t* codes, int row_bytes,
                                   const int8_t* books, const float* scales, float* y, int N, int K, int dim,
                                   int group_rows, int group_cols, int bits, int n0, int n1, uint8_t* scratch) {
    const int C = (K + group_cols - 1) / group_cols;
    uint8_t* idx = scratch;
    float* ftab = (float*)(scratch + (((size_t)(K / dim) + 63) & ~(size_t)63));
    float* qf = ftab + (size_t)C * (1 << bits) * dim;
    if (dim == 1)
        fast_rows_scalar_t(q, d, M, codes, row_bytes, books, scales, y, N, K, 1, group_rows, group_cols, bits, n0,
                           n1, idx, ftab, qf);
    else
        fast_rows_scalar_t(q, d, M, codes, row_bytes, books, scales, y, N, K, 2, group_rows, group_cols, bits, n0,
                           n1, idx, ftab, qf);
}

#if defined(__x86_64__)
/* The XOR-difference tables of one row block: tabs [C][dim][NT][32] bytes, each 16-entry table duplicated in both
 * 128-bit lanes (pshufb looks up per lane); entries past the codebook's E are zero (never indexed). Rebuilt every
 * group_rows rows, so vectorised: one 32-byte load holds 16 entries of dim 2 (split into the two components by
 * one shuffle) or 32 of dim 1. */
static RWKVQ_AVX2 void build_tables(const int8_t* books, int rb, int C, int E, int dim, int NT, uint8_t* tabs) {
    /* dim 2: even bytes (component 0) to the first 8 of each lane, odd bytes (component 1) to the last 8 */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10,
                                           12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    uint8_t book[256 + 32];
    for (int c = 0; c < C; ++c) {
        const size_t bytes = (size_t)E * dim;
        memcpy(book, books + ((size_t)rb * C + c) * bytes, bytes);
        memset(book + bytes, 0, sizeof book - bytes);
        __m128i prev0 = _mm_setzero_si128(), prev1 = prev0;
        uint8_t* out0 = tabs + (size_t)c * dim * NT * 32;
        uint8_t* out1 = out0 + (size_t)NT * 32;
        for (int h = 0; h < NT; ++h) {
            __m128i t0, t1 = prev1;
            if (dim == 2) {
                /* 16 entries: lanes [c0 of 0-7, c1 of 0-7 | c0 of 8-15, c1 of 8-15] -> [c0 0-15 | c1 0-15] */
                const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(book + 32 * h)), split);
                const __m256i w = _mm256_permute4x64_epi64(v, 0xD8); /* qwords 0, 2, 1, 3 */
                t0 = _mm256_castsi256_si128(w);
                t1 = _mm256_extracti128_si256(w, 1);
            } else {
                t0 = _mm_loadu_si128((const __m128i*)(book + 16 * h));
            }
            _mm256_storeu_si256((__m256i*)(out0 + 32 * h), _mm256_broadcastsi128_si256(_mm_xor_si128(t0, prev0)));
            prev0 = t0;
            if (dim == 2) {
                _mm256_storeu_si256((__m256i*)(out1 + 32 * h), _mm256_broadcastsi128_si256(_mm_xor_si128(t1, prev1)));
                prev1 = t1;
            }
        }
    }
}

/* The 32 indices of a step as bytes. A step of 32 codes is 4 * bits bytes and each eight of its codes `bits`
 * bytes, so every eight start on a byte: one unaligned 64-bit load and one pdep each. The vector is assembled
 * in registers (four 64-bit stores and one 256-bit load of them stall store forwarding: measured 2x slower).
 * Reads up to 8 - bits bytes past the step: callers use step_indices_tail where that would leave the buffer. */
static inline RWKVQ_AVX2 __m256i step_indices(const uint8_t* p, int bits, uint64_t lanes) {
    uint64_t w0, w1, w2, w3;
    memcpy(&w0, p, 8);
    memcpy(&w1, p + bits, 8);
    memcpy(&w2, p + 2 * bits, 8);
    memcpy(&w3, p + 3 * bits, 8);
    const __m128i lo = _mm_insert_epi64(_mm_cvtsi64_si128((long long)_pdep_u64(w0, lanes)),
                                        (long long)_pdep_u64(w1, lanes), 1);
    const __m128i hi = _mm_insert_epi64(_mm_cvtsi64_si128((long long)_pdep_u64(w2, lanes)),
                                        (long long)_pdep_u64(w3, lanes), 1);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* The same for the last steps of the buffer, byte by byte. */
static inline RWKVQ_AVX2 __m256i step_indices_tail(const uint8_t* row, int row_bytes, int s, int bits) {
    uint8_t b[32];
    for (int i = 0; i < 32; ++i) b[i] = (uint8_t)code_at(row, row_bytes, s * STEP + i, bits);
    return _mm256_loadu_si256((const __m256i*)b);
}

/* Component t of the entries of 32 indices: a pshufb cascade over NT tables. */
static inline __attribute__((always_inline)) RWKVQ_AVX2 __m256i lookup(const uint8_t* tab, __m256i idx, const int NT) {
    __m256i e = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)tab), idx);
    for (int h = 1; h < NT; ++h) {
        const __m256i shifted = _mm256_sub_epi8(idx, _mm256_set1_epi8((char)(16 * h))); /* < 0: bit 7 set: 0 */
        e = _mm256_xor_si256(e, _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(tab + (size_t)h * 32)),
                                                    shifted));
    }
    return e;
}

/* Sums of entry * activation, int32 per four codes: maddubs of |entry| and the sign-transferred activations
 * (each 16-bit pair at most 2 * 128 * 127, no saturation), then pairs of those. */
static inline RWKVQ_AVX2 __m256i dot32(__m256i e, const int8_t* q) {
    const __m256i xq = _mm256_loadu_si256((const __m256i*)q);
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(e), _mm256_sign_epi8(xq, e));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static inline __attribute__((always_inline)) RWKVQ_AVX2 void fast_rows_avx2_t(
    const int8_t* q, const float* d, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
    const float* scales, float* y, int N, int K, const int DIM, int group_rows, int group_cols, int bits, int n0,
    int n1, const int NT, const int M1, uint8_t* tabs) {
    if (M1) M = 1; /* the decode case as a constant: the accumulators stay in registers */
    const int C = (K + group_cols - 1) / group_cols, E = 1 << bits, S = K / (STEP * DIM);
    const int steps_per_group = group_cols / (STEP * DIM);
    const uint64_t lanes = 0x0101010101010101ull * ((1u << bits) - 1u);
    int cur = -1;
    for (int n = n0; n < n1; ++n) {
        const int rb = n / group_rows;
        if (rb != cur) {
            build_tables(books, rb, C, E, DIM, NT, tabs);
            cur = rb;
        }
        const uint8_t* row = codes + (size_t)n * row_bytes;
        /* steps whose 64-bit loads stay inside the buffer (they may reach into the next row, never past it) */
        const long long avail = (long long)(N - n) * row_bytes;
        const long long safe = avail >= 8 + 3 * bits ? (avail - 8 - 3 * bits) / (4 * bits) + 1 : 0;
        __m256 tot[RWKVQ_GEMV_MAX_ROWS];
        for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
        for (int c = 0; c < C; ++c) {
            const uint8_t* tc = tabs + (size_t)c * DIM * NT * 32;
            __m256 group[RWKVQ_GEMV_MAX_ROWS];
            for (int m = 0; m < M; ++m) group[m] = _mm256_setzero_ps();
            const int s1 = (c + 1) * steps_per_group < S ? (c + 1) * steps_per_group : S;
            for (int s = c * steps_per_group; s < s1; ++s) {
                /* the tables stay memory operands of pshufb: hoisted out of the loop, 16 of them (dim 2, 7-bit
                 * indices) spill to the stack and run 2x slower */
                __asm__("" : "+r"(tc));
                const __m256i idx = s < safe ? step_indices(row + (size_t)s * 4 * bits, bits, lanes)
                                             : step_indices_tail(row, row_bytes, s, bits);
                const __m256i e0 = lookup(tc, idx, NT);
                const __m256i e1 = DIM == 2 ? lookup(tc + (size_t)NT * 32, idx, NT) : e0;
                for (int m = 0; m < M; ++m) {
                    const int8_t* qs = q + ((size_t)m * S + s) * DIM * STEP;
                    __m256i sum = dot32(e0, qs);
                    if (DIM == 2) sum = _mm256_add_epi32(sum, dot32(e1, qs + STEP));
                    group[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                               _mm256_loadu_ps(d + ((size_t)m * S + s) * 8), group[m]);
                }
            }
            const __m256 gs = _mm256_set1_ps(scales[(size_t)rb * C + c]);
            for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(group[m], gs, tot[m]);
        }
        for (int m = 0; m < M; ++m) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(tot[m]), _mm256_extractf128_ps(tot[m], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            y[(size_t)m * N + n] = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        }
    }
}

/* One instantiation per (dim, table count, one activation row or more), so the cascade and the component loop unroll. */
static RWKVQ_AVX2 void fast_rows_avx2(const int8_t* q, const float* d, int M, const uint8_t* codes, int row_bytes,
                                      const int8_t* books, const float* scales, float* y, int N, int K, int dim,
                                      int group_rows, int group_cols, int bits, int n0, int n1, int NT,
                                      uint8_t* tabs) {
#define RWKVQ_FAST(D, T, ONE)                                                                                     \
    if (dim == D && NT == T && (M == 1) == ONE) {                                                                 \
        fast_rows_avx2_t(q, d, M, codes, row_bytes, books, scales, y, N, K, D, group_rows, group_cols, bits, n0, \
                         n1, T, ONE, tabs);                                                                       \
        return;                                                                                                   \
    }
#define RWKVQ_FAST_M(D, T) RWKVQ_FAST(D, T, 1) RWKVQ_FAST(D, T, 0)
    RWKVQ_FAST_M(1, 1) RWKVQ_FAST_M(1, 2) RWKVQ_FAST_M(1, 4) RWKVQ_FAST_M(1, 8)
    RWKVQ_FAST_M(2, 1) RWKVQ_FAST_M(2, 2) RWKVQ_FAST_M(2, 4) RWKVQ_FAST_M(2, 8)
#undef RWKVQ_FAST_M
#undef RWKVQ_FAST
}
#endif

int rwkvq_vq_fast_rows(const float* x, int M, const uint8_t* codes, int row_bytes, const int8_t* books,
                       const float* scales, float* y, int N, int K, int dim, int group_rows, int group_cols, int bits,
                       int n0, int n1, int isa) {
    const int S = K / (STEP * dim), C = (K + group_cols - 1) / group_cols;
    const int NT = bits <= 4 ? 1 : 1 << (bits - 4); /* 16-entry tables per codebook component */
    int8_t* q = (int8_t*)malloc((size_t)M * S * dim * STEP);
    float* d = (float*)malloc(sizeof(float) * (size_t)M * S * 8);
    /* AVX2: the pshufb tables; scalar: indices, float codebooks and float activations (fast_rows_scalar) */
    const size_t scalar_bytes = (((size_t)(K / dim) + 63) & ~(size_t)63) +
                                sizeof(float) * ((size_t)C * (1 << bits) * dim + (size_t)M * K);
    uint8_t* scratch = (uint8_t*)malloc(isa >= RWKVQ_ISA_AVX2 ? (size_t)C * dim * NT * 32 : scalar_bytes);
    int rc = q && d && scratch ? 0 : -1;
    for (int m = 0; rc == 0 && m < M; ++m)
        rc = quantize_row(x + (size_t)m * K, K, dim, q + (size_t)m * S * dim * STEP, d + (size_t)m * S * 8, isa);
    if (rc == 0) {
#if defined(__x86_64__)
        if (isa >= RWKVQ_ISA_AVX2)
            fast_rows_avx2(q, d, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits, n0,
                           n1, NT, scratch);
        else
#endif
            fast_rows_scalar(q, d, M, codes, row_bytes, books, scales, y, N, K, dim, group_rows, group_cols, bits,
                             n0, n1, scratch);
    }
    free(q);
    free(d);
    free(scratch);
    return rc;
}
