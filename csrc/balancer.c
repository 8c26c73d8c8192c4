/*
 * balancer.c -- the nl_lb object: creating and destroying it, and the entry
 * points for callers outside the worker threads (tests, tools, the control
 * plane driving time).  Each such call takes the extra epoch slot for its
 * length (snapshot.c), so it may run while the workers do.
 */
#include <stdlib.h>
#include <string.h>
#include "internal.h"
#include "natlb_test.h"

/* What the lb keeps about a flow the table frees: its gauge, its held SYN. */
static void release_flow(void *ctx, struct nl_flow *f)
{
    struct nl_lb *lb = ctx;
    nl_flow_gauge(lb, f, f->state, -1);
    nl_drop_held(lb, f);
}

struct nl_lb *nl_create(const struct nl_config *cfg)
{
    /* Deadlines are compared as wrapping 32-bit ms: keep them below 2^30. */
    if (!cfg || cfg->n_workers > NL_MAX_WORKERS || cfg->max_flows == 0 ||
        cfg->resteer_tries == 0 || cfg->resteer_tries > 255 ||
        cfg->syn_timeout_ms > 0x3fffffffu ||
        cfg->max_services == 0 || cfg->max_services > NL_MAX_SERVICES ||
        cfg->max_backends == 0 || cfg->max_backends > NL_MAX_BACKENDS)
        return NULL;
    for (int i = 0; i < NL_T_MAX; i++)
        if (cfg->timeout_ms[i] == 0 || cfg->timeout_ms[i] > 0x3fffffffu)
            return NULL;
    if (cfg->max_fragments > (1u << 24) ||
        (cfg->max_fragments && (cfg->fragment_timeout_ms == 0 ||
                                cfg->fragment_timeout_ms > 0x3fffffffu)))
        return NULL;
    struct nl_lb *lb = calloc(1, sizeof(*lb));
    if (!lb)
        return NULL;
    lb->cfg = *cfg;
    lb->counters = calloc(cfg->n_workers + 1, sizeof(struct nl_worker_counters));
    /* One block for every worker's id-indexed counters: calloc'd, so the
     * pages of ids never used are never touched. */
    uint32_t per_worker = cfg->max_services + cfg->max_backends;
    lb->counter_slots = calloc((size_t)(cfg->n_workers + 1) * per_worker,
                               sizeof(struct nl_counters));
    for (uint32_t w = 0; lb->counters && lb->counter_slots && w <= cfg->n_workers; w++) {
        lb->counters[w].services = lb->counter_slots + (size_t)w * per_worker;
        lb->counters[w].backends = lb->counters[w].services + cfg->max_services;
    }
    lb->active = calloc(cfg->max_backends, sizeof(int64_t));
    lb->inactive = calloc(cfg->max_backends, sizeof(int64_t));
    if (!lb->counters || !lb->counter_slots || !lb->active || !lb->inactive ||
        nl_snapshots_init(lb) < 0 ||
        nl_failover_init(lb) < 0 || nl_io_init(lb) < 0 ||
        nl_ct_init(&lb->ct, cfg->max_flows, cfg->timeout_ms) < 0 || nl_frag_init(lb) < 0) {
        nl_destroy(lb);
        return NULL;
    }
    lb->sched_seed = lb->ct.seed * 0x9e3779b1u + 1;
    lb->ct.on_free = release_flow;
    lb->ct.on_free_ctx = lb;
    return lb;
}

void nl_destroy(struct nl_lb *lb)
{
    if (!lb)
        return;
    nl_stop(lb);
    nl_snapshots_fini(lb);
    nl_ct_fini(&lb->ct);
    if (lb->ct.store)
        nl_ct_store_unmap(&lb->ct);
    nl_failover_fini(lb);
    nl_frag_fini(lb);
    nl_io_fini(lb);
    free(lb->counters);
    free(lb->counter_slots);
    free(lb->active);
    free(lb->inactive);
    free(lb);
}

int nl_process_id(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                  uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id)
{
    nl_ext_enter(lb);
    int v = nl_packet(lb, worker, pkt, len, pkt_flags, now_ms, packet_id, NULL);
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return v;
}

int nl_process(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
               uint32_t pkt_flags, uint64_t now_ms)
{
    return nl_process_id(lb, worker, pkt, len, pkt_flags, now_ms, NL_NO_PACKET_ID);
}

int nl_decide_id(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                 uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark)
{
    nl_ext_enter(lb);
    int v = nl_packet(lb, worker, pkt, len, pkt_flags, now_ms, packet_id, mark);
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return v;
}

int nl_decide(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t *mark)
{
    return nl_decide_id(lb, worker, pkt, len, pkt_flags, now_ms, NL_NO_PACKET_ID, mark);
}

int nl_observe(struct nl_lb *lb, uint8_t *pkt, uint32_t len, uint32_t pkt_flags,
               uint64_t now_ms)
{
    nl_ext_enter(lb);
    int applied = nl_observed(lb, lb->cfg.n_workers, pkt, len, pkt_flags, now_ms);
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return applied;
}

int nl_observe_new(struct nl_lb *lb, uint8_t *pkt, uint32_t len, uint32_t pkt_flags,
                   uint32_t backend_id, uint32_t sent_csum, uint64_t placed_ms,
                   uint64_t now_ms)
{
    nl_ext_enter(lb);
    int applied = nl_observed_new(lb, lb->cfg.n_workers, pkt, len, pkt_flags, backend_id,
                                  sent_csum, placed_ms, now_ms);
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return applied;
}

uint32_t nl_retry_deferred(struct nl_lb *lb, uint64_t now_ms)
{
    nl_ext_enter(lb);
    uint32_t sent = nl_deferred_retry(lb, now_ms);
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return sent;
}

uint32_t nl_process_many(struct nl_lb *lb, uint32_t worker, uint8_t *bufs, uint32_t stride,
                         const uint32_t *lens, uint8_t *verdicts, uint32_t n,
                         uint32_t pkt_flags, uint64_t now_ms)
{
    uint32_t rewritten = 0;
    struct nl_batch_pkt chunk[256];
    nl_ext_enter(lb);
    for (uint32_t i = 0; i < n; i += 256) {
        uint32_t m = n - i < 256 ? n - i : 256;
        for (uint32_t j = 0; j < m; j++)
            chunk[j] = (struct nl_batch_pkt){ .pkt = bufs + (size_t)(i + j) * stride,
                                              .len = lens[i + j], .pkt_flags = pkt_flags,
                                              .packet_id = NL_NO_PACKET_ID };
        nl_packets(lb, worker, chunk, m, now_ms, 0);
        for (uint32_t j = 0; j < m; j++) {
            verdicts[i + j] = (uint8_t)chunk[j].verdict;
            rewritten += chunk[j].verdict == NL_VERDICT_REWRITE;
        }
    }
    nl_ext_exit(lb);
    nl_event_signal(lb);
    return rewritten;
}

uint32_t nl_ct_sweep(struct nl_lb *lb, uint64_t now_ms, uint32_t max_buckets)
{
    return nl_ct_expire(&lb->ct, (uint32_t)now_ms, max_buckets);
}

void nl_failover_tick(struct nl_lb *lb, uint64_t now_ms)
{
    nl_ext_enter(lb);
    nl_failover_due(lb, now_ms);
    nl_ext_exit(lb);
    nl_event_signal(lb);
}

/* Flushes the outbox between chunks while workers run, so a big reset does
 * not overflow it (two RSTs per flow). */
#define RESET_CHUNK 1024

uint32_t nl_reset_backend(struct nl_lb *lb, uint32_t backend_id)
{
    uint32_t reset = 0;
    for (uint32_t b = 0; b < lb->ct.n_buckets; b += RESET_CHUNK) {
        reset += nl_reset_buckets(lb, backend_id, b, RESET_CHUNK);
        nl_io_flush(lb);
    }
    return reset;
}
