// The instruction-set copies of the element-wise loops: GCC target_clones compiles one copy per instruction set and
// picks one at load time for the CPU, so one library runs on AVX-512, AVX2-only and baseline x86-64 hosts.
// MSDET_CLONES picks by extension (AVX-512F, AVX2, baseline); MSDET_CLONES_LEVEL by x86-64 ISA level (v4, v3,
// baseline), for code that some VMs, which report no CPU model, would otherwise run as baseline.
// Built with MSDET_NO_AVX512 (MSDET_KERNEL_ISA=avx2, msdet/kernels/build.py, which also passes -mno-avx512f) the
// AVX-512 copies are left out; off x86-64 (aarch64) there are no copies.
#pragma once

#if defined(__x86_64__) && defined(MSDET_NO_AVX512)
#define MSDET_CLONES __attribute__((target_clones("avx2", "default")))
#define MSDET_CLONES_LEVEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__)
#define MSDET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define MSDET_CLONES_LEVEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MSDET_CLONES
#define MSDET_CLONES_LEVEL
#endif
