/* The RWKV-7 WKV step kernel: see rwkvq_wkv7.h. Plain float arithmetic in the order of the official
 * formula (decay, then the (S a) b^T term, then v k^T), one head at a time. */
#include "rwkvq_wkv7.h"

#include <stdio.h>

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

int rwkvq_wkv7_step(const float* state, const float* r, const float* w, const float* k, const float* v,
                    const float* a, const float* b, float* y, float* new_state, int64_t heads, int64_t head_size,
                    int64_t first, int64_t count) {
    if (head_size < 1 || head_size > RWKVQ_WKV7_MAX_HEAD || heads < 1 || first < 0 || count < 0)
        return RWKVQ_WKV7_BAD_SIZES;
    const int64_t N = head_size;
    float sa[RWKVQ_WKV7_MAX_HEAD];
    for (int64_t bh = first; bh < first + count; ++bh) {
        const int64_t vec = bh * N;  /* offset of this head in the [B, H * N] vectors (b * H * N + h * N) */
        const int64_t mat = vec * N; /* and in the [B, H, N, N] state */
        const float *S = state + mat, *rh = r + vec, *wh = w + vec, *kh = k + vec, *vh = v + vec, *ah = a + vec,
                    *bh_ = b + vec;
        float* out = new_state + mat;
        for (int64_t i = 0; i < N; ++i) {
            float acc = 0.0f;
            for (int64_t j = 0; j < N; ++j) acc += S[i * N + j] * ah[j];
            sa[i] = acc;
        }
        for (int64_t i = 0; i < N; ++i) {
            const float* Si = S + i * N;
            float* Oi = out + i * N;
            float acc = 0.0f;
            for (int64_t j = 0; j < N; ++j) {
                const float s = Si[j] * wh[j] + sa[i] * bh_[j] + vh[i] * kh[j];
                Oi[j] = s;
                acc += s * rh[j];
            }
            y[vec + i] = acc;
        }
    }
    return 0;
}
