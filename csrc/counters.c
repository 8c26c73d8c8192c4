/*
 * counters.c -- reading what the data path counted, for the control plane.
 *
 * Traffic counters live in one block per worker (plus one for callers
 * outside the workers), so no cache line is shared on the hot path; they are
 * summed here, when read.  Never called per packet.
 */
#include <string.h>
#include "internal.h"

static void sum_counters(struct nl_lb *lb, int backends, struct nl_counters *out, uint32_t n)
{
    memset(out, 0, n * sizeof(*out));
    for (uint32_t w = 0; w <= lb->cfg.n_workers; w++) {
        const struct nl_counters *src =
            backends ? lb->counters[w].backends : lb->counters[w].services;
        for (uint32_t i = 0; i < n; i++) {
            out[i].packets_in += src[i].packets_in;
            out[i].bytes_in += src[i].bytes_in;
            out[i].packets_out += src[i].packets_out;
            out[i].bytes_out += src[i].bytes_out;
            out[i].new_flows += src[i].new_flows;
        }
    }
}

void nl_read_services(struct nl_lb *lb, struct nl_counters *out, uint32_t n)
{
    if (n > lb->cfg.max_services) {
        memset(out + lb->cfg.max_services, 0, (n - lb->cfg.max_services) * sizeof(*out));
        n = lb->cfg.max_services;
    }
    sum_counters(lb, 0, out, n);
}

void nl_read_backends(struct nl_lb *lb, struct nl_counters *out, uint32_t n)
{
    if (n > lb->cfg.max_backends) {
        memset(out + lb->cfg.max_backends, 0, (n - lb->cfg.max_backends) * sizeof(*out));
        n = lb->cfg.max_backends;
    }
    sum_counters(lb, 1, out, n);
    for (uint32_t i = 0; i < n; i++) {
        out[i].active_flows = __atomic_load_n(&lb->active[i], __ATOMIC_RELAXED);
        out[i].inactive_flows = __atomic_load_n(&lb->inactive[i], __ATOMIC_RELAXED);
    }
}

void nl_read_reasons(struct nl_lb *lb, uint64_t *out)
{
    memset(out, 0, NL_R_MAX * sizeof(uint64_t));
    for (uint32_t w = 0; w <= lb->cfg.n_workers; w++)
        for (int r = 0; r < NL_R_MAX; r++)
            out[r] += lb->counters[w].reasons[r];
}

void nl_read_io(struct nl_lb *lb, uint64_t *packets, uint64_t *batches)
{
    *packets = *batches = 0;
    for (uint32_t w = 0; w <= lb->cfg.n_workers; w++) {
        *packets += lb->counters[w].io_packets;
        *batches += lb->counters[w].io_batches;
    }
}

void nl_seed_counters(struct nl_lb *lb, uint32_t backend, uint32_t id,
                      const struct nl_counters *c)
{
    if (id >= (backend ? lb->cfg.max_backends : lb->cfg.max_services))
        return;
    /* The block of callers outside the workers: it is summed like theirs. */
    struct nl_worker_counters *wc = &lb->counters[lb->cfg.n_workers];
    struct nl_counters *t = backend ? &wc->backends[id] : &wc->services[id];
    __atomic_fetch_add(&t->packets_in, c->packets_in, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->bytes_in, c->bytes_in, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->packets_out, c->packets_out, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->bytes_out, c->bytes_out, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->new_flows, c->new_flows, __ATOMIC_RELAXED);
}

void nl_read_conntrack(struct nl_lb *lb, uint64_t *out)
{
    for (int i = 0; i < NL_C_MAX; i++)
        out[i] = __atomic_load_n(&lb->ct.counters[i], __ATOMIC_RELAXED);
}

uint32_t nl_ct_count(struct nl_lb *lb)
{
    return __atomic_load_n(&lb->ct.count, __ATOMIC_RELAXED);
}

uint32_t nl_ct_entry_size(void)
{
    return (uint32_t)sizeof(struct nl_flow);
}

uint64_t nl_ct_memory(struct nl_lb *lb)
{
    return (uint64_t)lb->ct.max_flows * sizeof(struct nl_flow) +
           (uint64_t)lb->ct.n_buckets * sizeof(uint32_t);
}
