/* CPU kernels of rwkvq.SQMatMul: packed 2/3/4-bit scalar weights (layout and numerics: rwkvq_sq.h).
 *
 * exact: W decoded to float (a row for the GEMV, a panel of rows x a column block for the GEMM, so the block of
 *        x it is multiplied with stays in cache), float dot products.
 * fast:  x quantized once per call to int8 per block of A = gcd(group_size, 128) values (rwkvq_sq_quantize), then
 *        integer block dot products with the unsigned codes, kept integer over the whole activation block: the GEMV
 *        unpacks each 32 codes in registers and dots them with up to RWKVQ_SQ_GEMV_MAX_ROWS activation rows; the
 *        GEMM unpacks a panel of W rows once (one byte per weight) and sweeps every activation row over it in tiles
 *        of 2 W rows x 4 activation rows, whose 8 integer block sums are reduced into one vector and scaled by
 *        d[m, a] * s[n, g] with one multiply-add (the inner loop runs over all of K; the zero points enter at the
 *        end, one multiply-add per group). Portable scalar code, and AVX2 / AVX-VNNI / AVX-512 VNNI
 *        instantiations of sq_simd.inc compiled with target attributes (no -march flag needed), chosen by the
 *        caller's `isa` (rwkvq_dispatch.h); an isa the CPU does not run is refused, never executed.
 *
 * Every exported entry point checks its int arguments in 64-bit arithmetic (rwkvq_sq_check_layout) before
 * forming an index; the buffers must hold what the sizes say (rwkvq_sq_check_payload, checked by the callers).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkvq_cpu.h"
#include "rwkvq_dispatch.h"
#include "rwkvq_sq.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SQ_X86 1
#else
#define SQ_X86 0
#endif

enum { SQ_BLOCK = 32, SQ_ACT_BLOCK_MAX = 128, SQ_PANEL = 16, SQ_KC = 512, SQ_MAX_CHUNKS = 64, SQ_STACK_GROUPS = 64 };
enum { SQ_PATH_AUTO = 0, SQ_PATH_GEMV = 1, SQ_PATH_GEMM = 2 };

/* ---- validation (64-bit arithmetic, before any size is narrowed to int) ----------------------------------- */

static const char* refuse(char* msg, size_t cap, const char* fmt, long long a, long long b) {
    snprintf(msg, cap, fmt, a, b);
    return msg;
}

static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

const char* rwkvq_sq_check_layout(int64_t N, int64_t K, int64_t bits, int64_t group_size, char* msg, size_t cap) {
    if (N < 1 || N > INT_MAX) return refuse(msg, cap, "N=%lld is outside [1, 2^31)", N, 0);
    if (K < 1 || K > INT_MAX) return refuse(msg, cap, "K=%lld is outside [1, 2^31)", K, 0);
    if (bits < 2 || bits > 4) return refuse(msg, cap, "bits=%lld is not 2, 3 or 4", bits, 0);
    if (group_size < SQ_BLOCK || group_size > INT_MAX || group_size % SQ_BLOCK)
        return refuse(msg, cap, "group_size=%lld is not a multiple of 32 in [32, 2^31)", group_size, 0);
    if (K % SQ_BLOCK) return refuse(msg, cap, "K=%lld is not a multiple of 32", K, 0);
    /* row bytes K/32*4*bits = K*bits/8 <= K/2 and groups G <= K/32 stay within int once K does */
    return NULL;
}

static const char* check_dims(const char* what, int rank, const int64_t* dims, int64_t d0, int64_t d1, char* msg,
                              size_t cap) {
    if (rank != 2) {
        snprintf(msg, cap, "%s has rank %d, expected [%lld, %lld]", what, rank, (long long)d0, (long long)d1);
        return msg;
    }
    if (dims[0] != d0 || dims[1] != d1) {
        snprintf(msg, cap, "%s has shape [%lld, %lld], expected [%lld, %lld]", what, (long long)dims[0],
                 (long long)dims[1], (long long)d0, (long long)d1);
        return msg;
    }
    return NULL;
}

const char* rwkvq_sq_check_payload(int64_t N, int64_t K, int64_t bits, int64_t group_size, int codes_rank,
                                   const int64_t* codes_dims, int scales_rank, const int64_t* scales_dims,
                                   int zeros_rank, const int64_t* zeros_dims, char* msg, size_t cap) {
    const char* bad = rwkvq_sq_check_layout(N, K, bits, group_size, msg, cap);
    if (bad) return bad;
    const int64_t G = ceil_div(K, group_size);
    if ((bad = check_dims("codes", codes_rank, codes_dims, N, K / SQ_BLOCK * 4 * bits, msg, cap))) return bad;
    if ((bad = check_dims("scales", scales_rank, scales_dims, N, G, msg, cap))) return bad;
    return check_dims("zero_points", zeros_rank, zeros_dims, N, ceil_div(G * bits, 8), msg, cap);
}

/* the int arguments of an entry point: a layout that passes the checks, M >= 0, known kernels, a runnable isa */
static int bad_args(int M, int N, int K, int bits, int group_size, int kernels, int isa) {
    char msg[160];
    if (rwkvq_sq_check_layout(N, K, bits, group_size, msg, sizeof msg) || M < 0) return 1;
    if (kernels != RWKVQ_KERNELS_EXACT && kernels != RWKVQ_KERNELS_FAST) return 1;
    return !rwkvq_isa_supported(isa);
}

/* ---- shared pieces ---------------------------------------------------------------------------------------- */

/* IEEE half -> float in software (F16C is not baseline x86-64); exact for every value */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else { /* zero or subnormal: mant * 2^-24 */
        const float f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* n IEEE halves to floats (the portable conversion; the SIMD kernels use F16C, exact alike) */
static void halves_scalar(const uint16_t* h, int n, float* f) {
    for (int i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}

typedef void (*halves_fn)(const uint16_t*, int, float*);

/* eight bytes of a little-endian stream as one word */
static inline uint64_t load_le64(const uint8_t* p) {
    uint64_t word = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(&word, p, 8);
#else
    for (int i = 0; i < 8; ++i) word |= (uint64_t)p[i] << (8 * i);
#endif
    return word;
}

/* the G zero points of one row (a little-endian stream of `bits`-bit values, ceil(G * bits / 8) bytes): nibbles
 * directly; otherwise eight bytes at a time in one word, then shifts, the stream's last bytes one by one (reading
 * one or two bytes per value was ~6% of a 0.1B decode, a byte loop per word ~7% with the 4-bit head) */
static void zero_points(const uint8_t* zrow, int G, int bits, int* z) {
    if (bits == 4) {
        for (int g = 0; g + 1 < G; g += 2) z[g] = zrow[g / 2] & 0x0f, z[g + 1] = zrow[g / 2] >> 4;
        if (G & 1) z[G - 1] = zrow[G / 2] & 0x0f;
        return;
    }
    const int64_t nbytes = ceil_div((int64_t)G * bits, 8);
    const unsigned mask = (1u << bits) - 1;
    for (int g = 0; g < G;) {
        const int64_t byte = (int64_t)g * bits >> 3;
        uint64_t word = 0;
        if (byte + 8 <= nbytes)
            word = load_le64(zrow + byte);
        else
            for (int64_t i = 0; byte + i < nbytes; ++i) word |= (uint64_t)zrow[byte + i] << (8 * i);
        for (int shift = (int)((int64_t)g * bits - 8 * byte); g < G && shift + bits <= 64; ++g, shift += bits)
            z[g] = (int)((word >> shift) & mask);
    }
}

/* one row's group scales (float) and zero points */
static void row_groups_with(halves_fn halves, const uint16_t* scales, const uint8_t* zeros, int n, int G, int bits,
                            float* s, int* z) {
    const uint8_t* zrow = zeros + (size_t)n * (size_t)ceil_div((int64_t)G * bits, 8);
    halves(scales + (size_t)n * G, G, s);
    zero_points(zrow, G, bits, z);
}

/* the codes of one block of 32 weights (layout: rwkvq_sq.h) */
static void unpack_block(const uint8_t* p, int bits, uint8_t* c) {
    if (bits == 4) {
        for (int j = 0; j < 16; ++j) c[j] = p[j] & 0x0f, c[j + 16] = p[j] >> 4;
        return;
    }
    for (int j = 0; j < 8; ++j)
        for (int q = 0; q < 4; ++q) c[j + 8 * q] = (p[j] >> (2 * q)) & 3;
    if (bits == 3)
        for (int i = 0; i < SQ_BLOCK; ++i) c[i] |= ((p[8 + i / 8] >> (i % 8)) & 1) << 2;
}

/* columns [k0, k1) (multiples of 32) of W row n as floats into w */
static void decode_row(const uint8_t* crow, const float* s, const int* z, int k0, int k1, int bits, int group_size,
                       float* w) {
    uint8_t c[SQ_BLOCK];
    for (int k = k0; k < k1; k += SQ_BLOCK) {
        unpack_block(crow + (size_t)(k / SQ_BLOCK) * 4 * bits, bits, c);
        const int g = k / group_size;
        for (int i = 0; i < SQ_BLOCK; ++i) w[k - k0 + i] = (float)((int)c[i] - z[g]) * s[g];
    }
}

/* float dot product in eight independent partial sums (vectorizable without reassociation flags) */
static float dot(const float* a, const float* b, int n) {
    float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) p[j] += a[i + j] * b[i + j];
    float t = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for (; i < n; ++i) t += a[i] * b[i];
    return t;
}

/* ---- activations for the fast numerics -------------------------------------------------------------------
 * Activation blocks of A = gcd(group_size, 128) values: a multiple of 32 dividing the weight group, so a block never
 * straddles two groups (the last block of a row holds K - (nb - 1) * A values, a multiple of 32);
 * acts = d float [M, nb] (block scales, nb = ceil(K / A)), T float [M, G] (group sums of d * sum q), q int8 [M, K]. */

static int act_block(int group_size) {
    int a = SQ_ACT_BLOCK_MAX, b = group_size;
    while (b) { const int t = a % b; a = b, b = t; }
    return a;
}

typedef struct {
    float* d;
    float* T;
    int8_t* q;
} Acts;

static Acts acts_view(const void* acts, int M, int K, int group_size) {
    const int64_t nb = ceil_div(K, act_block(group_size)), G = ceil_div(K, group_size);
    Acts a;
    a.d = (float*)acts;
    a.T = a.d + (size_t)M * nb;
    a.q = (int8_t*)(a.T + (size_t)M * G);
    return a;
}

int64_t rwkvq_sq_acts_bytes(int M, int K, int group_size) {
    char msg[160];
    if (M < 0 || rwkvq_sq_check_layout(1, K, 2, group_size, msg, sizeof msg)) return -1;
    const int64_t nb = ceil_div(K, act_block(group_size)), G = ceil_div(K, group_size);
    return (int64_t)M * (4 * nb + 4 * G + K); /* < 2^31 * 2^33: no overflow */
}

/* one activation row x [K] to int8 per block of A values: d = max|x| / 127 (NaN when the block holds a NaN),
 * q = x / d rounded to nearest even (0 for inf or NaN, or when d is 0); T[g] += d * sum q over the group's blocks */
static void quantize_row_scalar(const float* x, int K, int A, int bpg, int8_t* q, float* dd, float* T) {
    for (int b = 0; b * A < K; ++b) {
        {
            const float* xb = x + (size_t)b * A;
            int8_t* qb = q + (size_t)b * A;
            const int len = K - b * A < A ? K - b * A : A;
            float amax = 0.0f;
            int nan = 0;
            for (int i = 0; i < len; ++i) {
                amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
                nan |= xb[i] != xb[i];
            }
            const float d = amax / 127.0f;
            int sum = 0;
            for (int i = 0; i < len; ++i) {
                const float v = d > 0.0f ? nearbyintf(xb[i] / d) : 0.0f;
                /* in range unless x holds inf or NaN (then 0: the block scale below carries them into y) */
                qb[i] = (int8_t)(v >= -127.0f && v <= 127.0f ? v : 0.0f);
                sum += qb[i];
            }
            dd[b] = nan ? NAN : d; /* inf or NaN in x: inf or NaN scale, NaN in y */
            T[b / bpg] += d * (float)sum;
        }
    }
}

/* ---- portable fast kernels (the same signatures as the SIMD instantiations) ------------------------------- */

/* sum of the n products of the codes c (one byte per weight) and the int8 activations q */
static int block_dot(const uint8_t* c, const int8_t* q, int n) {
    int sum = 0;
    for (int i = 0; i < n; ++i) sum += (int)c[i] * q[i];
    return sum;
}

/* z NULL: without the zero points */
static void rows_scalar(const uint8_t* src, int packed, int bits, int MR, const float* s, const int* z,
                        const int8_t* q, const float* d, const float* T, int K, int nb, int sub, int G, int bpg,
                        float* y, int64_t ldy) {
    const int nsub = K / SQ_BLOCK;
    for (int r = 0; r < MR; ++r) {
        float acc = 0.0f, corr = 0.0f;
        for (int g = 0; g < G; ++g) {
            const int a0 = g * bpg, a1 = a0 + bpg < nb ? a0 + bpg : nb;
            float accg = 0.0f;
            for (int a = a0; a < a1; ++a) {
                const int j0 = a * sub, j1 = j0 + sub < nsub ? j0 + sub : nsub;
                int sum = 0;
                for (int j = j0; j < j1; ++j) {
                    uint8_t unpacked[SQ_BLOCK];
                    const uint8_t* c = src + (size_t)j * SQ_BLOCK;
                    if (packed) unpack_block(src + (size_t)j * 4 * bits, bits, unpacked), c = unpacked;
                    sum += block_dot(c, q + (size_t)r * K + (size_t)j * SQ_BLOCK, SQ_BLOCK);
                }
                accg += (float)sum * d[(size_t)r * nb + a];
            }
            acc += accg * s[g];
            if (z) corr += s[g] * (float)z[g] * T[(size_t)r * G + g];
        }
        y[r * ldy] = acc - corr;
    }
}

/* four consecutive W rows (row stride row_bytes; s [4][G]; zrows[r]: row r's zero-point stream) . one activation
 * row: y[0 .. 4) */
static void rows4_scalar(const uint8_t* src, int64_t row_bytes, int bits, const float* s, const uint8_t* const* zrows,
                         const int8_t* q, const float* d, const float* T, int K, int nb, int sub, int G, int bpg,
                         float* y) {
    int z[64];
    for (int r = 0; r < 4; ++r) {
        rows_scalar(src + r * row_bytes, 1, bits, 1, s + (size_t)r * G, NULL, q, d, NULL, K, nb, sub, G, bpg, y + r,
                    1);
        float corr = 0.0f;
        for (int g0 = 0; g0 < G; g0 += 64) { /* 64 values end on a byte: the next chunk starts at byte 8 * bits */
            const int n = G - g0 < 64 ? G - g0 : 64;
            zero_points(zrows[r] + (size_t)(g0 / 64) * 8 * bits, n, bits, z);
            for (int g = 0; g < n; ++g) corr += s[(size_t)r * G + g0 + g] * (float)z[g] * T[g0 + g];
        }
        y[r] -= corr;
    }
}

static void panel_scalar(const uint8_t* w, int rows, int MR, const float* sp, const float* szp, const int8_t* q,
                         const float* dT, const float* TT, int K, int nb, int sub, int G, int bpg, float* y,
                         int64_t ldy) {
    const int nsub = K / SQ_BLOCK;
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < MR; ++i) {
            const size_t lane = (size_t)(r / 2) * G * 8 + 4 * (r % 2) + i; /* (pair, g = 0, lane) in sp, szp */
            float acc = 0.0f;
            for (int a = 0; a < nb; ++a) {
                const int j0 = a * sub, j1 = j0 + sub < nsub ? j0 + sub : nsub;
                const size_t k0 = (size_t)j0 * SQ_BLOCK;
                const int sum = block_dot(w + (size_t)r * K + k0, q + (size_t)i * K + k0, (j1 - j0) * SQ_BLOCK);
                acc += (float)sum * (dT[(size_t)a * 4 + i] * sp[lane + (size_t)(a / bpg) * 8]);
            }
            for (int g = 0; g < G; ++g) acc -= szp[lane + (size_t)g * 8] * TT[(size_t)g * 4 + i];
            y[i * ldy + r] = acc;
        }
}

static void unpack_rows_scalar(const uint8_t* codes, int64_t row_bytes, int rows, int nb, int bits, uint8_t* out) {
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < nb; ++b)
            unpack_block(codes + r * row_bytes + (size_t)b * 4 * bits, bits, out + ((size_t)r * nb + b) * SQ_BLOCK);
}

static void decode_rows_scalar(const uint8_t* codes, int64_t row_bytes, int rows, int b0, int b1, int bits,
                               const float* s, const int* z, int G, int group_blocks, float* out, int64_t ldo) {
    for (int r = 0; r < rows; ++r)
        decode_row(codes + r * row_bytes, s + (size_t)r * G, z + (size_t)r * G, b0 * SQ_BLOCK, b1 * SQ_BLOCK, bits,
                   group_blocks * SQ_BLOCK, out + r * ldo);
}

static void dot_rows_scalar(const float* w, const float* x, int64_t ldx, int MR, int n, float* y, int64_t ldy,
                            int accumulate) {
    for (int r = 0; r < MR; ++r) {
        const float t = dot(x + r * ldx, w, n);
        y[r * ldy] = accumulate ? y[r * ldy] + t : t;
    }
}

typedef void (*rows_fn)(const uint8_t*, int, int, int, const float*, const int*, const int8_t*, const float*,
                        const float*, int, int, int, int, int, float*, int64_t);
typedef void (*rows4_fn)(const uint8_t*, int64_t, int, const float*, const uint8_t* const*, const int8_t*,
                         const float*, const float*, int, int, int, int, int, float*);
typedef void (*unpack_rows_fn)(const uint8_t*, int64_t, int, int, int, uint8_t*);
typedef void (*panel_fn)(const uint8_t*, int, int, const float*, const float*, const int8_t*, const float*,
                         const float*, int, int, int, int, int, float*, int64_t);
typedef void (*decode_rows_fn)(const uint8_t*, int64_t, int, int, int, int, const float*, const int*, int, int, float*,
                               int64_t);
typedef void (*dot_rows_fn)(const float*, const float*, int64_t, int, int, float*, int64_t, int);


/* the kernels of one instruction set */
typedef struct {
    rows_fn rows;
    rows4_fn rows4; /* one activation row, four W rows */
    panel_fn panel;
    unpack_rows_fn unpack_rows;
    decode_rows_fn decode_rows;
    dot_rows_fn dot_rows;
    halves_fn halves;
} Kernels;

#if SQ_X86
#define SQ_ISA avx2
#define SQ_TARGET "avx2,fma,f16c"
#define SQ_ACC __m256i
#define SQ_ZERO _mm256_setzero_si256() /* zeroing idiom: costs no execution unit */
#define SQ_INIT(c, q) _mm256_maddubs_epi16((c), (q))
#define SQ_ADD(acc, c, q) _mm256_add_epi16((acc), _mm256_maddubs_epi16((c), (q)))
#define SQ_I32(acc) _mm256_madd_epi16((acc), _mm256_set1_epi16(1))
#include "sq_simd.inc"
#undef SQ_ISA
#undef SQ_TARGET
#undef SQ_INIT
#undef SQ_ADD
#undef SQ_I32

#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11
#define SQ_HAVE_VNNI 1
#define SQ_ISA avxvnni
#define SQ_TARGET "avx2,fma,f16c,avxvnni"
#define SQ_INIT(c, q) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (c), (q))
#define SQ_ADD(acc, c, q) _mm256_dpbusd_avx_epi32((acc), (c), (q))
#define SQ_I32(acc) (acc)
#include "sq_simd.inc"
#undef SQ_ISA
#undef SQ_TARGET
#undef SQ_INIT
#undef SQ_ADD
#undef SQ_I32

/* the 256-bit EVEX form (AVX512VL): the kernels' blocks are 32 weights, one ymm register */
#define SQ_ISA avx512vnni
#define SQ_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define SQ_INIT(c, q) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (c), (q))
#define SQ_ADD(acc, c, q) _mm256_dpbusd_epi32((acc), (c), (q))
#define SQ_I32(acc) (acc)
#include "sq_simd.inc"
#undef SQ_ISA
#undef SQ_TARGET
#undef SQ_INIT
#undef SQ_ADD
#undef SQ_I32
#undef SQ_ACC
#undef SQ_ZERO
#endif
#endif

#define SQ_KERNELS(SUFFIX) \
    (Kernels) {                                                                                                    \
        rows_##SUFFIX, rows4_##SUFFIX, panel_##SUFFIX, unpack_rows_##SUFFIX, decode_rows_##SUFFIX, dot_rows_##SUFFIX, \
            halves_##SUFFIX                                                                                        \
    }

/* the kernels of an instruction set; 0 when this build has none for it */
static int isa_kernels(int isa, Kernels* k) {
    switch (isa) {
    case RWKVQ_ISA_SCALAR: *k = SQ_KERNELS(scalar); return 1;
#if SQ_X86
    case RWKVQ_ISA_AVX2: *k = SQ_KERNELS(avx2); return 1;
#ifdef SQ_HAVE_VNNI
    case RWKVQ_ISA_AVXVNNI: *k = SQ_KERNELS(avxvnni); return 1;
    case RWKVQ_ISA_AVX512VNNI: *k = SQ_KERNELS(avx512vnni); return 1;
#endif
#endif
    default: return 0;
    }
}

/* rwkvq_sq_quantize with the given instruction set's row quantizer (every one writes the same bytes) */
static int quantize_isa(const float* x, int M, int K, int group_size, void* acts, int isa) {
    if (rwkvq_sq_acts_bytes(M, K, group_size) < 0) return RWKVQ_BAD_SIZES;
    const int A = act_block(group_size), nb = (int)ceil_div(K, A), G = (int)ceil_div(K, group_size);
    const int bpg = group_size / A;
    Acts a = acts_view(acts, M, K, group_size);
    void (*quantize_row)(const float*, int, int, int, int8_t*, float*, float*) = quantize_row_scalar;
#if SQ_X86
    if (isa != RWKVQ_ISA_SCALAR && rwkvq_isa_supported(RWKVQ_ISA_AVX2)) quantize_row = quantize_row_avx2;
#else
    (void)isa;
#endif
    for (int m = 0; m < M; ++m) {
        float* T = a.T + (size_t)m * G;
        for (int g = 0; g < G; ++g) T[g] = 0.0f;
        quantize_row(x + (size_t)m * K, K, A, bpg, a.q + (size_t)m * K, a.d + (size_t)m * nb, T);
    }
    return RWKVQ_OK;
}

/* the best row quantizer this CPU runs (AVX2: ~15x the scalar one; 0.2 ms for 128 x 3072 here) */
int rwkvq_sq_quantize(const float* x, int M, int K, int group_size, void* acts) {
    return quantize_isa(x, M, K, group_size, acts, rwkvq_isa_best());
}

/* ---- the pieces ------------------------------------------------------------------------------------------- */

typedef struct {
    const float* x;
    Acts a;
    int M, N, K, bits, group_size, G, nb; /* nb: 32-weight blocks of a W row */
    int anb, sub, bpg; /* activation blocks per row, 32-sub-blocks per activation block, activation blocks per group */
    int64_t row_bytes;
    const uint8_t* codes;
    const uint16_t* scales;
    const uint8_t* zeros;
    float* y;
} Call;

/* the exact GEMV: each W row decoded to float once, dotted with every activation row */
static int exact_gemv(const Call* c, const Kernels* kn, int n0, int n1) {
    float* w = (float*)malloc(sizeof(float) * (size_t)c->K);
    float* s = (float*)malloc(sizeof(float) * (size_t)c->G);
    int* z = (int*)malloc(sizeof(int) * (size_t)c->G);
    int rc = w && s && z ? RWKVQ_OK : RWKVQ_NO_MEMORY;
    const int group_blocks = c->group_size / SQ_BLOCK;
    for (int n = n0; n < n1 && !rc; ++n) {
        row_groups_with(kn->halves, c->scales, c->zeros, n, c->G, c->bits, s, z);
        kn->decode_rows(c->codes + n * c->row_bytes, c->row_bytes, 1, 0, c->nb, c->bits, s, z, c->G, group_blocks, w,
                        c->K);
        for (int m = 0; m < c->M; m += RWKVQ_SQ_GEMV_MAX_ROWS) {
            const int mr = c->M - m < RWKVQ_SQ_GEMV_MAX_ROWS ? c->M - m : RWKVQ_SQ_GEMV_MAX_ROWS;
            kn->dot_rows(w, c->x + (size_t)m * c->K, c->K, mr, c->K, c->y + (size_t)m * c->N + n, c->N, 0);
        }
    }
    free(w), free(s), free(z);
    return rc;
}

/* the exact GEMM: a panel of W rows x a block of columns decoded to float once, every activation row swept over
 * it (the matching block of x stays in cache) */
static int exact_gemm(const Call* c, const Kernels* kn, int n0, int n1) {
    const int kc_max = c->K < SQ_KC ? c->K : SQ_KC;
    float* w = (float*)malloc(sizeof(float) * (size_t)SQ_PANEL * kc_max);
    float* s = (float*)malloc(sizeof(float) * (size_t)SQ_PANEL * c->G);
    int* z = (int*)malloc(sizeof(int) * (size_t)SQ_PANEL * c->G);
    if (!w || !s || !z) return free(w), free(s), free(z), RWKVQ_NO_MEMORY;
    const int group_blocks = c->group_size / SQ_BLOCK;
    for (int p = n0; p < n1; p += SQ_PANEL) {
        const int rows = n1 - p < SQ_PANEL ? n1 - p : SQ_PANEL;
        for (int r = 0; r < rows; ++r)
            row_groups_with(kn->halves, c->scales, c->zeros, p + r, c->G, c->bits, s + (size_t)r * c->G,
                            z + (size_t)r * c->G);
        for (int k0 = 0; k0 < c->K; k0 += SQ_KC) {
            const int k1 = c->K - k0 < SQ_KC ? c->K : k0 + SQ_KC;
            kn->decode_rows(c->codes + p * c->row_bytes, c->row_bytes, rows, k0 / SQ_BLOCK, k1 / SQ_BLOCK, c->bits, s,
                            z, c->G, group_blocks, w, kc_max);
            for (int m = 0; m < c->M; m += RWKVQ_SQ_GEMV_MAX_ROWS) {
                const int mr = c->M - m < RWKVQ_SQ_GEMV_MAX_ROWS ? c->M - m : RWKVQ_SQ_GEMV_MAX_ROWS;
                for (int r = 0; r < rows; ++r)
                    kn->dot_rows(w + (size_t)r * kc_max, c->x + (size_t)m * c->K + k0, c->K, mr, k1 - k0,
                                 c->y + (size_t)m * c->N + p + r, c->N, k0 > 0);
            }
        }
    }
    free(w), free(s), free(z);
    return RWKVQ_OK;
}

/* the fast GEMV: codes unpacked in registers, up to RWKVQ_SQ_GEMV_MAX_ROWS activation rows per pass */
static int fast_gemv(const Call* c, const Kernels* kn, int n0, int n1) {
    const int64_t zbytes = ceil_div((int64_t)c->G * c->bits, 8);
    /* rows4 reads 8 bytes from each group of 8's first zero-point byte: up to `reach` bytes from a row's start; a
     * row whose reach passes the end of the zero-point tensor is read from a padded copy (one per row of four) */
    const int64_t reach = (int64_t)((c->G - 1) / 8) * c->bits + 8;
    /* a decoded token runs thousands of these pieces: up to SQ_STACK_GROUPS groups, the buffers live on the stack
     * instead of three heap allocations per piece */
    float s_stack[4 * SQ_STACK_GROUPS];
    int z_stack[4 * SQ_STACK_GROUPS];
    uint8_t padded_stack[4 * (SQ_STACK_GROUPS / 2 + 8)];
    const int small = c->G <= SQ_STACK_GROUPS;
    float* s = small ? s_stack : (float*)malloc(sizeof(float) * (size_t)c->G * 4);
    int* z = small ? z_stack : (int*)malloc(sizeof(int) * (size_t)c->G * 4);
    uint8_t* padded = small ? padded_stack : (uint8_t*)malloc(4 * (size_t)(zbytes + 8));
    int rc = s && z && padded ? RWKVQ_OK : RWKVQ_NO_MEMORY;
    if (padded) memset(padded, 0, 4 * (size_t)(zbytes + 8)); /* the bytes past a copied stream: read, masked */
    if (c->M == 1) /* decode: four W rows at a time (independent accumulators, shared activation loads) */
        for (; n0 + 4 <= n1 && !rc; n0 += 4) {
            /* the four rows' scales are contiguous: one conversion for all of them (per row, the call and its
             * tail handling were ~15% of the 0.1B head's GEMV) */
            kn->halves(c->scales + (size_t)n0 * c->G, 4 * c->G, s);
            const uint8_t* zrows[4];
            for (int r = 0; r < 4; ++r) {
                zrows[r] = c->zeros + (size_t)(n0 + r) * (size_t)zbytes;
                if ((int64_t)(n0 + r) * zbytes + reach > (int64_t)c->N * zbytes)
                    zrows[r] = (const uint8_t*)memcpy(padded + (size_t)r * (size_t)(zbytes + 8), zrows[r],
                                                      (size_t)zbytes);
            }
            kn->rows4(c->codes + n0 * c->row_bytes, c->row_bytes, c->bits, s, zrows, c->a.q, c->a.d, c->a.T, c->K,
                      c->anb, c->sub, c->G, c->bpg, c->y + n0);
        }
    for (int n = n0; n < n1 && !rc; ++n) {
        row_groups_with(kn->halves, c->scales, c->zeros, n, c->G, c->bits, s, z);
        for (int m = 0; m < c->M; m += RWKVQ_SQ_GEMV_MAX_ROWS) {
            const int mr = c->M - m < RWKVQ_SQ_GEMV_MAX_ROWS ? c->M - m : RWKVQ_SQ_GEMV_MAX_ROWS;
            kn->rows(c->codes + n * c->row_bytes, 1, c->bits, mr, s, z, c->a.q + (size_t)m * c->K,
                     c->a.d + (size_t)m * c->anb, c->a.T + (size_t)m * c->G, c->K, c->anb, c->sub, c->G, c->bpg,
                     c->y + (size_t)m * c->N + n, c->N);
        }
    }
    if (!small) free(s), free(z), free(padded);
    return rc;
}

/* the fast GEMM: a panel of W rows unpacked once, every activation row swept over it, 4 rows at a time */
static int fast_gemm(const Call* c, const Kernels* kn, int n0, int n1) {
    const int G = c->G, pairs = (SQ_PANEL + 1) / 2, quads = (c->M + 3) / 4;
    uint8_t* w = (uint8_t*)malloc((size_t)SQ_PANEL * c->K);
    float* s = (float*)malloc(sizeof(float) * (size_t)G);
    int* z = (int*)malloc(sizeof(int) * (size_t)G);
    float* sp = (float*)malloc(sizeof(float) * (size_t)pairs * G * 8 * 2);
    float* dT = (float*)malloc(sizeof(float) * (size_t)quads * (c->anb + G) * 4);
    int rc = w && s && z && sp && dT ? RWKVQ_OK : RWKVQ_NO_MEMORY;
    float* szp = sp + (size_t)pairs * G * 8;
    float* TT = dT + (size_t)quads * c->anb * 4;
    /* dT [M / 4][anb][4], TT [M / 4][G][4]: the block scales and group sums of 4 activation rows side by side
     * (zero past the last row) */
    for (int m4 = 0; m4 < quads && !rc; ++m4)
        for (int i = 0; i < 4; ++i) {
            const int m = 4 * m4 + i;
            for (int a = 0; a < c->anb; ++a)
                dT[((size_t)m4 * c->anb + a) * 4 + i] = m < c->M ? c->a.d[(size_t)m * c->anb + a] : 0.0f;
            for (int g = 0; g < G; ++g) TT[((size_t)m4 * G + g) * 4 + i] = m < c->M ? c->a.T[(size_t)m * G + g] : 0.0f;
        }
    for (int p = n0; p < n1 && !rc; p += SQ_PANEL) {
        const int panel = n1 - p < SQ_PANEL ? n1 - p : SQ_PANEL;
        kn->unpack_rows(c->codes + p * c->row_bytes, c->row_bytes, panel, c->nb, c->bits, w);
        memset(sp, 0, sizeof(float) * (size_t)pairs * G * 8 * 2); /* a lone last row: its pair's lanes 4-7 zero */
        for (int r = 0; r < panel; ++r) {
            row_groups_with(kn->halves, c->scales, c->zeros, p + r, G, c->bits, s, z);
            for (int g = 0; g < G; ++g)
                for (int i = 0; i < 4; ++i) {
                    const size_t lane = ((size_t)(r / 2) * G + g) * 8 + 4 * (r % 2) + i;
                    sp[lane] = s[g], szp[lane] = s[g] * (float)z[g];
                }
        }
        for (int m = 0; m < c->M; m += 4) {
            const int mr = c->M - m < 4 ? c->M - m : 4;
            kn->panel(w, panel, mr, sp, szp, c->a.q + (size_t)m * c->K, dT + (size_t)(m / 4) * c->anb * 4,
                      TT + (size_t)(m / 4) * G * 4, c->K, c->anb, c->sub, G, c->bpg, c->y + (size_t)m * c->N + p,
                      c->N);
        }
    }
    free(w), free(s), free(z), free(sp), free(dT);
    return rc;
}

static int path_of(int path, int M) {
    return path != SQ_PATH_AUTO ? path : M <= RWKVQ_SQ_GEMV_MAX_ROWS ? SQ_PATH_GEMV : SQ_PATH_GEMM;
}

static int chunks_of(int path, int M, int N, int K) {
    if (M < 0 || N < 1 || K < 1) return -1;
    if ((int64_t)M * N * K < RWKVQ_PARALLEL_MIN_WORK) return 1;
    const int64_t rows = path_of(path, M) == SQ_PATH_GEMV ? 32 : SQ_PANEL;
    const int64_t n = ceil_div(N, rows);
    return n < SQ_MAX_CHUNKS ? (int)n : SQ_MAX_CHUNKS;
}

int rwkvq_sq_chunks(int M, int N, int K) { return chunks_of(SQ_PATH_AUTO, M, N, K); }

static int run_chunk(int path, const float* x, const void* acts, int M, const uint8_t* codes, const uint16_t* scales,
                     const uint8_t* zeros, float* y, int N, int K, int bits, int group_size, int kernels, int isa,
                     int chunk, int chunks) {
    if (bad_args(M, N, K, bits, group_size, kernels, isa) || chunk < 0 || chunk >= chunks) return RWKVQ_BAD_SIZES;
    if (kernels == RWKVQ_KERNELS_FAST && !acts) return RWKVQ_BAD_SIZES;
    Kernels kn;
    if (!isa_kernels(isa, &kn)) return RWKVQ_BAD_SIZES;
    if (M == 0) return RWKVQ_OK;
    const int A = act_block(group_size);
    Call c = {x, {NULL, NULL, NULL}, M, N, K, bits, group_size, (int)ceil_div(K, group_size), K / SQ_BLOCK,
              (int)ceil_div(K, A), A / SQ_BLOCK, group_size / A, (int64_t)K / SQ_BLOCK * 4 * bits, codes, scales,
              zeros, y};
    if (kernels == RWKVQ_KERNELS_FAST) c.a = acts_view(acts, M, K, group_size);
    const int n0 = (int)((int64_t)N * chunk / chunks), n1 = (int)((int64_t)N * (chunk + 1) / chunks);
    const int gemv = path_of(path, M) == SQ_PATH_GEMV;
    if (kernels == RWKVQ_KERNELS_EXACT) return gemv ? exact_gemv(&c, &kn, n0, n1) : exact_gemm(&c, &kn, n0, n1);
    return gemv ? fast_gemv(&c, &kn, n0, n1) : fast_gemm(&c, &kn, n0, n1);
}

int rwkvq_sq_chunk(const float* x, const void* acts, int M, const uint8_t* codes, const uint16_t* scales,
                   const uint8_t* zeros, float* y, int N, int K, int bits, int group_size, int kernels, int isa,
                   int chunk, int chunks) {
    return run_chunk(SQ_PATH_AUTO, x, acts, M, codes, scales, zeros, y, N, K, bits, group_size, kernels, isa, chunk,
                     chunks);
}

/* a whole call: activations quantized once, the pieces over OpenMP threads */
static int run_all(int path, const float* x, int M, const uint8_t* codes, const uint16_t* scales,
                   const uint8_t* zeros, float* y, int N, int K, int bits, int group_size, int kernels, int isa) {
    if (bad_args(M, N, K, bits, group_size, kernels, isa)) return RWKVQ_BAD_SIZES;
    if (M == 0) return RWKVQ_OK;
    void* acts = NULL;
    if (kernels == RWKVQ_KERNELS_FAST) {
        const int64_t bytes = rwkvq_sq_acts_bytes(M, K, group_size);
        if (bytes < 0 || (uint64_t)bytes > SIZE_MAX) return RWKVQ_BAD_SIZES;
        if (!(acts = malloc((size_t)bytes > 0 ? (size_t)bytes : 1))) return RWKVQ_NO_MEMORY;
        quantize_isa(x, M, K, group_size, acts, isa);
    }
    const int chunks = chunks_of(path, M, N, K);
    int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed) if (chunks > 1)
    for (int i = 0; i < chunks; ++i)
        failed |= run_chunk(path, x, acts, M, codes, scales, zeros, y, N, K, bits, group_size, kernels, isa, i,
                            chunks) != RWKVQ_OK;
    free(acts);
    return failed ? RWKVQ_NO_MEMORY : RWKVQ_OK; /* the arguments were checked above: only memory can fail */
}

int rwkvq_sq_matmul(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                    float* y, int N, int K, int bits, int group_size, int kernels, int isa) {
    return run_all(SQ_PATH_AUTO, x, M, codes, scales, zeros, y, N, K, bits, group_size, kernels, isa);
}

int rwkvq_sq_gemv(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* y,
                  int N, int K, int bits, int group_size, int kernels, int isa) {
    return run_all(SQ_PATH_GEMV, x, M, codes, scales, zeros, y, N, K, bits, group_size, kernels, isa);
}

int rwkvq_sq_gemm(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* y,
                  int N, int K, int bits, int group_size, int kernels, int isa) {
    return run_all(SQ_PATH_GEMM, x, M, codes, scales, zeros, y, N, K, bits, group_size, kernels, isa);
}

int rwkvq_sq_decode(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* w, int N, int K,
                    int bits, int group_size) {
    if (bad_args(0, N, K, bits, group_size, RWKVQ_KERNELS_EXACT, RWKVQ_ISA_SCALAR)) return RWKVQ_BAD_SIZES;
    const int G = (int)ceil_div(K, group_size);
    float* s = (float*)malloc(sizeof(float) * (size_t)G);
    int* z = (int*)malloc(sizeof(int) * (size_t)G);
    if (!s || !z) return free(s), free(z), RWKVQ_NO_MEMORY;
    const int64_t row_bytes = (int64_t)K / SQ_BLOCK * 4 * bits;
    for (int n = 0; n < N; ++n) {
        row_groups_with(halves_scalar, scales, zeros, n, G, bits, s, z);
        decode_row(codes + n * row_bytes, s, z, 0, K, bits, group_size, w + (size_t)n * K);
    }
    free(s), free(z);
    return RWKVQ_OK;
}
