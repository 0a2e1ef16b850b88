/* Run-time instruction-set detection and the names of the kernel modes (see rwkvq_dispatch.h). */
#include <stdlib.h>
#include <string.h>

#include "rwkvq_dispatch.h"

static const char* const isa_names[RWKVQ_ISA_COUNT] = {"scalar", "avx2", "avxvnni", "avx512vnni"};

int rwkvq_isa_supported(int isa) {
    switch (isa) {
    case RWKVQ_ISA_SCALAR:
        return 1;
#if defined(__x86_64__) || defined(__i386__)
    case RWKVQ_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case RWKVQ_ISA_AVXVNNI:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("avxvnni");
    case RWKVQ_ISA_AVX512VNNI:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("fma");
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
