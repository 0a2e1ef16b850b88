/* onnxruntime custom-op library for the `rwkvq` domain: VQMatMul and VQElementwise as native kernels.
 *
 * Loaded with SessionOptions.register_custom_ops_library(<this .so>), which calls RegisterCustomOps below.
 * Each op call then costs a C function call instead of a round trip through Python (0.3 ms per op, which
 * dominated quantized decode). Semantics and the numpy reference: rwkvq_onnx/ops.py.
 *
 * onnxruntime's C headers do not ship with its Python wheel, so the few pieces of its stable C ABI used
 * here are declared by hand:
 *   - OrtApiBase {GetApi(version), GetVersionString()};
 *   - OrtApi, a table of function pointers that only ever grows at the end: the entries used are named by
 *     their fixed position (all present since API version 1);
 *   - OrtCustomOp, a struct of callbacks whose `version` field tells onnxruntime which of them it may read;
 *     version 16 gives the status-returning CreateKernelV2 / KernelComputeV2;
 *   - KernelContext_ParallelFor (API 17, slot 274) when onnxruntime offers it: VQMatMul then runs its pieces
 *     on the session's intra-op threads, so a session has one thread pool instead of onnxruntime's plus OpenMP's
 *     (before API 17 it falls back to OpenMP).
 * tests/test_cpu_kernels_report.py checks these against the installed onnxruntime (version string, a status
 * round trip, and both ops against the numpy reference through real sessions).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkvq_cpu.h"

/* ---- the hand-declared slice of the onnxruntime C ABI ---------------------------------------------- */

typedef struct OrtStatus OrtStatus;
typedef void (*OrtFn)(void);
typedef struct {
    const OrtFn* (*GetApi)(uint32_t version);
    const char* (*GetVersionString)(void);
} OrtApiBase;

enum OrtApiIndex {
    ORT_CreateStatus = 0,
    ORT_GetErrorMessage = 2,
    ORT_CreateCustomOpDomain = 26,
    ORT_CustomOpDomain_Add = 27,
    ORT_AddCustomOpDomain = 28,
    ORT_GetTensorMutableData = 51,
    ORT_GetTensorElementType = 60,
    ORT_GetDimensionsCount = 61,
    ORT_GetDimensions = 62,
    ORT_GetTensorTypeAndShape = 65,
    ORT_KernelInfoGetAttribute_int64 = 86,
    ORT_KernelInfoGetAttribute_string = 87,
    ORT_KernelContext_GetInputCount = 88,
    ORT_KernelContext_GetInput = 90,
    ORT_KernelContext_GetOutput = 91,
    ORT_ReleaseStatus = 93,
    ORT_ReleaseTensorTypeAndShapeInfo = 99,
    ORT_KernelContext_ParallelFor = 274, /* API version 17 */
};

enum { ORT_API_VERSION_USED = 16, ORT_API_VERSION_PARALLEL_FOR = 17 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3 };
enum { CHARACTERISTIC_REQUIRED = 0 };
enum { MEM_TYPE_DEFAULT = 0 };
enum { MAX_RANK = 8 };

typedef struct OrtCustomOpABI {
    uint32_t version;
    void* (*CreateKernel)(const struct OrtCustomOpABI*, const OrtFn*, const void*);
    const char* (*GetName)(const struct OrtCustomOpABI*);
    const char* (*GetExecutionProviderType)(const struct OrtCustomOpABI*);
    int (*GetInputType)(const struct OrtCustomOpABI*, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOpABI*);
    int (*GetOutputType)(const struct OrtCustomOpABI*, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOpABI*);
    void (*KernelCompute)(void*, void*);
    void (*KernelDestroy)(void*);
    int (*GetInputCharacteristic)(const struct OrtCustomOpABI*, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOpABI*, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOpABI*, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOpABI*);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOpABI*);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOpABI*);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOpABI*);
    OrtStatus* (*CreateKernelV2)(const struct OrtCustomOpABI*, const OrtFn*, const void*, void**);
    OrtStatus* (*KernelComputeV2)(void*, void*);
    /* later members (shape inference, versions, in-place and alias maps) are not read at version 16 */
    void* unused[7];
} OrtCustomOpABI;

/* An op: the ABI struct first (onnxruntime holds a pointer to it), then what its callbacks need. */
typedef struct {
    OrtCustomOpABI abi;
    const char* name;
    int n_inputs;
    int input_types[4];
} RwkvqOp;

typedef OrtStatus* (*CreateStatusFn)(int, const char*);
typedef const char* (*GetErrorMessageFn)(const OrtStatus*);
typedef void (*ReleaseStatusFn)(OrtStatus*);
typedef OrtStatus* (*CreateCustomOpDomainFn)(const char*, void**);
typedef OrtStatus* (*CustomOpDomainAddFn)(void*, const void*);
typedef OrtStatus* (*AddCustomOpDomainFn)(void*, void*);
typedef OrtStatus* (*GetTensorMutableDataFn)(const void*, void**);
typedef OrtStatus* (*GetTensorTypeAndShapeFn)(const void*, void**);
typedef OrtStatus* (*GetTensorElementTypeFn)(const void*, int*);
typedef OrtStatus* (*GetDimensionsCountFn)(const void*, size_t*);
typedef OrtStatus* (*GetDimensionsFn)(const void*, int64_t*, size_t);
typedef void (*ReleaseTensorTypeAndShapeInfoFn)(void*);
typedef OrtStatus* (*KernelInfoGetAttributeInt64Fn)(const void*, const char*, int64_t*);
typedef OrtStatus* (*KernelInfoGetAttributeStringFn)(const void*, const char*, char*, size_t*);
typedef OrtStatus* (*KernelContextGetInputCountFn)(const void*, size_t*);
typedef OrtStatus* (*KernelContextGetInputFn)(const void*, size_t, const void**);
typedef OrtStatus* (*KernelContextGetOutputFn)(void*, size_t, const int64_t*, size_t, void**);
typedef OrtStatus* (*KernelContextParallelForFn)(const void*, void (*)(void*, size_t), size_t, size_t, void*);

/* set by RegisterCustomOps when onnxruntime offers API 17 */
static KernelContextParallelForFn parallel_for_api;

#define API(api, index, type) ((type)(api)[index])
#define TRY(expr)                          \
    do {                                   \
        OrtStatus* status_ = (expr);       \
        if (status_) return status_;       \
    } while (0)

static OrtStatus* fail(const OrtFn* api, int code, const char* fmt, const char* op, long long a, long long b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, op, a, b);
    return API(api, ORT_CreateStatus, CreateStatusFn)(code, msg);
}

/* A tensor input: data pointer, element type, shape. */
typedef struct {
    void* data;
    int type;
    size_t rank;
    int64_t dims[MAX_RANK];
    int64_t numel;
} Tensor;

static OrtStatus* read_tensor(const OrtFn* api, const void* value, Tensor* t) {
    void* info = NULL;
    TRY(API(api, ORT_GetTensorTypeAndShape, GetTensorTypeAndShapeFn)(value, &info));
    OrtStatus* st = API(api, ORT_GetTensorElementType, GetTensorElementTypeFn)(info, &t->type);
    if (!st) st = API(api, ORT_GetDimensionsCount, GetDimensionsCountFn)(info, &t->rank);
    if (!st && t->rank > MAX_RANK) st = API(api, ORT_CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, "rwkvq: rank > 8");
    if (!st) st = API(api, ORT_GetDimensions, GetDimensionsFn)(info, t->dims, t->rank);
    API(api, ORT_ReleaseTensorTypeAndShapeInfo, ReleaseTensorTypeAndShapeInfoFn)(info);
    if (st) return st;
    t->numel = 1;
    for (size_t i = 0; i < t->rank; ++i) t->numel *= t->dims[i];
    return API(api, ORT_GetTensorMutableData, GetTensorMutableDataFn)(value, &t->data);
}

static OrtStatus* input(const OrtFn* api, void* ctx, size_t i, Tensor* t) {
    const void* value = NULL;
    TRY(API(api, ORT_KernelContext_GetInput, KernelContextGetInputFn)(ctx, i, &value));
    return read_tensor(api, value, t);
}

static OrtStatus* output(const OrtFn* api, void* ctx, const int64_t* dims, size_t rank, float** out) {
    void* value = NULL;
    TRY(API(api, ORT_KernelContext_GetOutput, KernelContextGetOutputFn)(ctx, 0, dims, rank, &value));
    return API(api, ORT_GetTensorMutableData, GetTensorMutableDataFn)(value, (void**)out);
}

static OrtStatus* attr_int(const OrtFn* api, const void* info, const char* name, int64_t* out) {
    return API(api, ORT_KernelInfoGetAttribute_int64, KernelInfoGetAttributeInt64Fn)(info, name, out);
}

/* ---- VQMatMul ---------------------------------------------------------------------------------------- */

typedef struct {
    const OrtFn* api;
    KernelContextParallelForFn parallel_for; /* onnxruntime's intra-op pool; NULL before API 17 */
    int N, K, dim, group_rows, group_cols, bits;
} VQMatMulKernel;

/* One call of VQMatMul split into pieces for onnxruntime's intra-op pool: GEMV pieces for decode, GEMM panels
 * for prefill (the same split the OpenMP entry points use). */
typedef struct {
    const VQMatMulKernel* k;
    rwkvq_chunk_fn run;
    const float* x;
    int M, row_bytes, chunks;
    const uint8_t* codes;
    const int8_t* books;
    const float* scales;
    float* y;
    int failed;
} VQMatMulJob;

static void vq_matmul_piece(void* data, size_t i) {
    VQMatMulJob* j = (VQMatMulJob*)data;
    const VQMatMulKernel* k = j->k;
    if (j->run(j->x, j->M, j->codes, j->row_bytes, j->books, j->scales, j->y, k->N, k->K, k->dim, k->group_rows,
               k->group_cols, k->bits, (int)i, j->chunks))
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

static OrtStatus* vq_matmul_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    (void)op;
    int64_t v[6];
    static const char* names[6] = {"N", "K", "dim", "group_rows", "group_cols", "index_bits"};
    for (int i = 0; i < 6; ++i) TRY(attr_int(api, info, names[i], &v[i]));
    if (v[0] < 1 || v[1] < 1 || v[2] < 1 || v[1] % v[2] || v[3] < 1 || v[4] < v[2] || v[5] < 1 || v[5] > 12)
        return fail(api, ORT_INVALID_ARGUMENT, "%s: bad attributes (N=%lld, K=%lld, ...)", "rwkvq.VQMatMul", v[0], v[1]);
    VQMatMulKernel* k = (VQMatMulKernel*)calloc(1, sizeof *k);
    if (!k) return API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq.VQMatMul: out of memory");
    *k = (VQMatMulKernel){api, parallel_for_api, (int)v[0], (int)v[1], (int)v[2], (int)v[3], (int)v[4], (int)v[5]};
    *kernel = k;
    return NULL;
}

static OrtStatus* vq_matmul_compute(void* kernel, void* ctx) {
    const VQMatMulKernel* k = (const VQMatMulKernel*)kernel;
    const OrtFn* api = k->api;
    Tensor x, codes, books, scales;
    TRY(input(api, ctx, 0, &x));
    TRY(input(api, ctx, 1, &codes));
    TRY(input(api, ctx, 2, &books));
    TRY(input(api, ctx, 3, &scales));
    const int n_codes = k->K / k->dim;
    const int row_bytes = (int)(((long long)n_codes * k->bits + 7) / 8);
    const long long R = (k->N + k->group_rows - 1) / k->group_rows, C = (k->K + k->group_cols - 1) / k->group_cols;
    if (x.rank < 1 || x.dims[x.rank - 1] != k->K)
        return fail(api, ORT_INVALID_ARGUMENT, "%s: input's last dimension is %lld, expected K=%lld", "rwkvq.VQMatMul",
                    x.rank ? x.dims[x.rank - 1] : 0, k->K);
    if (codes.rank != 2 || codes.dims[0] != k->N || codes.dims[1] != row_bytes)
        return fail(api, ORT_INVALID_ARGUMENT, "%s: codes must be [N, %lld] (N=%lld)", "rwkvq.VQMatMul", row_bytes, k->N);
    if (books.numel != R * C * (1LL << k->bits) * k->dim || scales.numel != R * C)
        return fail(api, ORT_INVALID_ARGUMENT, "%s: codebooks/scales do not match %lld x %lld codebook blocks",
                    "rwkvq.VQMatMul", R, C);
    int64_t dims[MAX_RANK];
    memcpy(dims, x.dims, sizeof(int64_t) * x.rank);
    dims[x.rank - 1] = k->N;
    float* y = NULL;
    TRY(output(api, ctx, dims, x.rank, &y));
    const long long M = x.numel / k->K;
    if (M == 0) return NULL;
    if (k->parallel_for) {
        /* the pieces run on onnxruntime's intra-op threads, the same ones its own kernels use: one pool */
        VQMatMulJob job = {k, NULL, (const float*)x.data, (int)M, row_bytes, 0, (const uint8_t*)codes.data,
                           (const int8_t*)books.data, (const float*)scales.data, y, 0};
        job.run = rwkvq_vq_matmul_plan(job.M, k->N, k->K, k->group_rows, &job.chunks);
        if (job.chunks == 1)
            vq_matmul_piece(&job, 0);
        else
            TRY(k->parallel_for(ctx, vq_matmul_piece, (size_t)job.chunks, 0, &job));
        return job.failed ? API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq.VQMatMul: out of memory") : NULL;
    }
    /* onnxruntime before API 17: the OpenMP entry point */
    int rc = rwkvq_vq_matmul((const float*)x.data, (int)M, (const uint8_t*)codes.data, row_bytes,
                             (const int8_t*)books.data, (const float*)scales.data, y, k->N, k->K, k->dim,
                             k->group_rows, k->group_cols, k->bits);
    return rc ? API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq.VQMatMul: out of memory") : NULL;
}

/* ---- VQElementwise ----------------------------------------------------------------------------------- */

typedef struct {
    const OrtFn* api;
    int bits;
    int rank;
    int64_t shape[MAX_RANK];
    int64_t n;
} VQElementwiseKernel;

static OrtStatus* vq_elementwise_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    (void)op;
    int64_t bits;
    TRY(attr_int(api, info, "index_bits", &bits));
    char text[256];
    size_t size = sizeof text;
    TRY(API(api, ORT_KernelInfoGetAttribute_string, KernelInfoGetAttributeStringFn)(info, "shape", text, &size));
    VQElementwiseKernel* k = (VQElementwiseKernel*)calloc(1, sizeof *k);
    if (!k) return API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq.VQElementwise: out of memory");
    k->api = api;
    k->bits = (int)bits;
    k->n = 1;
    for (char* p = text; *p && k->rank < MAX_RANK;) {
        char* end;
        long long d = strtoll(p, &end, 10);
        if (end == p || d < 1) break;
        k->shape[k->rank++] = d;
        k->n *= d;
        p = *end == ',' ? end + 1 : end;
    }
    if (k->rank == 0 || bits < 1 || bits > 16) {
        free(k);
        return fail(api, ORT_INVALID_ARGUMENT, "%s: bad attributes (index_bits=%lld)", "rwkvq.VQElementwise", bits, 0);
    }
    *kernel = k;
    return NULL;
}

static OrtStatus* vq_elementwise_compute(void* kernel, void* ctx) {
    VQElementwiseKernel* k = (VQElementwiseKernel*)kernel;
    const OrtFn* api = k->api;
    Tensor x, codes, book;
    TRY(input(api, ctx, 0, &x));
    TRY(input(api, ctx, 1, &codes));
    TRY(input(api, ctx, 2, &book));
    if (codes.numel * 8 < k->n * k->bits || book.numel < (1LL << k->bits))
        return fail(api, ORT_INVALID_ARGUMENT, "%s: codes/codebook too short for %lld values", "rwkvq.VQElementwise",
                    k->n, 0);
    /* y = x * v with numpy broadcasting, for v whose non-1 dimensions are x's trailing dimensions */
    int lead = 0;
    while (lead < k->rank && k->shape[lead] == 1) ++lead;
    const int vr = k->rank - lead;
    if (vr > (int)x.rank)
        return fail(api, ORT_INVALID_ARGUMENT, "%s: cannot broadcast the vector over an input of rank %lld",
                    "rwkvq.VQElementwise", (long long)x.rank, 0);
    for (int i = 0; i < vr; ++i)
        if (k->shape[lead + i] != x.dims[x.rank - vr + i])
            return fail(api, ORT_INVALID_ARGUMENT, "%s: vector dimension %lld does not match the input's %lld",
                        "rwkvq.VQElementwise", k->shape[lead + i], x.dims[x.rank - vr + i]);
    const int out_rank = k->rank > (int)x.rank ? k->rank : (int)x.rank;
    int64_t dims[MAX_RANK];
    for (int i = 0; i < out_rank; ++i) {
        const int xi = i - (out_rank - (int)x.rank);
        dims[i] = xi >= 0 ? x.dims[xi] : 1;
    }
    float* y = NULL;
    TRY(output(api, ctx, dims, (size_t)out_rank, &y));
    /* decoded on every call (a few microseconds for a model-width vector): nothing shared between concurrent
     * runs of the kernel, and correct even when the codes are not constant */
    float* v = (float*)malloc(sizeof(float) * (size_t)k->n);
    if (!v) return API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq.VQElementwise: out of memory");
    rwkvq_decode_vector((const uint8_t*)codes.data, (int)codes.numel, k->bits, (const float*)book.data, v, (int)k->n);
    rwkvq_scale_rows((const float*)x.data, v, y, x.numel, k->n);
    free(v);
    return NULL;
}

/* ---- registration ------------------------------------------------------------------------------------ */

static const char* op_name(const OrtCustomOpABI* op) { return ((const RwkvqOp*)op)->name; }
static const char* op_provider(const OrtCustomOpABI* op) { (void)op; return NULL; /* CPU */ }
static int op_input_type(const OrtCustomOpABI* op, size_t i) { return ((const RwkvqOp*)op)->input_types[i]; }
static size_t op_input_count(const OrtCustomOpABI* op) { return (size_t)((const RwkvqOp*)op)->n_inputs; }
static int op_output_type(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t op_output_count(const OrtCustomOpABI* op) { (void)op; return 1; }
static int op_required(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return CHARACTERISTIC_REQUIRED; }
static int op_memory(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return MEM_TYPE_DEFAULT; }

#define RWKVQ_OP(NAME, CREATE, COMPUTE, DESTROY, N_IN, ...)                                          \
    {{ORT_API_VERSION_USED, NULL, op_name, op_provider, op_input_type, op_input_count, op_output_type, \
      op_output_count, NULL, DESTROY, op_required, op_required, op_memory, NULL, NULL, NULL, NULL,     \
      CREATE, COMPUTE, {NULL}},                                                                        \
     NAME, N_IN, {__VA_ARGS__}}

static RwkvqOp vq_matmul_op = RWKVQ_OP("VQMatMul", vq_matmul_create, vq_matmul_compute, free, 4, T_FLOAT, T_UINT8,
                                       T_INT8, T_FLOAT);
static RwkvqOp vq_elementwise_op = RWKVQ_OP("VQElementwise", vq_elementwise_create, vq_elementwise_compute, free, 3,
                                            T_FLOAT, T_UINT8, T_FLOAT);

static char registered_version[64];
static int abi_checked;

/* A status round trip through the declared table: 1 when CreateStatus / GetErrorMessage / ReleaseStatus sit
 * where this file says they do. */
static int abi_round_trip(const OrtFn* api) {
    OrtStatus* st = API(api, ORT_CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, "rwkvq abi check");
    const int ok = st && strcmp(API(api, ORT_GetErrorMessage, GetErrorMessageFn)(st), "rwkvq abi check") == 0;
    if (st) API(api, ORT_ReleaseStatus, ReleaseStatusFn)(st);
    return ok;
}

/* The entry point register_custom_ops_library looks up. */
OrtStatus* RegisterCustomOps(void* session_options, const OrtApiBase* base) {
    const OrtFn* api = base->GetApi(ORT_API_VERSION_USED);
    if (!api) return NULL; /* cannot even report: onnxruntime older than API 16 */
    snprintf(registered_version, sizeof registered_version, "%s", base->GetVersionString());
    abi_checked = abi_round_trip(api) ? 1 : -1;
    const OrtFn* api17 = base->GetApi(ORT_API_VERSION_PARALLEL_FOR);
    parallel_for_api = api17 ? API(api17, ORT_KernelContext_ParallelFor, KernelContextParallelForFn) : NULL;
    void* domain = NULL;
    TRY(API(api, ORT_CreateCustomOpDomain, CreateCustomOpDomainFn)("rwkvq", &domain));
    TRY(API(api, ORT_CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &vq_matmul_op.abi));
    TRY(API(api, ORT_CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &vq_elementwise_op.abi));
    /* the domain lives as long as the process: sessions made from these options may outlive the options */
    return API(api, ORT_AddCustomOpDomain, AddCustomOpDomainFn)(session_options, domain);
}

/* For the tests: the onnxruntime version that registered the ops and whether the ABI round trip held
 * (1 yes, -1 no, 0 not registered yet). */
const char* rwkvq_ort_version(void) { return registered_version; }
int rwkvq_ort_abi_ok(void) { return abi_checked; }
/* 1 when the ops run their pieces on onnxruntime's intra-op pool (KernelContext_ParallelFor was found) */
int rwkvq_ort_thread_pool(void) { return parallel_for_api != NULL; }
