/* The RWKV-7 WKV kernels (step and sequence): see rwkvq_wkv7.h. Float arithmetic in the order of the official
 * formula (decay, then the (S a) b^T term, then v k^T), one state row at a time, in place: its dot product with
 * a, its update, its dot product with r. Both kernels run the same per-head token function (head_token), so a
 * sequence gives the numbers of stepping token by token. Portable C the compiler vectorizes (no ISA-specific
 * code, so no dispatch needed). */
#include "rwkvq_wkv7.h"

#include <stdio.h>
#include <string.h>

#define LIMIT_ELEMENTS ((int64_t)1 << 62) /* every element count and offset stays far below int64's limit */

const char* rwkvq_wkv7_check_state(int64_t head_size, int rank, const int64_t* dims, int64_t* batch,
                                   int64_t* heads, char* msg, size_t cap) {
    if (head_size < 1 || head_size > RWKVQ_WKV7_MAX_HEAD) {
        snprintf(msg, cap, "attribute head_size=%lld is outside [1, %d]", (long long)head_size, RWKVQ_WKV7_MAX_HEAD);
        return msg;
    }
    if (rank != 4) {
        snprintf(msg, cap, "the state has rank %d, expected 4 ([B, H, N, N])", rank);
        return msg;
    }
    if (dims[0] < 0 || dims[1] < 1 || dims[2] != head_size || dims[3] != head_size) {
        snprintf(msg, cap, "the state has shape [%lld, %lld, %lld, %lld], expected [B, H, %lld, %lld] with H >= 1",
                 (long long)dims[0], (long long)dims[1], (long long)dims[2], (long long)dims[3],
                 (long long)head_size, (long long)head_size);
        return msg;
    }
    int64_t channels, per_batch, total;
    if (__builtin_mul_overflow(dims[1], head_size, &channels) || channels >= ((int64_t)1 << 31) ||
        __builtin_mul_overflow(channels, head_size, &per_batch) ||
        __builtin_mul_overflow(per_batch, dims[0], &total) || total >= LIMIT_ELEMENTS) {
        snprintf(msg, cap, "the state [%lld, %lld, %lld, %lld] is too large", (long long)dims[0], (long long)dims[1],
                 (long long)dims[2], (long long)dims[3]);
        return msg;
    }
    *batch = dims[0];
    *heads = dims[1];
    return NULL;
}

const char* rwkvq_wkv7_check_layered_state(int64_t head_size, int64_t layer, int rank, const int64_t* dims,
                                           int64_t* batch, int64_t* heads, int64_t* offset, char* msg, size_t cap) {
    if (rank != 5) {
        snprintf(msg, cap, "the state has rank %d, expected 5 ([L, B, H, N, N]: every layer's, attribute layer=%lld)",
                 rank, (long long)layer);
        return msg;
    }
    if (layer < 0 || layer >= dims[0]) {
        snprintf(msg, cap, "attribute layer=%lld is outside the state's %lld layers", (long long)layer,
                 (long long)dims[0]);
        return msg;
    }
    if (rwkvq_wkv7_check_state(head_size, 4, dims + 1, batch, heads, msg, cap)) return msg;
    int64_t per_layer, total;
    /* one layer is below LIMIT_ELEMENTS (checked above); the whole tensor exists, but its size is checked too */
    if (__builtin_mul_overflow(*batch * *heads, head_size * head_size, &per_layer) ||
        __builtin_mul_overflow(per_layer, dims[0], &total)) {
        snprintf(msg, cap, "the state [%lld, %lld, %lld, %lld, %lld] is too large", (long long)dims[0],
                 (long long)dims[1], (long long)dims[2], (long long)dims[3], (long long)dims[4]);
        return msg;
    }
    *offset = per_layer * layer;
    return NULL;
}

const char* rwkvq_wkv7_check_vector(const char* what, int64_t batch, int64_t channels, int rank,
                                    const int64_t* dims, char* msg, size_t cap) {
    if (rank != 2 || dims[0] != batch || dims[1] != channels) {
        char got[96] = "";
        int used = 0;
        for (int i = 0; i < rank && i < 4 && used < (int)sizeof got - 24; ++i)
            used += snprintf(got + used, sizeof got - (size_t)used, i ? ", %lld" : "%lld", (long long)dims[i]);
        snprintf(msg, cap, "%s has shape [%s%s], expected [%lld, %lld] (the state's batch, heads x head_size)", what,
                 got, rank > 4 ? ", ..." : "", (long long)batch, (long long)channels);
        return msg;
    }
    return NULL;
}

const char* rwkvq_wkv7_check_sequence(const char* what, int64_t batch, int64_t channels, int rank,
                                      const int64_t* dims, int64_t* tokens, char* msg, size_t cap) {
    int64_t per_token, total;
    const int ok = rank == 3 && dims[0] == batch && dims[2] == channels && dims[1] >= 0 &&
                   (*tokens < 0 || dims[1] == *tokens);
    if (!ok) {
        char got[96] = "";
        int used = 0;
        for (int i = 0; i < rank && i < 4 && used < (int)sizeof got - 24; ++i)
            used += snprintf(got + used, sizeof got - (size_t)used, i ? ", %lld" : "%lld", (long long)dims[i]);
        char t[32] = "T";
        if (*tokens >= 0) snprintf(t, sizeof t, "%lld", (long long)*tokens);
        snprintf(msg, cap, "%s has shape [%s%s], expected [%lld, %s, %lld] (the state's batch, tokens, heads x "
                 "head_size)", what, got, rank > 4 ? ", ..." : "", (long long)batch, t, (long long)channels);
        return msg;
    }
    if (__builtin_mul_overflow(batch, dims[1], &per_token) || __builtin_mul_overflow(per_token, channels, &total) ||
        total >= LIMIT_ELEMENTS) {
        snprintf(msg, cap, "%s [%lld, %lld, %lld] is too large", what, (long long)dims[0], (long long)dims[1],
                 (long long)dims[2]);
        return msg;
    }
    *tokens = dims[1];
    return NULL;
}

/* The helpers below must inline into each target clone (an out-of-line helper is compiled for the baseline ISA
 * only, so the AVX2 clone would run its dot products with 4-wide SSE) */
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* sum_j x[j] * y[j] over n values in LANES independent partial sums (which the compiler maps onto vector
 * registers without reassociating anything), then added pairwise */
#define LANES 8
INLINE float dot(const float* restrict x, const float* restrict y, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; ++l) acc[l] += x[j + l] * y[j + l];
    float tail = 0.0f;
    for (; j < n; ++j) tail += x[j] * y[j];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/* s[j] = s[j] * w[j] + sa * b[j] + v * k[j] in place: element-wise, vectorized */
INLINE void update_row(float* restrict s, const float* restrict w, const float* restrict b,
                       const float* restrict k, float sa, float v, int64_t n) {
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * w[j] + sa * b[j] + v * k[j];
}

/* One token of one head, in place: S [N, N] (row i = value i) becomes S', and y[i] = S'[i, :] . r. The vectors
 * point at this head's N values. */
INLINE void head_token(float* restrict S, const float* restrict r, const float* restrict w,
                              const float* restrict k, const float* restrict v, const float* restrict a,
                              const float* restrict b, float* restrict y, int64_t N) {
    for (int64_t i = 0; i < N; ++i) {
        float* row = S + i * N;
        update_row(row, w, b, k, dot(row, a, N), v[i], N);
        y[i] = dot(row, r, N);
    }
}

/* Built for baseline x86-64 like the rest of the library; on x86-64 GCC also compiles an AVX2 clone (the helpers
 * above inline into it: 8-wide vectors instead of 4) and the loader picks it on CPUs that have AVX2. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int rwkvq_wkv7_step(const float* state, const float* r, const float* w, const float* k, const float* v,
                    const float* a, const float* b, float* y, float* new_state, int64_t heads, int64_t head_size,
                    int64_t first, int64_t count) {
    if (head_size < 1 || head_size > RWKVQ_WKV7_MAX_HEAD || heads < 1 || first < 0 || count < 0)
        return RWKVQ_WKV7_BAD_SIZES;
    const int64_t N = head_size;
    for (int64_t bh = first; bh < first + count; ++bh) {
        const int64_t vec = bh * N;  /* offset of this head in the [B, H * N] vectors (b * H * N + h * N) */
        const int64_t mat = vec * N; /* and in the [B, H, N, N] state */
        memcpy(new_state + mat, state + mat, sizeof(float) * (size_t)(N * N));
        head_token(new_state + mat, r + vec, w + vec, k + vec, v + vec, a + vec, b + vec, y + vec, N);
    }
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int rwkvq_wkv7_sequence(const float* state, const float* r, const float* w, const float* k, const float* v,
                        const float* a, const float* b, float* y, float* new_state, int64_t tokens, int64_t heads,
                        int64_t head_size, int64_t first, int64_t count) {
    if (head_size < 1 || head_size > RWKVQ_WKV7_MAX_HEAD || heads < 1 || tokens < 0 || first < 0 || count < 0)
        return RWKVQ_WKV7_BAD_SIZES;
    const int64_t N = head_size, C = heads * head_size;
    for (int64_t bh = first; bh < first + count; ++bh) {
        const int64_t batch = bh / heads, head = bh % heads;
        float* S = new_state + bh * N * N; /* this head's state, carried in the output from token to token */
        memcpy(S, state + bh * N * N, sizeof(float) * (size_t)(N * N));
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t vec = (batch * tokens + t) * C + head * N; /* [b, t, h * N] in the [B, T, C] vectors */
            head_token(S, r + vec, w + vec, k + vec, v + vec, a + vec, b + vec, y + vec, N);
        }
    }
    return 0;
}
