/* Chooses the kernel table once: cpuid for the instructions, XCR0 for the OS saving their
 * registers (an AVX-512 CPU under an OS that does not save ZMM state must not use them). */
#include <stdlib.h>
#include <string.h>
#include "kernels/rv_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

static unsigned long long read_xcr0(void)
{
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static int cpu_has(int isa)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx)
        return 0;
    unsigned long long xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6)           /* XMM and YMM state */
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    int avx2 = (b >> 5) & 1;
    if (isa == RV_ISA_ID_AVX2)
        return avx2 && fma && f16c;
    if (isa == RV_ISA_ID_AVX512 || isa == RV_ISA_ID_AVX512VNNI) {
        int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
        int vnni = (c >> 11) & 1;
        int avx512 = avx2 && fma && f16c && f && dq && bw && vl && (xcr0 & 0xe0) == 0xe0; /* opmask, ZMM */
        return avx512 && (isa == RV_ISA_ID_AVX512 || vnni);
    }
    return 0;
}
#elif defined(__aarch64__)
static int cpu_has(int isa) { return isa == RV_ISA_ID_NEON; }   /* NEON is baseline on AArch64 */
#else
static int cpu_has(int isa) { (void)isa; return 0; }
#endif

static const char *const isa_names[RV_ISA_COUNT] = {"scalar", "avx2", "avx512", "neon", "avx512vnni"};

int rv_isa_built(int isa)
{
    switch (isa) {
    case RV_ISA_ID_SCALAR: return 1;
#ifdef RUVPY_BUILD_AVX2
    case RV_ISA_ID_AVX2: return 1;
#endif
#ifdef RUVPY_BUILD_AVX512
    case RV_ISA_ID_AVX512: return 1;
#endif
#ifdef RUVPY_BUILD_NEON
    case RV_ISA_ID_NEON: return 1;
#endif
#ifdef RUVPY_BUILD_AVX512VNNI
    case RV_ISA_ID_AVX512VNNI: return 1;
#endif
    default: return 0;
    }
}

int rv_isa_supported(int isa)
{
    if (isa < 0 || isa >= RV_ISA_COUNT || !rv_isa_built(isa))
        return 0;
    return isa == RV_ISA_ID_SCALAR || cpu_has(isa);
}

const char *rv_isa_name(int isa)
{
    return (isa >= 0 && isa < RV_ISA_COUNT) ? isa_names[isa] : "unknown";
}

int rv_isa_from_name(const char *name)
{
    for (int i = 0; i < RV_ISA_COUNT; i++)
        if (strcmp(name, isa_names[i]) == 0)
            return i;
    return -1;
}

int rv_best_isa(void)
{
    static const int preference[] = {RV_ISA_ID_AVX512VNNI, RV_ISA_ID_AVX512, RV_ISA_ID_AVX2, RV_ISA_ID_NEON};
    for (size_t i = 0; i < sizeof preference / sizeof preference[0]; i++)
        if (rv_isa_supported(preference[i]))
            return preference[i];
    return RV_ISA_ID_SCALAR;
}

static rv_ops tables[RV_ISA_COUNT];
static int tables_filled;
static const rv_ops *active;
static int num_threads;

/* Called with the GIL held at import, before any kernel runs, so no locking is needed.
 * Only tables this CPU supports are filled: each rv_fill_ops_<isa> is compiled with its ISA's
 * flags, and the compiler does use them there (gcc stores the pointers with ymm/zmm moves),
 * so calling it on an older CPU would be an illegal instruction at import. */
static void fill_tables(void)
{
    if (tables_filled)
        return;
    rv_fill_ops_scalar(&tables[RV_ISA_ID_SCALAR]);
#ifdef RUVPY_BUILD_AVX2
    if (rv_isa_supported(RV_ISA_ID_AVX2))
        rv_fill_ops_avx2(&tables[RV_ISA_ID_AVX2]);
#endif
#ifdef RUVPY_BUILD_AVX512
    if (rv_isa_supported(RV_ISA_ID_AVX512))
        rv_fill_ops_avx512(&tables[RV_ISA_ID_AVX512]);
#endif
#ifdef RUVPY_BUILD_AVX512VNNI
    if (rv_isa_supported(RV_ISA_ID_AVX512VNNI))
        rv_fill_ops_avx512vnni(&tables[RV_ISA_ID_AVX512VNNI]);
#endif
#ifdef RUVPY_BUILD_NEON
    if (rv_isa_supported(RV_ISA_ID_NEON))
        rv_fill_ops_neon(&tables[RV_ISA_ID_NEON]);
#endif
    tables_filled = 1;
}

const rv_ops *rv_ops_for(int isa)
{
    fill_tables();
    return rv_isa_supported(isa) ? &tables[isa] : NULL;
}

int rv_set_active_isa(int isa)
{
    const rv_ops *ops = rv_ops_for(isa);
    if (!ops)
        return -1;
    active = ops;
    return 0;
}

const rv_ops *rv_active_ops(void)
{
    if (!active)
        rv_set_active_isa(rv_best_isa());
    return active;
}

void rv_set_num_threads(int n) { num_threads = n > 0 ? n : 0; }
int rv_get_num_threads(void) { return num_threads; }
