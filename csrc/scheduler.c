/*
 * scheduler.c -- choose the backend of a new flow.
 *
 * Policy lives in Python: it computes each service's table (the eligible
 * backends for rr, the weighted sequence for wrr, the bucket table for sh,
 * the Maglev lookup table) and republishes it when health or weights change.
 * Here we only index into that table, except for lc, which needs the live
 * per-backend flow counts only the data path has.
 */
#include "internal.h"

/* Least connections as IPVS weighs them: (active * 256 + inactive) per
 * unit of weight.  Counting closing flows too spreads short sessions, which
 * are all inactive by the time the next one comes; active ones still
 * dominate.  Skips `exclude` and, when `alive` is given, backends that are
 * not alive. */
static int least_connections(struct nl_lb *lb, const struct nl_service *svc,
                             uint32_t exclude, const uint8_t *alive)
{
    int best = -1;
    int64_t best_load = 0;
    uint32_t best_weight = 1;
    for (uint32_t i = 0; i < svc->n_backends; i++) {
        const struct nl_backend_spec *b = &svc->backends[i];
        if (!(b->flags & NL_BE_ELIGIBLE) || b->weight == 0 || b->id == exclude ||
            (alive && !alive[b->id]))
            continue;
        int64_t load = __atomic_load_n(&lb->active[b->id], __ATOMIC_RELAXED) * 256 +
                       __atomic_load_n(&lb->inactive[b->id], __ATOMIC_RELAXED);
        /* load/w < best_load/best_w without division */
        if (best < 0 || load * best_weight < best_load * b->weight) {
            best = (int)i;
            best_load = load;
            best_weight = b->weight;
        }
    }
    return best;
}

static uint32_t first_slot(struct nl_lb *lb, const struct nl_service *svc,
                           const struct nl_pkt *p)
{
    /* Cluster services hash alike on every node (see cluster.c). */
    uint32_t seed = nl_svc_cluster(svc) ? NL_CLUSTER_SEED : lb->sched_seed;
    switch (svc->spec.scheduler) {
    case NL_SCHED_SH:
        return nl_addr_hash(&p->saddr, seed) % svc->table_len;
    case NL_SCHED_MAGLEV:
        return nl_mix32(nl_addr_hash(&p->saddr, seed) ^ ((uint32_t)p->sport << 8) ^ p->proto)
               % svc->table_len;
    default: /* rr, wrr */
        return __atomic_fetch_add((uint32_t *)&svc->rr_cursor, 1, __ATOMIC_RELAXED)
               % svc->table_len;
    }
}

int nl_schedule(struct nl_lb *lb, const struct nl_service *svc, const struct nl_pkt *p)
{
    if (svc->spec.scheduler == NL_SCHED_LC)
        return least_connections(lb, svc, NL_NIL, NULL);
    if (svc->table_len == 0)
        return -1;
    return svc->table[first_slot(lb, svc, p)];
}

int nl_schedule_other(struct nl_lb *lb, const struct nl_service *svc, const struct nl_pkt *p,
                      uint32_t exclude, const uint8_t *alive)
{
    if (svc->spec.scheduler == NL_SCHED_LC)
        return least_connections(lb, svc, exclude, alive);
    if (svc->table_len == 0)
        return -1;
    /* Probe on from the usual slot, so a hashed flow still lands on a
     * stable choice among the survivors. */
    uint32_t slot = first_slot(lb, svc, p);
    for (uint32_t i = 0; i < svc->table_len; i++) {
        uint16_t idx = svc->table[(slot + i) % svc->table_len];
        uint32_t id = svc->backends[idx].id;
        if (id != exclude && alive[id])
            return idx;
    }
    return -1;
}
