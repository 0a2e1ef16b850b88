/* Run-time choice of the CPU kernels: which instruction set a kernel uses, and exact vs fast numerics.
 *
 * The library is built for baseline x86-64 (no -march=native): ISA-specific kernels are compiled with
 * __attribute__((target(...))) and chosen at run time from the CPU's features, so a wheel built on one x86-64
 * runs on any other. Every kernel keeps a portable scalar path.
 *
 * Numerics (per session, onnxruntime session config entry "rwkvq.kernels", read when the op library is
 * registered; the ctypes entry points take it as an argument):
 *   exact  float activations, float accumulation: the reference path (custom ops vs numpy within 1e-5);
 *   fast   activations quantized to int8 per block (one float scale per block: 32 values for VQMatMul,
 *          gcd(group_size, 128) for SQMatMul, see rwkvq_sq.h), integer dot products per block, float accumulation
 *          of the block partial sums (as onnxruntime's MatMulNBits accuracy_level 4 and ggml's Q8 activations do).
 * The instruction set is the best this CPU supports unless session config "rwkvq.isa" (or, for processes that
 * do not go through a session, the environment variable RWKVQ_ISA) names another one it supports.
 * Every instruction set above scalar requires AVX2, FMA, BMI1 and BMI2 (the AVX2 kernels use all four). The VNNI
 * settings select CPUs that have them but run the AVX2 kernels for now: the int8 block sums they would compute
 * are the same (maddubs cannot saturate on int8 codebooks times activations within [-127, 127]), and no CPU at
 * hand could measure whether a vpdpbusd kernel pays.
 */
#ifndef RWKVQ_DISPATCH_H
#define RWKVQ_DISPATCH_H

enum { RWKVQ_ISA_SCALAR = 0, RWKVQ_ISA_AVX2 = 1, RWKVQ_ISA_AVXVNNI = 2, RWKVQ_ISA_AVX512VNNI = 3, RWKVQ_ISA_COUNT };
enum { RWKVQ_KERNELS_EXACT = 0, RWKVQ_KERNELS_FAST = 1 };

/* What one session (or one ctypes call) asked for. */
typedef struct {
    int kernels; /* RWKVQ_KERNELS_EXACT or RWKVQ_KERNELS_FAST */
    int isa;     /* RWKVQ_ISA_*, one that rwkvq_isa_supported() */
} rwkvq_mode;

/* 1 when this CPU (and this build) can run kernels of that instruction set, else 0 (also for unknown values). */
int rwkvq_isa_supported(int isa);
/* The best instruction set this CPU supports. */
int rwkvq_isa_best(void);
/* "scalar", "avx2", "avxvnni", "avx512vnni"; "?" for an unknown value. */
const char* rwkvq_isa_name(int isa);
/* The instruction set a name selects: "auto" (or NULL or "") is rwkvq_isa_best(); -1 for an unknown name. A
 * known name the CPU does not support is returned as is: callers refuse it with rwkvq_isa_supported. */
int rwkvq_isa_parse(const char* name);
/* "exact" -> RWKVQ_KERNELS_EXACT, "fast" -> RWKVQ_KERNELS_FAST, NULL or "" -> exact; -1 for anything else. */
int rwkvq_kernels_parse(const char* name);
/* The mode for callers without a session: exact numerics, RWKVQ_ISA from the environment when it names a
 * supported instruction set, else the best one. */
rwkvq_mode rwkvq_default_mode(void);

#endif
