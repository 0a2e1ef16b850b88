/* The RWKV-7 WKV kernels: rwkvq.WKV7Step (one token's state update and output for every head) and
 * rwkvq.WKV7Sequence (T tokens of it, each head's state carried from token to token).
 * Semantics and the numpy references: rwkvq_onnx/opspec/wkv7_step.py and wkv7_sequence.py. */
#ifndef RWKVQ_WKV7_H
#define RWKVQ_WKV7_H
#include <stddef.h>
#include <stdint.h>

/* the largest head size the kernel takes (RWKV-7 models use 64; a bound keeps every size far from overflow) */
#define RWKVQ_WKV7_MAX_HEAD 1024

/* head_size in [1, RWKVQ_WKV7_MAX_HEAD]; the state [B, H, N, N] with N = head_size, B >= 0, H >= 1, and
 * B * H * N * N and C = H * N within the kernel's ranges. Writes B and H; NULL or a one-line reason in msg. */
const char* rwkvq_wkv7_check_state(int64_t head_size, int rank, const int64_t* dims, int64_t* batch,
                                   int64_t* heads, char* msg, size_t cap);
/* WKV7Step with its `layer` attribute: the state input holds every layer's state, [L, B, H, N, N], and the op
 * reads state[layer]. Checks 0 <= layer < L and the [B, H, N, N] of one layer as rwkvq_wkv7_check_state (all in
 * 64-bit arithmetic); writes B, H and *offset, the element offset of state[layer]. NULL or a one-line reason. */
const char* rwkvq_wkv7_check_layered_state(int64_t head_size, int64_t layer, int rank, const int64_t* dims,
                                           int64_t* batch, int64_t* heads, int64_t* offset, char* msg, size_t cap);
/* A per-token input (r, w, k, v, a, b), named `what`: [B, C] with C = heads * head_size. */
const char* rwkvq_wkv7_check_vector(const char* what, int64_t batch, int64_t channels, int rank,
                                    const int64_t* dims, char* msg, size_t cap);

/* For every (b, h) in [first, first + count) of the B * H heads, with S = state[b, h] ([value i, key j]):
 *   S'[i, j] = S[i, j] * w[j] + (sum_l S[i, l] a[l]) * b[j] + v[i] * k[j];   y[i] = sum_j S'[i, j] r[j]
 * r, w, k, v, a, b, y are [B, H * N]; new_state like state. Sizes must have passed the checks above.
 * Returns 0, or RWKVQ_WKV7_BAD_SIZES for sizes outside those ranges. */
enum { RWKVQ_WKV7_BAD_SIZES = -2 };
int rwkvq_wkv7_step(const float* state, const float* r, const float* w, const float* k, const float* v,
                    const float* a, const float* b, float* y, float* new_state, int64_t heads, int64_t head_size,
                    int64_t first, int64_t count);

/* A per-token sequence input (r, w, k, v, a, b of WKV7Sequence), named `what`: [B, T, C] with C = heads *
 * head_size. *tokens < 0 takes T from this input (T >= 0, B * T * C within the kernel's ranges, all in 64-bit
 * arithmetic); otherwise its T must equal *tokens. NULL or a one-line reason in msg. */
const char* rwkvq_wkv7_check_sequence(const char* what, int64_t batch, int64_t channels, int rank,
                                      const int64_t* dims, int64_t* tokens, char* msg, size_t cap);

/* For every (b, h) in [first, first + count) of the B * H heads: new_state[b, h] = state[b, h], then for
 * t = 0 .. tokens - 1 the step above on new_state[b, h] in place with the vectors of token t ([B, T, H * N],
 * y likewise). The same float operations in the same order as `tokens` calls of rwkvq_wkv7_step, so the
 * result is bit-identical to stepping. Sizes must have passed the checks above. Returns 0 or
 * RWKVQ_WKV7_BAD_SIZES. */
int rwkvq_wkv7_sequence(const float* state, const float* r, const float* w, const float* k, const float* v,
                        const float* a, const float* b, float* y, float* new_state, int64_t tokens, int64_t heads,
                        int64_t head_size, int64_t first, int64_t count);
#endif
