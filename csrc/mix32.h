/*
 * mix32.h -- the one 32-bit hash finalizer, for the C core (internal.h) and
 * the tc program (bpf/fastpath.bpf.c) alike: a flow's sh or maglev backend
 * must be the same whoever places its first packet, so both hash with this
 * very code.  Kernel types only, so that clang -target bpf can include it.
 */
#ifndef NL_MIX32_H
#define NL_MIX32_H
#include <linux/types.h>

/* MurmurHash3's fmix32: every input bit affects every output bit, so seeded
 * hashes of addresses and ports spread evenly. */
static inline __attribute__((always_inline)) __u32 nl_mix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

#endif
