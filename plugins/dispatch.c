/* Run-time instruction-set detection and the names of the kernel modes (see rwkvq_dispatch.h). */
#include <stdlib.h>
#include <string.h>

#include "rwkvq_dispatch.h"

static const char* const isa_names[RWKVQ_ISA_COUNT] = {"scalar", "avx2", "avxvnni", "avx512vnni"};

#if defined(__x86_64__)
/* What every kernel above scalar uses: AVX2 with FMA, and BMI1/BMI2 for the index extraction (every AVX2 CPU so
 * far has them; checked anyway, since running an instruction the CPU lacks kills the process). */
static int avx2_family(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2");
}
#endif

int rwkvq_isa_supported(int isa) {
#if defined(__x86_64__)
    __builtin_cpu_init(); /* idempotent; needed when called before the library's constructors ran */
#endif
    switch (isa) {
    case RWKVQ_ISA_SCALAR:
        return 1;
#if defined(__x86_64__)
    case RWKVQ_ISA_AVX2:
        return avx2_family();
    case RWKVQ_ISA_AVXVNNI:
        return avx2_family() && __builtin_cpu_supports("avxvnni");
    case RWKVQ_ISA_AVX512VNNI:
        return avx2_family() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    default:
        return 0;
    }
}

int rwkvq_isa_best(void) {
    for (int isa = RWKVQ_ISA_COUNT - 1; isa > RWKVQ_ISA_SCALAR; --isa)
        if (rwkvq_isa_supported(isa)) return isa;
    return RWKVQ_ISA_SCALAR;
}

const char* rwkvq_isa_name(int isa) { return isa >= 0 && isa < RWKVQ_ISA_COUNT ? isa_names[isa] : "?"; }

int rwkvq_isa_parse(const char* name) {
    if (!name || !*name || strcmp(name, "auto") == 0) return rwkvq_isa_best();
    for (int isa = 0; isa < RWKVQ_ISA_COUNT; ++isa)
        if (strcmp(name, isa_names[isa]) == 0) return isa;
    return -1;
}

int rwkvq_kernels_parse(const char* name) {
    if (!name || !*name || strcmp(name, "exact") == 0) return RWKVQ_KERNELS_EXACT;
    if (strcmp(name, "fast") == 0) return RWKVQ_KERNELS_FAST;
    return -1;
}

rwkvq_mode rwkvq_default_mode(void) {
    const int isa = rwkvq_isa_parse(getenv("RWKVQ_ISA"));
    rwkvq_mode mode = {RWKVQ_KERNELS_EXACT, isa >= 0 && rwkvq_isa_supported(isa) ? isa : rwkvq_isa_best()};
    return mode;
}
