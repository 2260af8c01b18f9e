/* CPU feature detection and the choice of code path (cpuid on x86, getauxval on Linux/Android
 * ARM64, sysctl on macOS). */
#include <stdio.h>
#include <string.h>

#include "kernel.h"

#if defined(POCKETLM_X86)
#include <cpuid.h>
#endif
#if defined(POCKETLM_ARM64) && defined(__linux__)
#include <sys/auxv.h>
#ifndef AT_HWCAP2 /* old bionic/glibc headers */
#define AT_HWCAP2 26
#endif
#endif
#if defined(POCKETLM_ARM64) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

typedef struct {
    int avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni;
    int neon, dotprod, i8mm;
} cpu_caps;

static cpu_caps CAPS;
static int CAPS_READY;

#if defined(POCKETLM_X86)
static unsigned long long xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static void detect(cpu_caps *c) {
    unsigned int a, b, cx, d;
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return;
    const int osxsave = (cx >> 27) & 1;
    const int fma = (cx >> 12) & 1, f16c = (cx >> 29) & 1, avx = (cx >> 28) & 1;
    if (!osxsave || !avx) return;
    const unsigned long long xcr0 = xgetbv0();
    const int os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xE6) == 0xE6;
    if (!os_avx || __get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, cx, d);
    c->fma = fma;
    c->f16c = f16c;
    c->avx2 = (b >> 5) & 1;
    if (os_avx512) {
        c->avx512f = (b >> 16) & 1;
        c->avx512bw = (b >> 30) & 1;
        c->avx512vl = (b >> 31) & 1;
        c->avx512vnni = (cx >> 11) & 1;
    }
}
#elif defined(POCKETLM_ARM64)
static void detect(cpu_caps *c) {
    c->neon = 1; /* mandatory on AArch64 */
#if defined(__linux__)
    /* HWCAP_ASIMDDP = 1 << 20 in AT_HWCAP, HWCAP2_I8MM = 1 << 13 in AT_HWCAP2 (Linux, Android) */
    c->dotprod = (getauxval(AT_HWCAP) >> 20) & 1;
    c->i8mm = (getauxval(AT_HWCAP2) >> 13) & 1;
#elif defined(__APPLE__)
    int v = 0;
    size_t len = sizeof(v);
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) == 0) c->dotprod = v;
    v = 0;
    len = sizeof(v);
    if (sysctlbyname("hw.optional.arm.FEAT_I8MM", &v, &len, NULL, 0) == 0) c->i8mm = v;
#endif
}
#else
static void detect(cpu_caps *c) { (void)c; }
#endif

static const cpu_caps *caps(void) {
    if (!CAPS_READY) {
        detect(&CAPS);
        CAPS_READY = 1;
    }
    return &CAPS;
}

const char *cpu_features_string(void) {
    static char buf[256];
    const cpu_caps *c = caps();
    buf[0] = 0;
#define ADD(flag, name)                                                                            \
    if (c->flag) strcat(buf, buf[0] ? " " name : name);
    ADD(avx2, "avx2") ADD(fma, "fma") ADD(f16c, "f16c") ADD(avx512f, "avx512f") ADD(avx512bw, "avx512bw")
    ADD(avx512vl, "avx512vl") ADD(avx512vnni, "avx512vnni") ADD(neon, "neon") ADD(dotprod, "dotprod")
    ADD(i8mm, "i8mm")
#undef ADD
    return buf;
}

typedef struct {
    const kernel_path *path;
    int (*usable)(const cpu_caps *);
} path_entry;

static int always(const cpu_caps *c) { (void)c; return 1; }
#if defined(POCKETLM_X86)
static int has_avx2(const cpu_caps *c) { return c->avx2 && c->fma && c->f16c; }
static int has_avx512(const cpu_caps *c) {
    return has_avx2(c) && c->avx512f && c->avx512bw && c->avx512vl && c->avx512vnni;
}
#endif
#if defined(POCKETLM_ARM64)
static int has_dotprod(const cpu_caps *c) { return c->dotprod; }
static int has_i8mm(const cpu_caps *c) { return c->dotprod && c->i8mm; }
#endif

/* Slowest first; the best usable one is the default. */
static const path_entry PATHS[] = {
    {&path_scalar, always},
#if defined(POCKETLM_X86)
    {&path_avx2, has_avx2},
    {&path_avx512, has_avx512},
#endif
#if defined(POCKETLM_ARM64)
    {&path_neon, always},
    {&path_neon_dotprod, has_dotprod},
    {&path_neon_i8mm, has_i8mm},
#endif
};
#define N_PATHS ((int)(sizeof(PATHS) / sizeof(PATHS[0])))

static const path_entry *find(const char *name) {
    for (int i = 0; i < N_PATHS; i++)
        if (strcmp(PATHS[i].path->name, name) == 0) return &PATHS[i];
    return NULL;
}

const char *path_static_name(const char *name) {
    const path_entry *e = find(name);
    return e ? e->path->name : NULL;
}

int path_available(const char *name) {
    const path_entry *e = find(name);
    return e && e->usable(caps());
}

#if defined(POCKETLM_X86)
int cpu_has_avx2(void) {
    static int cached = -1; /* a benign race: every thread computes the same value */
    if (cached < 0) cached = path_available("avx2");
    return cached;
}

int cpu_has_avx512(void) {
    static int cached = -1;
    if (cached < 0) cached = path_available("avx512");
    return cached;
}
#endif

const char *available_paths_string(void) {
    static char buf[256];
    buf[0] = 0;
    for (int i = 0; i < N_PATHS; i++)
        if (PATHS[i].usable(caps())) {
            if (buf[0]) strcat(buf, " ");
            strcat(buf, PATHS[i].path->name);
        }
    return buf;
}

const char *best_path_name(void) {
    for (int i = N_PATHS - 1; i >= 0; i--)
        if (PATHS[i].usable(caps())) return PATHS[i].path->name;
    return "scalar";
}

const dot2x2_fn *path_table2x2(const char *name) {
    const path_entry *e = find(name);
    return e && e->usable(caps()) ? e->path->dot2x2 : NULL;
}

const gemm_kernel *path_gemm(const char *name) {
    const path_entry *e = find(name);
    return e && e->usable(caps()) ? e->path->gemm : NULL;
}

/* Tables resolved once: missing entries come from the fallback chain; each slot's
 * multi-activation kernel from the path itself if it has one (written to reproduce the resolved
 * dot), else from the path its dot comes from. */
static dot_fn TABLES[sizeof(PATHS) / sizeof(PATHS[0])][N_SLOTS];
static acts_table ACTS_TABLES[sizeof(PATHS) / sizeof(PATHS[0])];

const acts_table *path_acts_table(const dot_fn *table) {
    for (int i = 0; i < N_PATHS; i++)
        if (table == TABLES[i]) return &ACTS_TABLES[i];
    return NULL;
}

const dot_fn *path_table(const char *name) {
    const path_entry *e = find(name);
    if (!e || !e->usable(caps())) return NULL;
    dot_fn *t = TABLES[e - PATHS];
    acts_table *at = &ACTS_TABLES[e - PATHS];
    for (int s = 0; s < N_SLOTS; s++) {
        const kernel_path *p = e->path;
        while (p && !p->dot[s]) p = p->fallback ? find(p->fallback)->path : NULL;
        t[s] = p ? p->dot[s] : path_scalar.dot[s];
        const kernel_path *ap = e->path->dotacts[s] ? e->path : p; /* whose multi-activation kernel */
        at->fn[s] = ap ? ap->dotacts[s] : NULL;
        at->gemm_from[s] = ap && ap->acts_gemm_from[s] ? ap->acts_gemm_from[s] : GEMM_MIN_M;
        at->matvec[s] = at->fn[s] && ap->acts_matvec[s];
    }
    return t;
}
