/* onnxruntime custom-op library for the `rwkvq` domain: VQMatMul, VQElementwise, SQMatMul, WKV7Step and
 * WKV7Sequence as native kernels.
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
 *   - KernelInfo_GetNodeName (API 14, slot 244), so every refusal names its node, and
 *     KernelInfoGetConstantInput_tensor (API 15, slot 249), so a payload that does not match its node's
 *     attributes is refused when the session is created, not first at run time;
 *   - KernelContext_ParallelFor (API 17, slot 274) when onnxruntime offers it: VQMatMul then runs its pieces
 *     on the session's intra-op threads, so a session has one thread pool instead of onnxruntime's plus OpenMP's
 *     (before API 17 it falls back to OpenMP);
 *   - HasSessionConfigEntry / GetSessionConfigEntry (API 14, slots 237 / 238; checked at registration by a round
 *     trip through CreateSessionOptions 10, AddSessionConfigEntry 130, ReleaseSessionOptions 100): the session's
 *     kernel mode, "rwkvq.kernels" = exact | fast (absent: exact) and "rwkvq.isa" = auto | scalar | avx2 |
 *     avxvnni | avx512vnni (absent or auto: the RWKVQ_ISA environment variable when it names a supported set, as
 *     rwkvq_default_mode reads it, else the best this CPU has).
 *     Each registration adds its own copies of the ops carrying that mode (op_mode), so two sessions of one
 *     process can run different modes. An unknown value, or an instruction set this CPU lacks, fails the
 *     registration with one line naming the setting.
 * Every attribute and input shape is checked against the others in 64-bit arithmetic (rwkvq_vq_check_* in
 * cpu_kernels.c) before a size is narrowed to int or a pointer is formed: attributes when the kernel is created,
 * inputs when they are known (initializers at creation, all inputs at compute). A violation is an
 * INVALID_ARGUMENT status with one line, "rwkvq.VQMatMul node 'name': <problem>"; tests/test_native_fuzz.py
 * runs mutated models through an AddressSanitizer build of this library (plugins/build_asan.sh).
 * tests/test_cpu_kernels_report.py checks these against the installed onnxruntime (version string, a status
 * round trip, and both ops against the numpy reference through real sessions).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkvq_cpu.h"
#include "rwkvq_dispatch.h"
#include "rwkvq_sq.h"
#include "rwkvq_wkv7.h"

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
    ORT_CreateSessionOptions = 10,
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
    ORT_ReleaseSessionOptions = 100,
    ORT_AddSessionConfigEntry = 130,
    ORT_HasSessionConfigEntry = 237,              /* API version 14 */
    ORT_GetSessionConfigEntry = 238,              /* API version 14 */
    ORT_KernelInfo_GetNodeName = 244,             /* API version 14 */
    ORT_KernelInfoGetConstantInput_tensor = 249,  /* API version 15 */
    ORT_KernelContext_ParallelFor = 274, /* API version 17 */
};

enum { ORT_API_VERSION_USED = 16, ORT_API_VERSION_PARALLEL_FOR = 17 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_FLOAT16 = 10 };
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

/* An op: the ABI struct first (onnxruntime holds a pointer to it), then what its callbacks need. The static ops
 * below are templates: each registration registers copies carrying its session's mode. */
typedef struct {
    OrtCustomOpABI abi;
    const char* name;
    int n_inputs;
    int input_types[4];
    rwkvq_mode mode; /* the session's kernel mode (set on the per-session copies) */
} RwkvqOp;

/* The kernel mode of the session an op was registered for: create functions store it in their kernel. */
static rwkvq_mode op_mode(const OrtCustomOpABI* op) { return ((const RwkvqOp*)op)->mode; }

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
typedef OrtStatus* (*KernelInfoGetNodeNameFn)(const void*, char*, size_t*);
typedef OrtStatus* (*KernelInfoGetConstantInputFn)(const void*, size_t, int*, const void**);
typedef OrtStatus* (*KernelContextParallelForFn)(const void*, void (*)(void*, size_t), size_t, size_t, void*);
typedef OrtStatus* (*CreateSessionOptionsFn)(void**);
typedef void (*ReleaseSessionOptionsFn)(void*);
typedef OrtStatus* (*AddSessionConfigEntryFn)(void*, const char*, const char*);
typedef OrtStatus* (*HasSessionConfigEntryFn)(const void*, const char*, int*);
typedef OrtStatus* (*GetSessionConfigEntryFn)(const void*, const char*, char*, size_t*);

/* set by RegisterCustomOps when onnxruntime offers API 17 */
static KernelContextParallelForFn parallel_for_api;

#define API(api, index, type) ((type)(api)[index])
#define TRY(expr)                          \
    do {                                   \
        OrtStatus* status_ = (expr);       \
        if (status_) return status_;       \
    } while (0)

/* The node an error is about, for one-line messages: "rwkvq.VQMatMul node 'name'" (control characters of a crafted
 * name replaced, so the message stays one line). */
typedef struct {
    char text[160];
} NodeLabel;

/* A one-line error status "<node>: <problem>". */
static OrtStatus* refuse(const OrtFn* api, int code, const NodeLabel* node, const char* problem) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s: %s", node->text, problem);
    for (char* c = msg; *c; ++c)
        if ((unsigned char)*c < 0x20) *c = ' ';
    return API(api, ORT_CreateStatus, CreateStatusFn)(code, msg);
}

static OrtStatus* refusef(const OrtFn* api, const NodeLabel* node, const char* fmt, long long a, long long b) {
    char problem[320];
    snprintf(problem, sizeof problem, fmt, a, b);
    return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
}

static void release(const OrtFn* api, OrtStatus* st) { API(api, ORT_ReleaseStatus, ReleaseStatusFn)(st); }

static void node_label(const OrtFn* api, const void* info, const char* op, NodeLabel* label) {
    char name[96] = "";
    size_t size = 0;
    OrtStatus* st = API(api, ORT_KernelInfo_GetNodeName, KernelInfoGetNodeNameFn)(info, NULL, &size);
    if (st) {
        release(api, st);
    } else if (size <= sizeof name) {
        st = API(api, ORT_KernelInfo_GetNodeName, KernelInfoGetNodeNameFn)(info, name, &size);
        if (st) release(api, st), name[0] = 0;
    } else { /* a long name, shortened */
        char* full = (char*)malloc(size);
        if (full && !(st = API(api, ORT_KernelInfo_GetNodeName, KernelInfoGetNodeNameFn)(info, full, &size)))
            snprintf(name, sizeof name, "%.80s...", full);
        if (st) release(api, st);
        free(full);
    }
    snprintf(label->text, sizeof label->text, "%s node '%s'", op, name[0] ? name : "(unnamed)");
    for (char* c = label->text; *c; ++c)
        if ((unsigned char)*c < 0x20) *c = '?';
}

/* A tensor input: data pointer, element type, shape. */
typedef struct {
    void* data;
    int type;
    size_t rank;
    int64_t dims[MAX_RANK];
    int64_t numel;
} Tensor;

static const char* type_name(int type) {
    switch (type) {
    case T_FLOAT: return "float32";
    case T_UINT8: return "uint8";
    case T_INT8: return "int8";
    case T_FLOAT16: return "float16";
    default: return "another type";
    }
}

/* The tensor `value` (input `index`, named `what`) with its shape, refused unless its element type is `type`. */
static OrtStatus* read_tensor(const OrtFn* api, const NodeLabel* node, const void* value, const char* what, int type,
                              Tensor* t) {
    void* info = NULL;
    TRY(API(api, ORT_GetTensorTypeAndShape, GetTensorTypeAndShapeFn)(value, &info));
    OrtStatus* st = API(api, ORT_GetTensorElementType, GetTensorElementTypeFn)(info, &t->type);
    if (!st) st = API(api, ORT_GetDimensionsCount, GetDimensionsCountFn)(info, &t->rank);
    if (!st && t->rank <= MAX_RANK) st = API(api, ORT_GetDimensions, GetDimensionsFn)(info, t->dims, t->rank);
    API(api, ORT_ReleaseTensorTypeAndShapeInfo, ReleaseTensorTypeAndShapeInfoFn)(info);
    if (st) return st;
    char problem[160];
    if (t->type != type) {
        snprintf(problem, sizeof problem, "%s is %s, expected %s", what, type_name(t->type), type_name(type));
        return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
    }
    if (t->rank > MAX_RANK) {
        snprintf(problem, sizeof problem, "%s has rank %zu, more than %d", what, t->rank, MAX_RANK);
        return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
    }
    t->numel = 1;
    for (size_t i = 0; i < t->rank; ++i)
        if (t->dims[i] < 0 || __builtin_mul_overflow(t->numel, t->dims[i], &t->numel)) {
            snprintf(problem, sizeof problem, "%s has an impossible dimension %lld", what, (long long)t->dims[i]);
            return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
        }
    return API(api, ORT_GetTensorMutableData, GetTensorMutableDataFn)(value, &t->data);
}

static OrtStatus* input(const OrtFn* api, const NodeLabel* node, void* ctx, size_t i, const char* what, int type,
                        Tensor* t) {
    const void* value = NULL;
    TRY(API(api, ORT_KernelContext_GetInput, KernelContextGetInputFn)(ctx, i, &value));
    if (!value) return refusef(api, node, "input %lld is missing", (long long)i, 0);
    return read_tensor(api, node, value, what, type, t);
}

/* Input i when the graph makes it a constant (an initializer), for checks at kernel creation: *found 0 otherwise. */
static OrtStatus* constant_input(const OrtFn* api, const NodeLabel* node, const void* info, size_t i,
                                 const char* what, int type, Tensor* t, int* found) {
    const void* value = NULL;
    int is_constant = 0;
    OrtStatus* st = API(api, ORT_KernelInfoGetConstantInput_tensor, KernelInfoGetConstantInputFn)(info, i,
                                                                                                 &is_constant, &value);
    *found = 0;
    if (st) { /* not a constant, or not offered: the checks then run at compute */
        release(api, st);
        return NULL;
    }
    if (!is_constant || !value) return NULL;
    *found = 1;
    return read_tensor(api, node, value, what, type, t);
}

static OrtStatus* output(const OrtFn* api, void* ctx, size_t index, const int64_t* dims, size_t rank, float** out) {
    void* value = NULL;
    TRY(API(api, ORT_KernelContext_GetOutput, KernelContextGetOutputFn)(ctx, index, dims, rank, &value));
    return API(api, ORT_GetTensorMutableData, GetTensorMutableDataFn)(value, (void**)out);
}

/* The output y [..., N] of a matmul op over x [..., K]: x's rows checked (rwkvq_vq_check_rows; their count goes to
 * *rows) before y is allocated with x's leading dimensions. */
static OrtStatus* matmul_output(const OrtFn* api, const NodeLabel* node, void* ctx, const Tensor* x, int64_t K,
                                int64_t N, int64_t* rows, float** y) {
    char problem[320];
    if (rwkvq_vq_check_rows(K, (int)x->rank, x->dims, rows, problem, sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
    int64_t dims[MAX_RANK];
    memcpy(dims, x->dims, sizeof(int64_t) * x->rank);
    dims[x->rank - 1] = N;
    return output(api, ctx, 0, dims, x->rank, y);
}

/* A checked kernel struct `k` (size bytes) moved to the heap as the kernel onnxruntime keeps. */
static OrtStatus* keep_kernel(const OrtFn* api, const NodeLabel* node, const void* k, size_t size, void** kernel) {
    void* made = malloc(size);
    if (!made) return refuse(api, ORT_FAIL, node, "out of memory");
    memcpy(made, k, size);
    *kernel = made;
    return NULL;
}

/* An int attribute, refused with the node's name when it is missing or not an int. */
static OrtStatus* attr_int(const OrtFn* api, const NodeLabel* node, const void* info, const char* name,
                           int64_t* out) {
    OrtStatus* st = API(api, ORT_KernelInfoGetAttribute_int64, KernelInfoGetAttributeInt64Fn)(info, name, out);
    if (!st) return NULL;
    release(api, st);
    char problem[96];
    snprintf(problem, sizeof problem, "attribute '%s' is missing or not an integer", name);
    return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
}

/* ---- VQMatMul ---------------------------------------------------------------------------------------- */

typedef struct {
    const OrtFn* api;
    KernelContextParallelForFn parallel_for; /* onnxruntime's intra-op pool; NULL before API 17 */
    int N, K, dim, group_rows, group_cols, bits;
    rwkvq_mode mode; /* the session's numerics and instruction set */
    NodeLabel node;
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
               k->group_cols, k->bits, (int)i, j->chunks, k->mode))
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

/* codes, codebooks and scales (inputs 1..3) against the kernel's attributes, types included. */
static OrtStatus* vq_matmul_check_payload(const VQMatMulKernel* k, const Tensor* codes, const Tensor* books,
                                          const Tensor* scales) {
    char problem[320];
    if (rwkvq_vq_check_payload(k->N, k->K, k->dim, k->group_rows, k->group_cols, k->bits, (int)codes->rank,
                               codes->dims, (int)books->rank, books->dims, (int)scales->rank, scales->dims, problem,
                               sizeof problem))
        return refuse(k->api, ORT_INVALID_ARGUMENT, &k->node, problem);
    return NULL;
}

static const char* vq_matmul_inputs[4] = {"the input", "codes", "codebooks", "scales"};
static const int vq_matmul_types[4] = {T_FLOAT, T_UINT8, T_INT8, T_FLOAT};

static OrtStatus* vq_matmul_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    VQMatMulKernel k = {api, parallel_for_api, 0, 0, 0, 0, 0, 0, op_mode(op), {""}};
    node_label(api, info, "rwkvq.VQMatMul", &k.node);
    int64_t v[6];
    static const char* names[6] = {"N", "K", "dim", "group_rows", "group_cols", "index_bits"};
    for (int i = 0; i < 6; ++i) TRY(attr_int(api, &k.node, info, names[i], &v[i]));
    char problem[320];
    if (rwkvq_vq_check_layout(v[0], v[1], v[2], v[3], v[4], v[5], problem, sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, &k.node, problem);
    /* every value fits an int now */
    k.N = (int)v[0], k.K = (int)v[1], k.dim = (int)v[2], k.group_rows = (int)v[3], k.group_cols = (int)v[4],
    k.bits = (int)v[5];
    /* initializers are known now: a model whose payload does not match its attributes is refused at load */
    Tensor t[4];
    int found[4] = {0, 0, 0, 0};
    for (int i = 1; i < 4; ++i)
        TRY(constant_input(api, &k.node, info, (size_t)i, vq_matmul_inputs[i], vq_matmul_types[i], &t[i], &found[i]));
    if (found[1] && found[2] && found[3]) TRY(vq_matmul_check_payload(&k, &t[1], &t[2], &t[3]));
    return keep_kernel(api, &k.node, &k, sizeof k, kernel);
}

static OrtStatus* vq_matmul_compute(void* kernel, void* ctx) {
    const VQMatMulKernel* k = (const VQMatMulKernel*)kernel;
    const OrtFn* api = k->api;
    Tensor t[4];
    for (int i = 0; i < 4; ++i)
        TRY(input(api, &k->node, ctx, (size_t)i, vq_matmul_inputs[i], vq_matmul_types[i], &t[i]));
    const Tensor *x = &t[0], *codes = &t[1], *books = &t[2], *scales = &t[3];
    TRY(vq_matmul_check_payload(k, codes, books, scales));
    int64_t M = 0;
    float* y = NULL;
    TRY(matmul_output(api, &k->node, ctx, x, k->K, k->N, &M, &y));
    const int row_bytes = (int)codes->dims[1];
    if (M == 0) return NULL;
    if (k->parallel_for) {
        /* the pieces run on onnxruntime's intra-op threads, the same ones its own kernels use: one pool */
        VQMatMulJob job = {k, NULL, (const float*)x->data, (int)M, row_bytes, 0, (const uint8_t*)codes->data,
                           (const int8_t*)books->data, (const float*)scales->data, y, 0};
        job.run = rwkvq_vq_matmul_plan(job.M, k->N, k->K, k->group_rows, &job.chunks);
        if (!job.run) return refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range");
        if (job.chunks == 1)
            vq_matmul_piece(&job, 0);
        else
            TRY(k->parallel_for(ctx, vq_matmul_piece, (size_t)job.chunks, 0, &job));
        return job.failed ? refuse(api, ORT_FAIL, &k->node, "out of memory") : NULL;
    }
    /* onnxruntime before API 17: the OpenMP entry point */
    int rc = rwkvq_vq_matmul((const float*)x->data, (int)M, (const uint8_t*)codes->data, row_bytes,
                             (const int8_t*)books->data, (const float*)scales->data, y, k->N, k->K, k->dim,
                             k->group_rows, k->group_cols, k->bits, k->mode);
    return rc == RWKVQ_NO_MEMORY ? refuse(api, ORT_FAIL, &k->node, "out of memory")
           : rc == RWKVQ_BAD_MODE ? refuse(api, ORT_FAIL, &k->node, "the session's kernel mode is not runnable here")
           : rc                  ? refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range")
                                 : NULL;
}

/* ---- VQElementwise ----------------------------------------------------------------------------------- */

typedef struct {
    const OrtFn* api;
    int bits;
    int rank;
    int64_t shape[MAX_RANK];
    int64_t n;
    NodeLabel node;
} VQElementwiseKernel;

/* The `shape` attribute, "d0,d1,...": 1 to MAX_RANK positive decimal integers, nothing else; NULL or a reason. */
static const char* parse_shape(const char* text, VQElementwiseKernel* k) {
    k->rank = 0;
    k->n = 1;
    for (const char* p = text;; ++p) {
        if (*p < '0' || *p > '9') return "the shape attribute is not a comma-separated list of positive integers";
        char* end;
        const long long d = strtoll(p, &end, 10);
        if (d < 1 || d > INT32_MAX) return "a dimension of the shape attribute is outside [1, 2^31)";
        if (k->rank == MAX_RANK) return "the shape attribute has more than 8 dimensions";
        k->shape[k->rank++] = d;
        if (__builtin_mul_overflow(k->n, d, &k->n)) return "the shape attribute's size overflows";
        if (*end == 0) return NULL;
        if (*end != ',') return "the shape attribute is not a comma-separated list of positive integers";
        p = end;
    }
}

static OrtStatus* vq_elementwise_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    (void)op;
    VQElementwiseKernel k;
    memset(&k, 0, sizeof k);
    k.api = api;
    node_label(api, info, "rwkvq.VQElementwise", &k.node);
    int64_t bits;
    TRY(attr_int(api, &k.node, info, "index_bits", &bits));
    size_t size = 0;
    OrtStatus* st = API(api, ORT_KernelInfoGetAttribute_string, KernelInfoGetAttributeStringFn)(info, "shape", NULL,
                                                                                                &size);
    if (st) {
        release(api, st);
        return refuse(api, ORT_INVALID_ARGUMENT, &k.node, "attribute 'shape' is missing or not a string");
    }
    char* text = (char*)malloc(size + 1);
    if (!text) return refuse(api, ORT_FAIL, &k.node, "out of memory");
    st = API(api, ORT_KernelInfoGetAttribute_string, KernelInfoGetAttributeStringFn)(info, "shape", text, &size);
    if (st) {
        free(text);
        release(api, st);
        return refuse(api, ORT_INVALID_ARGUMENT, &k.node, "unreadable string attribute 'shape'");
    }
    text[size] = 0;
    const char* bad = parse_shape(text, &k);
    free(text);
    if (bad) return refuse(api, ORT_INVALID_ARGUMENT, &k.node, bad);
    char problem[320];
    if (rwkvq_ew_check_layout(bits, k.n, problem, sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, &k.node, problem);
    k.bits = (int)bits;
    return keep_kernel(api, &k.node, &k, sizeof k, kernel);
}

static OrtStatus* vq_elementwise_compute(void* kernel, void* ctx) {
    VQElementwiseKernel* k = (VQElementwiseKernel*)kernel;
    const OrtFn* api = k->api;
    const NodeLabel* node = &k->node;
    Tensor x, codes, book;
    TRY(input(api, node, ctx, 0, "the input", T_FLOAT, &x));
    TRY(input(api, node, ctx, 1, "codes", T_UINT8, &codes));
    TRY(input(api, node, ctx, 2, "codebook", T_FLOAT, &book));
    char problem[320];
    if (rwkvq_ew_check_payload(k->bits, k->n, (int)codes.rank, codes.dims, (int)book.rank, book.dims, problem,
                               sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, node, problem);
    /* y = x * v with numpy broadcasting, for v whose non-1 dimensions are x's trailing dimensions */
    int lead = 0;
    while (lead < k->rank && k->shape[lead] == 1) ++lead;
    const int vr = k->rank - lead;
    if (vr > (int)x.rank)
        return refusef(api, node, "cannot broadcast the vector over an input of rank %lld", (long long)x.rank, 0);
    for (int i = 0; i < vr; ++i)
        if (k->shape[lead + i] != x.dims[x.rank - vr + i])
            return refusef(api, node, "vector dimension %lld does not match the input's %lld", k->shape[lead + i],
                           x.dims[x.rank - vr + i]);
    const int out_rank = k->rank > (int)x.rank ? k->rank : (int)x.rank;
    int64_t dims[MAX_RANK];
    for (int i = 0; i < out_rank; ++i) {
        const int xi = i - (out_rank - (int)x.rank);
        dims[i] = xi >= 0 ? x.dims[xi] : 1;
    }
    float* y = NULL;
    TRY(output(api, ctx, 0, dims, (size_t)out_rank, &y));
    /* decoded on every call (a few microseconds for a model-width vector): nothing shared between concurrent
     * runs of the kernel, and correct even when the codes are not constant */
    float* v = (float*)malloc(sizeof(float) * (size_t)k->n);
    if (!v) return refuse(api, ORT_FAIL, node, "out of memory");
    int rc = rwkvq_decode_vector((const uint8_t*)codes.data, codes.numel, k->bits, (const float*)book.data,
                                 book.numel, v, k->n);
    if (!rc) rc = rwkvq_scale_rows((const float*)x.data, v, y, x.numel, k->n);
    free(v);
    return rc ? refuse(api, ORT_INVALID_ARGUMENT, node, "sizes out of range") : NULL;
}

/* ---- SQMatMul ---------------------------------------------------------------------------------------- */

typedef struct {
    const OrtFn* api;
    KernelContextParallelForFn parallel_for; /* onnxruntime's intra-op pool; NULL before API 17 */
    rwkvq_mode mode;
    int N, K, bits, group_size;
    NodeLabel node;
} SQMatMulKernel;

/* One call split into pieces for onnxruntime's intra-op pool (the activations already quantized for fast). */
typedef struct {
    const SQMatMulKernel* k;
    const float* x;
    const void* acts;
    int M, chunks;
    const uint8_t* codes;
    const uint16_t* scales;
    const uint8_t* zeros;
    float* y;
    int failed;
} SQMatMulJob;

static void sq_matmul_piece(void* data, size_t i) {
    SQMatMulJob* j = (SQMatMulJob*)data;
    const SQMatMulKernel* k = j->k;
    if (rwkvq_sq_chunk(j->x, j->acts, j->M, j->codes, j->scales, j->zeros, j->y, k->N, k->K, k->bits, k->group_size,
                       k->mode.kernels, k->mode.isa, (int)i, j->chunks))
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

static OrtStatus* sq_matmul_check_payload(const SQMatMulKernel* k, const Tensor* codes, const Tensor* scales,
                                          const Tensor* zeros) {
    char problem[320];
    if (rwkvq_sq_check_payload(k->N, k->K, k->bits, k->group_size, (int)codes->rank, codes->dims, (int)scales->rank,
                               scales->dims, (int)zeros->rank, zeros->dims, problem, sizeof problem))
        return refuse(k->api, ORT_INVALID_ARGUMENT, &k->node, problem);
    return NULL;
}

static const char* sq_matmul_inputs[4] = {"the input", "codes", "scales", "zero_points"};
static const int sq_matmul_types[4] = {T_FLOAT, T_UINT8, T_FLOAT16, T_UINT8};

static OrtStatus* sq_matmul_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    SQMatMulKernel k;
    memset(&k, 0, sizeof k);
    k.api = api, k.parallel_for = parallel_for_api, k.mode = op_mode(op);
    node_label(api, info, "rwkvq.SQMatMul", &k.node);
    int64_t v[4];
    static const char* names[4] = {"N", "K", "bits", "group_size"};
    for (int i = 0; i < 4; ++i) TRY(attr_int(api, &k.node, info, names[i], &v[i]));
    char problem[320];
    if (rwkvq_sq_check_layout(v[0], v[1], v[2], v[3], problem, sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, &k.node, problem);
    if (!rwkvq_isa_supported(k.mode.isa))
        return refusef(api, &k.node, "instruction set %lld is not one this CPU runs", k.mode.isa, 0);
    k.N = (int)v[0], k.K = (int)v[1], k.bits = (int)v[2], k.group_size = (int)v[3]; /* checked: all fit an int */
    Tensor t[4];
    int found[4] = {0, 0, 0, 0};
    for (int i = 1; i < 4; ++i)
        TRY(constant_input(api, &k.node, info, (size_t)i, sq_matmul_inputs[i], sq_matmul_types[i], &t[i], &found[i]));
    if (found[1] && found[2] && found[3]) TRY(sq_matmul_check_payload(&k, &t[1], &t[2], &t[3]));
    return keep_kernel(api, &k.node, &k, sizeof k, kernel);
}
static OrtStatus* sq_matmul_compute(void* kernel, void* ctx) {
    const SQMatMulKernel* k = (const SQMatMulKernel*)kernel;
    const OrtFn* api = k->api;
    Tensor t[4];
    for (int i = 0; i < 4; ++i)
        TRY(input(api, &k->node, ctx, (size_t)i, sq_matmul_inputs[i], sq_matmul_types[i], &t[i]));
    const Tensor *x = &t[0], *codes = &t[1], *scales = &t[2], *zeros = &t[3];
    TRY(sq_matmul_check_payload(k, codes, scales, zeros));
    int64_t M = 0;
    float* y = NULL;
    TRY(matmul_output(api, &k->node, ctx, x, k->K, k->N, &M, &y));
    if (M == 0) return NULL;
    if (!k->parallel_for) { /* onnxruntime before API 17: the OpenMP entry point */
        const int rc = rwkvq_sq_matmul((const float*)x->data, (int)M, (const uint8_t*)codes->data,
                                       (const uint16_t*)scales->data, (const uint8_t*)zeros->data, y, k->N, k->K,
                                       k->bits, k->group_size, k->mode.kernels, k->mode.isa);
        return rc == RWKVQ_NO_MEMORY ? refuse(api, ORT_FAIL, &k->node, "out of memory")
               : rc                  ? refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range")
                                     : NULL;
    }
    SQMatMulJob job = {k, (const float*)x->data, NULL, (int)M, rwkvq_sq_chunks((int)M, k->N, k->K),
                       (const uint8_t*)codes->data, (const uint16_t*)scales->data, (const uint8_t*)zeros->data, y, 0};
    if (job.chunks < 1) return refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range");
    void* acts = NULL;
    if (k->mode.kernels == RWKVQ_KERNELS_FAST) { /* the activations quantized once, read by every piece */
        const int64_t bytes = rwkvq_sq_acts_bytes((int)M, k->K, k->group_size);
        if (bytes < 0 || (uint64_t)bytes > SIZE_MAX)
            return refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range");
        if (!(acts = malloc((size_t)bytes))) return refuse(api, ORT_FAIL, &k->node, "out of memory");
        rwkvq_sq_quantize(job.x, job.M, k->K, k->group_size, acts);
        job.acts = acts;
    }
    OrtStatus* st = NULL;
    if (job.chunks == 1)
        sq_matmul_piece(&job, 0);
    else
        st = k->parallel_for(ctx, sq_matmul_piece, (size_t)job.chunks, 0, &job);
    free(acts);
    if (st) return st;
    return job.failed ? refuse(api, ORT_FAIL, &k->node, "out of memory") : NULL;
}

/* ---- WKV7Step and WKV7Sequence -------------------------------------------------------------------- */
/* rwkvq.WKV7Step(state, r, w, k, v, a, b) -> (y, new_state): one RWKV-7 recurrence step for every head
 * (rwkvq_onnx/opspec/wkv7_step.py), vectors [B, C]; rwkvq.WKV7Sequence: the same inputs with vectors [B, T, C],
 * T steps from the state (rwkvq_onnx/opspec/wkv7_sequence.py). Their own ABI structs: two outputs, seven inputs.
 * Both run one piece per (batch row, head) on onnxruntime's intra-op pool; a sequence piece runs its T tokens.
 * WKV7Step's optional `layer` attribute: the state input is every layer's [L, B, H, N, N] and the op reads
 * state[layer] in place (the step graph then needs no Split copying each layer's state out per token). */

typedef struct {
    const OrtFn* api;
    KernelContextParallelForFn parallel_for;
    int64_t head_size;
    int64_t layer; /* WKV7Step's optional attribute: the state is [L, B, H, N, N], read at [layer]; -1 without */
    NodeLabel node;
} WKV7Kernel;

typedef struct {
    const float *state, *r, *w, *k, *v, *a, *b;
    float *y, *new_state;
    int64_t tokens, heads, head_size; /* tokens: T of a sequence, -1 for a step */
} WKV7Job;

static int wkv7_run(const WKV7Job* j, int64_t first, int64_t count) {
    return j->tokens < 0 ? rwkvq_wkv7_step(j->state, j->r, j->w, j->k, j->v, j->a, j->b, j->y, j->new_state,
                                           j->heads, j->head_size, first, count)
                         : rwkvq_wkv7_sequence(j->state, j->r, j->w, j->k, j->v, j->a, j->b, j->y, j->new_state,
                                               j->tokens, j->heads, j->head_size, first, count);
}

static void wkv7_piece(void* data, size_t i) { wkv7_run((const WKV7Job*)data, (int64_t)i, 1); }

static OrtStatus* wkv7_create(const OrtFn* api, const void* info, const char* op, int layered, void** kernel) {
    WKV7Kernel k = {api, parallel_for_api, 0, -1, {""}};
    node_label(api, info, op, &k.node);
    TRY(attr_int(api, &k.node, info, "head_size", &k.head_size));
    if (k.head_size < 1 || k.head_size > RWKVQ_WKV7_MAX_HEAD)
        return refusef(api, &k.node, "attribute head_size=%lld is outside [1, %lld]", (long long)k.head_size,
                       RWKVQ_WKV7_MAX_HEAD);
    if (layered) { /* optional: absent leaves -1 */
        OrtStatus* st = API(api, ORT_KernelInfoGetAttribute_int64, KernelInfoGetAttributeInt64Fn)(info, "layer",
                                                                                                  &k.layer);
        if (st) release(api, st), k.layer = -1;
        else if (k.layer < 0) {
            char problem[96];
            snprintf(problem, sizeof problem, "attribute layer=%lld is negative", (long long)k.layer);
            return refuse(api, ORT_INVALID_ARGUMENT, &k.node, problem);
        }
    }
    return keep_kernel(api, &k.node, &k, sizeof k, kernel);
}
static OrtStatus* wkv7_step_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    (void)op;
    return wkv7_create(api, info, "rwkvq.WKV7Step", 1, kernel);
}
static OrtStatus* wkv7_sequence_create(const OrtCustomOpABI* op, const OrtFn* api, const void* info, void** kernel) {
    (void)op;
    return wkv7_create(api, info, "rwkvq.WKV7Sequence", 0, kernel);
}

/* Inputs read and checked (the state, then every vector against it: [B, C] for a step, [B, T, C] with one T for
 * a sequence), outputs allocated, then the heads run. */
static OrtStatus* wkv7_compute(const WKV7Kernel* k, void* ctx, int sequence) {
    const OrtFn* api = k->api;
    static const char* names[7] = {"the state", "r", "w", "k", "v", "a", "b"};
    Tensor t[7];
    for (int i = 0; i < 7; ++i) TRY(input(api, &k->node, ctx, (size_t)i, names[i], T_FLOAT, &t[i]));
    char problem[320];
    int64_t B = 0, H = 0, T = -1, offset = 0;
    if (k->layer >= 0 ? rwkvq_wkv7_check_layered_state(k->head_size, k->layer, (int)t[0].rank, t[0].dims, &B, &H,
                                                       &offset, problem, sizeof problem)
                      : rwkvq_wkv7_check_state(k->head_size, (int)t[0].rank, t[0].dims, &B, &H, problem,
                                               sizeof problem))
        return refuse(api, ORT_INVALID_ARGUMENT, &k->node, problem);
    const int64_t* state_dims = t[0].dims + (k->layer >= 0); /* one layer's [B, H, N, N] */
    const int64_t C = H * k->head_size; /* checked: below 2^31 */
    for (int i = 1; i < 7; ++i)
        if (sequence ? rwkvq_wkv7_check_sequence(names[i], B, C, (int)t[i].rank, t[i].dims, &T, problem,
                                                 sizeof problem)
                     : rwkvq_wkv7_check_vector(names[i], B, C, (int)t[i].rank, t[i].dims, problem, sizeof problem))
            return refuse(api, ORT_INVALID_ARGUMENT, &k->node, problem);
    const int64_t y_dims[3] = {B, sequence ? T : C, C}; /* [B, T, C], or [B, C] for a step */
    float *y = NULL, *new_state = NULL;
    TRY(output(api, ctx, 0, y_dims, sequence ? 3 : 2, &y));
    TRY(output(api, ctx, 1, state_dims, 4, &new_state));
    if (B == 0) return NULL;
    WKV7Job job = {(const float*)t[0].data + offset, (const float*)t[1].data, (const float*)t[2].data,
                   (const float*)t[3].data, (const float*)t[4].data, (const float*)t[5].data,
                   (const float*)t[6].data, y, new_state, T, H, k->head_size};
    const int64_t heads = B * H;
    if (k->parallel_for && heads > 1) /* one piece per head on onnxruntime's intra-op pool */
        return k->parallel_for(ctx, wkv7_piece, (size_t)heads, 0, &job);
    return wkv7_run(&job, 0, heads) ? refuse(api, ORT_INVALID_ARGUMENT, &k->node, "sizes out of range") : NULL;
}
static OrtStatus* wkv7_step_compute(void* kernel, void* ctx) { return wkv7_compute((const WKV7Kernel*)kernel, ctx, 0); }
static OrtStatus* wkv7_sequence_compute(void* kernel, void* ctx) {
    return wkv7_compute((const WKV7Kernel*)kernel, ctx, 1);
}

static const char* wkv7_step_name(const OrtCustomOpABI* op) { (void)op; return "WKV7Step"; }
static const char* wkv7_sequence_name(const OrtCustomOpABI* op) { (void)op; return "WKV7Sequence"; }
static int wkv7_type(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return T_FLOAT; }
static size_t wkv7_input_count(const OrtCustomOpABI* op) { (void)op; return 7; }
static size_t wkv7_output_count(const OrtCustomOpABI* op) { (void)op; return 2; }
static int wkv7_required(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return CHARACTERISTIC_REQUIRED; }
static int wkv7_memory(const OrtCustomOpABI* op, size_t i) { (void)op; (void)i; return MEM_TYPE_DEFAULT; }
static const char* wkv7_provider(const OrtCustomOpABI* op) { (void)op; return NULL; /* CPU */ }

#define WKV7_OP(NAME, CREATE, COMPUTE)                                                                       \
    {ORT_API_VERSION_USED, NULL, NAME, wkv7_provider, wkv7_type, wkv7_input_count, wkv7_type, wkv7_output_count, \
     NULL, free, wkv7_required, wkv7_required, wkv7_memory, NULL, NULL, NULL, NULL, CREATE, COMPUTE, {NULL}}
static OrtCustomOpABI wkv7_step_op = WKV7_OP(wkv7_step_name, wkv7_step_create, wkv7_step_compute);
static OrtCustomOpABI wkv7_sequence_op = WKV7_OP(wkv7_sequence_name, wkv7_sequence_create, wkv7_sequence_compute);

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
     NAME, N_IN, {__VA_ARGS__}, {RWKVQ_KERNELS_EXACT, RWKVQ_ISA_SCALAR}}

static RwkvqOp vq_matmul_op = RWKVQ_OP("VQMatMul", vq_matmul_create, vq_matmul_compute, free, 4, T_FLOAT, T_UINT8,
                                       T_INT8, T_FLOAT);
static RwkvqOp vq_elementwise_op = RWKVQ_OP("VQElementwise", vq_elementwise_create, vq_elementwise_compute, free, 3,
                                            T_FLOAT, T_UINT8, T_FLOAT);
static RwkvqOp sq_matmul_op = RWKVQ_OP("SQMatMul", sq_matmul_create, sq_matmul_compute, free, 4, T_FLOAT, T_UINT8,
                                       T_FLOAT16, T_UINT8);

/* What each registration copies (with its session's mode) into the domain it registers. */
static const RwkvqOp* const op_templates[] = {&vq_matmul_op, &vq_elementwise_op, &sq_matmul_op};
enum { N_OPS = sizeof op_templates / sizeof op_templates[0] };

static char registered_version[64];
static int abi_checked;
static rwkvq_mode registered_mode = {-1, -1};

/* A status round trip through the declared table: 1 when CreateStatus / GetErrorMessage / ReleaseStatus sit
 * where this file says they do. */
static int abi_round_trip(const OrtFn* api) {
    OrtStatus* st = API(api, ORT_CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, "rwkvq abi check");
    const int ok = st && strcmp(API(api, ORT_GetErrorMessage, GetErrorMessageFn)(st), "rwkvq abi check") == 0;
    if (st) API(api, ORT_ReleaseStatus, ReleaseStatusFn)(st);
    return ok;
}

/* Session config entry `key` into value (cap bytes): 1 found, 0 absent, -1 unreadable (longer than cap - 1). */
static int config_entry(const OrtFn* api, const void* options, const char* key, char* value, size_t cap) {
    int has = 0;
    OrtStatus* st = API(api, ORT_HasSessionConfigEntry, HasSessionConfigEntryFn)(options, key, &has);
    if (st) return release(api, st), -1;
    if (!has) return 0;
    size_t size = cap;
    st = API(api, ORT_GetSessionConfigEntry, GetSessionConfigEntryFn)(options, key, value, &size);
    if (st) return release(api, st), -1;
    return 1;
}

/* A config round trip on a scratch SessionOptions: 1 when Has/GetSessionConfigEntry (and the calls around them)
 * sit where this file says they do, so reading the caller's options is safe. */
static int config_round_trip(const OrtFn* api) {
    void* options = NULL;
    OrtStatus* st = API(api, ORT_CreateSessionOptions, CreateSessionOptionsFn)(&options);
    if (st) return release(api, st), 0;
    char value[16] = "";
    int ok = 0;
    st = API(api, ORT_AddSessionConfigEntry, AddSessionConfigEntryFn)(options, "rwkvq.abi_check", "round trip");
    if (st)
        release(api, st);
    else
        ok = config_entry(api, options, "rwkvq.abi_check", value, sizeof value) == 1 &&
             strcmp(value, "round trip") == 0 && config_entry(api, options, "rwkvq.absent", value, sizeof value) == 0;
    API(api, ORT_ReleaseSessionOptions, ReleaseSessionOptionsFn)(options);
    return ok;
}

/* The instruction sets this CPU supports, "scalar, avx2, ...", into buf. */
static const char* supported_isas(char* buf, size_t cap) {
    size_t used = 0;
    buf[0] = 0;
    for (int isa = 0; isa < RWKVQ_ISA_COUNT && used < cap; ++isa)
        if (rwkvq_isa_supported(isa))
            used += (size_t)snprintf(buf + used, cap - used, used ? ", %s" : "%s", rwkvq_isa_name(isa));
    return buf;
}

/* A one-line registration error about a session config entry (not about a node). */
static OrtStatus* refuse_config(const OrtFn* api, const char* key, const char* value, const char* problem) {
    char msg[320];
    snprintf(msg, sizeof msg, "%s=%.40s: %s", key, value, problem);
    for (char* c = msg; *c; ++c)
        if ((unsigned char)*c < 0x20) *c = '?';
    return API(api, ORT_CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, msg);
}

/* The session's mode from its config entries (see the top of this file). */
static OrtStatus* session_mode(const OrtFn* api, const void* options, rwkvq_mode* mode) {
    if (!config_round_trip(api))
        return API(api, ORT_CreateStatus, CreateStatusFn)(
            ORT_FAIL, "rwkvq: onnxruntime's session config entries are not readable through this library's ABI "
                      "declarations (Has/GetSessionConfigEntry round trip failed)");
    *mode = rwkvq_default_mode();
    char value[64];
    int found = config_entry(api, options, "rwkvq.kernels", value, sizeof value);
    if (found < 0) return refuse_config(api, "rwkvq.kernels", "?", "unreadable value (expected exact or fast)");
    if (found) {
        mode->kernels = rwkvq_kernels_parse(value);
        if (mode->kernels < 0) return refuse_config(api, "rwkvq.kernels", value, "unknown value (expected exact or fast)");
    }
    found = config_entry(api, options, "rwkvq.isa", value, sizeof value);
    if (found < 0) return refuse_config(api, "rwkvq.isa", "?", "unreadable value");
    if (found) {
        char list[96], problem[160];
        /* "auto" keeps rwkvq_default_mode's choice: RWKVQ_ISA when it names a supported set, else the best */
        mode->isa = strcmp(value, "auto") == 0 || !value[0] ? mode->isa : rwkvq_isa_parse(value);
        if (mode->isa < 0) {
            snprintf(problem, sizeof problem, "unknown instruction set (expected auto, scalar, avx2, avxvnni or "
                                              "avx512vnni; this CPU supports %s)", supported_isas(list, sizeof list));
            return refuse_config(api, "rwkvq.isa", value, problem);
        }
        if (!rwkvq_isa_supported(mode->isa)) {
            snprintf(problem, sizeof problem, "this CPU does not support it (supported: %s)",
                     supported_isas(list, sizeof list));
            return refuse_config(api, "rwkvq.isa", value, problem);
        }
    }
    return NULL;
}

/* The entry point register_custom_ops_library looks up. */
OrtStatus* RegisterCustomOps(void* session_options, const OrtApiBase* base) {
    const OrtFn* api = base->GetApi(ORT_API_VERSION_USED);
    if (!api) return NULL; /* cannot even report: onnxruntime older than API 16 */
    snprintf(registered_version, sizeof registered_version, "%s", base->GetVersionString());
    abi_checked = abi_round_trip(api) ? 1 : -1;
    const OrtFn* api17 = base->GetApi(ORT_API_VERSION_PARALLEL_FOR);
    parallel_for_api = api17 ? API(api17, ORT_KernelContext_ParallelFor, KernelContextParallelForFn) : NULL;
    rwkvq_mode mode;
    TRY(session_mode(api, session_options, &mode));
    /* this session's copies of the ops; like the domain they live as long as the process (sessions made from
     * these options may outlive the options, and onnxruntime never hands them back) */
    RwkvqOp* ops = (RwkvqOp*)malloc(sizeof(RwkvqOp) * N_OPS);
    if (!ops) return API(api, ORT_CreateStatus, CreateStatusFn)(ORT_FAIL, "rwkvq: out of memory");
    void* domain = NULL;
    TRY(API(api, ORT_CreateCustomOpDomain, CreateCustomOpDomainFn)("rwkvq", &domain));
    for (int i = 0; i < N_OPS; ++i) {
        ops[i] = *op_templates[i];
        ops[i].mode = mode;
        TRY(API(api, ORT_CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &ops[i].abi));
    }
    /* the WKV ops have one numerics and no instruction-set variants: their static structs serve every session */
    TRY(API(api, ORT_CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &wkv7_step_op));
    TRY(API(api, ORT_CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &wkv7_sequence_op));
    registered_mode = mode;
    return API(api, ORT_AddCustomOpDomain, AddCustomOpDomainFn)(session_options, domain);
}

/* For the tests: the onnxruntime version that registered the ops and whether the ABI round trip held
 * (1 yes, -1 no, 0 not registered yet). */
const char* rwkvq_ort_version(void) { return registered_version; }
int rwkvq_ort_abi_ok(void) { return abi_checked; }
/* The mode of the latest successful registration: kernels (RWKVQ_KERNELS_*) and isa (RWKVQ_ISA_*); -1 before. */
int rwkvq_ort_registered_kernels(void) { return registered_mode.kernels; }
int rwkvq_ort_registered_isa(void) { return registered_mode.isa; }
/* 1 when the ops run their pieces on onnxruntime's intra-op pool (KernelContext_ParallelFor was found) */
int rwkvq_ort_thread_pool(void) { return parallel_for_api != NULL; }
