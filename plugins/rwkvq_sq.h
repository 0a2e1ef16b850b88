/* CPU kernels of rwkvq.SQMatMul (sq_kernels.c): y = x @ W^T for packed 2/3/4-bit scalar weights with group scales
 * and zero points. Spec and numpy reference: rwkvq_onnx/opspec/sq_matmul.py.
 *
 *   x       float   [M, K]                     activations (K a multiple of 32)
 *   codes   uint8   [N, K/32 * 4 * bits]       each block of 32 weights c_0..c_31 of a row in 4 * bits bytes:
 *                                                bits 2: byte j = c_j | c_{j+8} << 2 | c_{j+16} << 4 | c_{j+24} << 6
 *                                                bits 3: those 8 bytes of the low 2 bits, then a 4-byte plane whose
 *                                                        bit i (little-endian) is bit 2 of c_i
 *                                                bits 4: byte j = c_j | c_{j+16} << 4 (16 bytes)
 *                                              (SIMD: one broadcast, one variable shift and one AND give the low
 *                                              bits of all 32 weights; the plane costs a shuffle and a compare)
 *   scales  float16 [N, G]                     G = ceil(K / group_size), raw IEEE half bits
 *   zeros   uint8   [N, ceil(G * bits / 8)]    the G zero points of a row, `bits` bits each, little-endian bit stream
 *   y       float   [M, N]                     W[n, k] = (code[n, k] - zero[n, g]) * scale[n, g], g = k / group_size
 *
 * Numerics (rwkvq_dispatch.h): exact = float W, float accumulation; fast = x quantized to int8 per activation block
 * of A = gcd(group_size, 128) values (a multiple of 32 dividing the group, so a block never straddles two groups; the
 * last block of a row may be shorter), d[m,b] = max|x_block| / 127; integer dot products of the unsigned codes with
 * the int8 activations over the WHOLE block (AVX2: int16 vpmaddubsw sums added with vpaddw over the block's <= 4
 * sub-blocks of 32, at most 4 * 2 * 15 * 127 = 15240 < 32767 per lane; VNNI: vpdpbusd into int32), then one float
 * multiply-add per block; the zero point enters once per group through the group's sum of the dequantized int8
 * activations:
 *   y[m, n] = sum_g s[n,g] * (sum_{b in g} d[m,b] * sum_{i in b} c[n,i] * q[m,i]  -  z[n,g] * T[m,g]),
 *   T[m, g] = sum_{b in g} d[m,b] * sum_{i in b} q[m,i].
 * (A = 128 as onnxruntime's MatMulNBits accuracy_level 4 uses the weight block, ggml's Q8_K 256 values.) Every
 * instruction set computes the same integers; results differ only in float summation order. numpy:
 * rwkvq_onnx/opspec/sq_matmul.py (quantize_activations, fast_reference, fast_error_bound).
 */
#ifndef RWKVQ_SQ_H
#define RWKVQ_SQ_H
#include <stddef.h>
#include <stdint.h>

/* at most this many activation rows take the GEMV (codes unpacked on the fly); more take the panel GEMM */
#define RWKVQ_SQ_GEMV_MAX_ROWS 4

/* N, K in [1, 2^31), bits in {2, 3, 4}, group_size a positive multiple of 32 below 2^31, K a multiple of 32, and
 * every size the kernels derive (row bytes, group counts) within int range. NULL, or a one-line reason in msg. */
const char* rwkvq_sq_check_layout(int64_t N, int64_t K, int64_t bits, int64_t group_size, char* msg, size_t cap);
/* codes [N, K/32*4*bits], scales [N, G], zeros [N, ceil(G*bits/8)] (ranks and dimensions) for a checked layout. */
const char* rwkvq_sq_check_payload(int64_t N, int64_t K, int64_t bits, int64_t group_size, int codes_rank,
                                   const int64_t* codes_dims, int scales_rank, const int64_t* scales_dims,
                                   int zeros_rank, const int64_t* zeros_dims, char* msg, size_t cap);

/* Bytes of scratch the fast numerics need for M activation rows (the int8 activations, block scales and group
 * sums); -1 when the sizes are out of range. */
int64_t rwkvq_sq_acts_bytes(int M, int K, int group_size);
/* Quantize x [M, K] into acts (rwkvq_sq_acts_bytes of them, any alignment); 0 or -2 for bad sizes. */
int rwkvq_sq_quantize(const float* x, int M, int K, int group_size, void* acts);

/* The pieces of one call, for a caller's own thread pool: how many pieces (-1 for sizes out of range) and piece
 * `chunk` of them, computing a disjoint range of y's columns. acts: the rwkvq_sq_quantize output for fast numerics
 * (ignored, may be NULL, for exact). Returns 0, -1 when scratch memory cannot be allocated, -2 for sizes out of
 * range, a chunk outside [0, chunks), unknown kernels, or an isa this CPU does not run (never executed). */
int rwkvq_sq_chunks(int M, int N, int K);
int rwkvq_sq_chunk(const float* x, const void* acts, int M, const uint8_t* codes, const uint16_t* scales,
                   const uint8_t* zeros, float* y, int N, int K, int bits, int group_size, int kernels, int isa,
                   int chunk, int chunks);
/* The whole call (OpenMP over the pieces). gemv / gemm force the path (for tests); matmul picks by M. */
int rwkvq_sq_matmul(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                    float* y, int N, int K, int bits, int group_size, int kernels, int isa);
int rwkvq_sq_gemv(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* y,
                  int N, int K, int bits, int group_size, int kernels, int isa);
int rwkvq_sq_gemm(const float* x, int M, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* y,
                  int N, int K, int bits, int group_size, int kernels, int isa);
/* W [N, K] float from the payload; 0 or -2. */
int rwkvq_sq_decode(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, float* w, int N, int K,
                    int bits, int group_size);

#endif
