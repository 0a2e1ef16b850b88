// CUDA kernels for the rwkvq ops (see rwkvq_onnx/ops.py for the exact semantics and the numpy reference).
//
// Decode is memory-bound: a token reads every weight once, so what matters is bytes read. The VQ GEMV reads
// only the bit-packed codes (index_bits per `dim` weights) plus the small int8 codebooks (which stay in L1/L2),
// instead of 16 bits per weight for a dense fp16 GEMV.
//
// Layouts (row-major):
//   x        half   [B, K]                activations (decode: B = 1..8)
//   codes    uint8  [N, row_bytes]        each row a little-endian bit stream of K/dim indices
//   books    int8   [R, C, E, dim]        codebook of row block r = n / group_rows, column group c = col / group_cols
//   scales   float  [R, C]                one scale per codebook
//   y        half   [B, N]
//
// All kernels are extern "C" so that CuPy/NVRTC, PTX for TensorRT AOT plugins and nvcc builds share names.

#include <cuda_fp16.h>

// NVRTC (CuPy, TensorRT AOT plugins) has no <stdint.h>: name the fixed-width types here.
typedef unsigned char rq_u8;
typedef signed char rq_i8;
typedef unsigned int rq_u32;

#define RWKVQ_MAX_BATCH 8

__device__ __forceinline__ rq_u32 rwkvq_read_code(const rq_u8* __restrict__ row, int row_bytes, int index,
                                                    int bits) {
    // index_bits <= 16: a code spans at most 3 bytes.
    const int bit = index * bits;
    const int byte = bit >> 3;
    rq_u32 window = row[byte];
    if (byte + 1 < row_bytes) window |= (rq_u32)row[byte + 1] << 8;
    if (byte + 2 < row_bytes) window |= (rq_u32)row[byte + 2] << 16;
    return (window >> (bit & 7)) & ((1u << bits) - 1u);
}

// Generic path (any layout): one warp per output row; lanes stride over the row's codes, then a warp reduction.
extern "C" __global__ void rwkvq_vq_gemv(const __half* __restrict__ x, const rq_u8* __restrict__ codes,
                                         const rq_i8* __restrict__ books, const float* __restrict__ scales,
                                         __half* __restrict__ y, int B, int N, int K, int dim, int group_rows,
                                         int group_cols, int bits, int row_bytes) {
    const int warps_per_block = blockDim.x >> 5;
    const int n = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (n >= N) return;
    const int n_codes = K / dim;
    const int C = (K + group_cols - 1) / group_cols;
    const int E = 1 << bits;
    const int rb = n / group_rows;
    const rq_u8* row = codes + (size_t)n * row_bytes;
    float acc[RWKVQ_MAX_BATCH];
#pragma unroll
    for (int b = 0; b < RWKVQ_MAX_BATCH; ++b) acc[b] = 0.f;
    for (int j = lane; j < n_codes; j += 32) {
        const rq_u32 code = rwkvq_read_code(row, row_bytes, j, bits);
        const int col = j * dim;
        const int cb = rb * C + col / group_cols;
        const float s = __ldg(scales + cb);
        const rq_i8* entry = books + ((size_t)cb * E + code) * dim;
        for (int t = 0; t < dim; ++t) {
            const float w = s * (float)__ldg(entry + t);
#pragma unroll
            for (int b = 0; b < RWKVQ_MAX_BATCH; ++b)
                if (b < B) acc[b] += w * __half2float(__ldg(x + (size_t)b * K + col + t));
        }
    }
#pragma unroll
    for (int b = 0; b < RWKVQ_MAX_BATCH; ++b) {
        float v = acc[b];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0 && b < B) y[(size_t)b * N + n] = __float2half(v);
    }
}

// Fast path: one CTA per (row block, slice of rows). The CTA decodes its row block's codebooks (scale folded
// in) into shared memory once. Each warp streams one row: per step it stages the packed words of 1024
// consecutive codes (32 * index_bits words, coalesced) in shared memory, then lane l handles codes l, l+32, ...
// so the activations it reads are contiguous across the warp (coalesced half2 loads for dim 2).
// Needs K % (1024*dim) == 0 or tail handling (below), group_cols % dim == 0, index_bits <= 16.

template <int DIM, int MAXB, int RPW>
__device__ __forceinline__ void rwkvq_gemv_rows(const __half* __restrict__ x, const rq_u32* const* rows,
                                                rq_u32* __restrict__ swords, const float* __restrict__ sbook,
                                                float (*acc)[MAXB], int B, int K, int group_cols, int bits,
                                                int lane) {
    const int E = 1 << bits;
    const rq_u32 mask = (1u << bits) - 1u;
    const int n_codes = K / DIM;
    const int stride = 32 * bits + 1;  // words staged per row (+1: the straddling read of the last code)
    for (int j0 = 0; j0 < n_codes; j0 += 1024) {
        const int count = min(1024, n_codes - j0);
        const int words = (count * bits + 31) >> 5;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const rq_u32* src = rows[r] + ((j0 * bits) >> 5);  // j0 * bits is a multiple of 32
            for (int w = lane; w < words; w += 32) swords[r * stride + w] = __ldg(src + w);
        }
        __syncwarp();
        // column group of this lane's code, advanced incrementally (no division in the loop)
        int col = (j0 + lane) * DIM;
        int rem = col % group_cols;
        const float* book = sbook + (col / group_cols) * E * DIM;
#pragma unroll 2
        for (int i = lane; i < count; i += 32) {
            const int bit = i * bits;
            const int wi = bit >> 5, sh = bit & 31;
            const bool straddle = sh + bits > 32;
            float xv[MAXB][DIM];
#pragma unroll
            for (int b = 0; b < MAXB; ++b) {
                if (b >= B) break;
                if (DIM == 2) {
                    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(x + (size_t)b * K + col));
                    xv[b][0] = v.x;
                    xv[b][DIM - 1] = v.y;
                } else {
#pragma unroll
                    for (int t = 0; t < DIM; ++t) xv[b][t] = __half2float(__ldg(x + (size_t)b * K + col + t));
                }
            }
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                const rq_u32* sw = swords + r * stride;
                rq_u32 code = sw[wi] >> sh;
                if (straddle) code |= sw[wi + 1] << (32 - sh);
                code &= mask;
                const float* e = book + code * DIM;
                float wv[DIM];
                if (DIM == 2) {
                    const float2 v = *reinterpret_cast<const float2*>(e);
                    wv[0] = v.x;
                    wv[DIM - 1] = v.y;
                } else {
#pragma unroll
                    for (int t = 0; t < DIM; ++t) wv[t] = e[t];
                }
#pragma unroll
                for (int b = 0; b < MAXB; ++b) {
                    if (b >= B) break;
#pragma unroll
                    for (int t = 0; t < DIM; ++t) acc[r][b] += wv[t] * xv[b][t];
                }
            }
            col += 32 * DIM;
            rem += 32 * DIM;
            while (rem >= group_cols) {
                rem -= group_cols;
                book += E * DIM;
            }
        }
        __syncwarp();
    }
}

template <int MAXB, int RPW>
__device__ __forceinline__ void rwkvq_vq_gemv_smem_impl(const __half* __restrict__ x, const rq_u8* __restrict__ codes,
                                                        const rq_i8* __restrict__ books,
                                                        const float* __restrict__ scales, __half* __restrict__ y,
                                                        int B, int N, int K, int dim, int group_rows, int group_cols,
                                                        int bits, int row_bytes) {
    extern __shared__ float smem[];
    const int C = K / group_cols;
    const int E = 1 << bits;
    const int rb = blockIdx.x;
    const int per_book = E * dim;
    float* sbook = smem;
    const int shift = __ffs(per_book) - 1;  // per_book = 2^bits * dim is a power of two
    for (int i = threadIdx.x; i < C * per_book; i += blockDim.x)
        sbook[i] = scales[rb * C + (i >> shift)] * (float)books[(size_t)rb * C * per_book + i];
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int first = (blockIdx.y * warps + warp) * RPW;  // row within the row block
    if (first >= group_rows || rb * group_rows + first >= N) return;
    const rq_u32* rows[RPW];
    bool valid[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int n = rb * group_rows + first + r;
        valid[r] = first + r < group_rows && n < N;
        rows[r] = reinterpret_cast<const rq_u32*>(codes + (size_t)(valid[r] ? n : rb * group_rows + first) * row_bytes);
    }
    float acc[RPW][MAXB];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int b = 0; b < MAXB; ++b) acc[r][b] = 0.f;
    rq_u32* swords = reinterpret_cast<rq_u32*>(smem + C * per_book) + warp * RPW * (32 * bits + 1);
    if (dim == 1) rwkvq_gemv_rows<1, MAXB, RPW>(x, rows, swords, sbook, acc, B, K, group_cols, bits, lane);
    else if (dim == 2) rwkvq_gemv_rows<2, MAXB, RPW>(x, rows, swords, sbook, acc, B, K, group_cols, bits, lane);
    else rwkvq_gemv_rows<4, MAXB, RPW>(x, rows, swords, sbook, acc, B, K, group_cols, bits, lane);
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            float v = acc[r][b];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0 && b < B && valid[r]) y[(size_t)b * N + rb * group_rows + first + r] = __float2half(v);
        }
}

// Batch 1 (decode: 2 rows per warp, sharing activation loads) and batch 2..8 (1 row per warp).
// Launch: grid (ceil(N / group_rows), ceil(group_rows / (warps * rows_per_warp))), 32 * warps threads (warps <= 8),
// 4 * (C*E*dim + warps * rows_per_warp * (32*index_bits + 1)) bytes of dynamic shared memory. Needs
// row_bytes % 4 == 0 (rows 4-byte aligned) and K % group_cols == 0.
#define RWKVQ_GEMV_ARGS const __half* __restrict__ x, const rq_u8* __restrict__ codes, \
    const rq_i8* __restrict__ books, const float* __restrict__ scales, __half* __restrict__ y, int B, int N, int K, \
    int dim, int group_rows, int group_cols, int bits, int row_bytes
#define RWKVQ_DECODE_ROWS_PER_WARP 2
extern "C" __global__ void __launch_bounds__(256) rwkvq_vq_gemv_smem(RWKVQ_GEMV_ARGS) {
    rwkvq_vq_gemv_smem_impl<1, RWKVQ_DECODE_ROWS_PER_WARP>(x, codes, books, scales, y, 1, N, K, dim, group_rows,
                                                           group_cols, bits, row_bytes);
}
extern "C" __global__ void __launch_bounds__(256) rwkvq_vq_gemv_smem_batch(RWKVQ_GEMV_ARGS) {
    rwkvq_vq_gemv_smem_impl<RWKVQ_MAX_BATCH, 1>(x, codes, books, scales, y, B, N, K, dim, group_rows, group_cols,
                                                bits, row_bytes);
}

// Dense fp16 W [N, K] from the payload: the prefill (GEMM) path decodes once, then runs a dense GEMM.
extern "C" __global__ void rwkvq_vq_decode(const rq_u8* __restrict__ codes, const rq_i8* __restrict__ books,
                                           const float* __restrict__ scales, __half* __restrict__ w, int N, int K,
                                           int dim, int group_rows, int group_cols, int bits, int row_bytes) {
    const int n_codes = K / dim;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * n_codes) return;
    const int n = (int)(idx / n_codes);
    const int j = (int)(idx % n_codes);
    const int C = (K + group_cols - 1) / group_cols;
    const int col = j * dim;
    const int cb = (n / group_rows) * C + col / group_cols;
    const rq_u32 code = rwkvq_read_code(codes + (size_t)n * row_bytes, row_bytes, j, bits);
    const float s = scales[cb];
    const rq_i8* entry = books + ((size_t)cb * (1 << bits) + code) * dim;
    for (int t = 0; t < dim; ++t) w[(size_t)n * K + col + t] = __float2half(s * (float)entry[t]);
}

// y = x * v where v[i] = codebook[code i]; x has `total` elements, v has `n` (broadcast over leading dims).
extern "C" __global__ void rwkvq_vq_elementwise(const __half* __restrict__ x, const rq_u8* __restrict__ codes,
                                                const float* __restrict__ codebook, __half* __restrict__ y,
                                                long long total, int n, int bits, int code_bytes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const rq_u32 code = rwkvq_read_code(codes, code_bytes, (int)(i % n), bits);
    y[i] = __float2half(__half2float(x[i]) * codebook[code]);
}

// float32 variants of the element-wise op, for graphs whose activations stay fp32.
extern "C" __global__ void rwkvq_vq_elementwise_f32(const float* __restrict__ x, const rq_u8* __restrict__ codes,
                                                    const float* __restrict__ codebook, float* __restrict__ y,
                                                    long long total, int n, int bits, int code_bytes) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const rq_u32 code = rwkvq_read_code(codes, code_bytes, (int)(i % n), bits);
    y[i] = x[i] * codebook[code];
}

// TensorRT AOT plugin entry points: TensorRT passes (inputs..., extra scalar args..., outputs...). Codes and
// codebooks arrive as INT32 tensors holding the ONNX graph's bytes in packed little-endian words (build-engine
// repacks them: the ONNX parser would widen UINT8 weights to one INT32 per byte); read here as bytes.
// Launch geometry: trt_plugins.gemv_launch. Engines whose profile allows one activation row run the decode
// instance <1, RWKVQ_DECODE_ROWS_PER_WARP> (the one plugins/harness.py benchmarks); 2..8 rows run <8, 1>.
// build-engine refuses profiles with more than RWKVQ_MAX_BATCH rows: rows past it would not be written.
extern "C" __global__ void __launch_bounds__(256) rwkvq_trt_vq_gemv_decode(
    const __half* __restrict__ x, const rq_u8* __restrict__ codes, const rq_i8* __restrict__ books,
    const float* __restrict__ scales, int B, int N, int K, int dim, int group_rows, int group_cols, int bits,
    int row_bytes, __half* __restrict__ y) {
    rwkvq_vq_gemv_smem_impl<1, RWKVQ_DECODE_ROWS_PER_WARP>(x, codes, books, scales, y, B, N, K, dim, group_rows,
                                                           group_cols, bits, row_bytes);
}

extern "C" __global__ void __launch_bounds__(256) rwkvq_trt_vq_gemv(
    const __half* __restrict__ x, const rq_u8* __restrict__ codes, const rq_i8* __restrict__ books,
    const float* __restrict__ scales, int B, int N, int K, int dim, int group_rows, int group_cols, int bits,
    int row_bytes, __half* __restrict__ y) {
    rwkvq_vq_gemv_smem_impl<RWKVQ_MAX_BATCH, 1>(x, codes, books, scales, y, B, N, K, dim, group_rows, group_cols,
                                                bits, row_bytes);
}

extern "C" __global__ void rwkvq_trt_vq_elementwise(const __half* __restrict__ x, const rq_u8* __restrict__ codes,
                                                    const float* __restrict__ codebook, int total, int n, int bits,
                                                    int code_bytes, __half* __restrict__ y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const rq_u32 code = rwkvq_read_code(codes, code_bytes, i % n, bits);
    y[i] = __float2half(__half2float(x[i]) * codebook[code]);
}
