/*
 * check.c -- the conntrack's invariants, checked from tests and fuzzers
 * (natlb_test.h).  Never called on the data path.
 *
 * Every entry is on exactly one list: a hash chain (in use) or the free
 * list.  A chained entry hashes to its chain, is in a live state that fits
 * its protocol, and counts once in its backend's active or inactive gauge
 * (expired but unswept entries included: only the sweep or a removal takes
 * them out).
 */
#include <stdlib.h>
#include <string.h>
#include "internal.h"
#include "natlb_test.h"

static int valid_state(const struct nl_flow *f)
{
    if (f->proto == NL_IPPROTO_UDP)
        return f->state == NL_FS_UDP;
    return f->proto == NL_IPPROTO_TCP && f->state >= NL_FS_SYN_SENT && f->state <= NL_FS_CLOSE;
}

static int check_chains(struct nl_lb *lb, uint8_t *seen, int64_t *gauges)
{
    const struct nl_ct *ct = &lb->ct;
    uint32_t chained = 0;
    for (uint32_t b = 0; b < ct->n_buckets; b++) {
        for (uint32_t i = ct->buckets[b]; i != NL_NIL; i = ct->flows[i].next) {
            if (i >= ct->max_flows)
                return NL_CHECK_LINK;
            if (seen[i]++)
                return NL_CHECK_CYCLE;
            const struct nl_flow *f = &ct->flows[i];
            if (nl_ct_flow_bucket(ct, f) != b)
                return NL_CHECK_BUCKET;
            if (!valid_state(f))
                return NL_CHECK_STATE;
            if (f->service_id >= lb->cfg.max_services || f->backend_id >= lb->cfg.max_backends ||
                f->tries == 0)
                return NL_CHECK_IDS;
            gauges[f->backend_id + (nl_flow_closing(f->state) ? lb->cfg.max_backends : 0)]++;
            chained++;
        }
    }
    return chained == ct->count ? NL_CHECK_OK : NL_CHECK_COUNT;
}

static int check_free_list(const struct nl_ct *ct, uint8_t *seen)
{
    uint32_t n = 0;
    for (uint32_t i = ct->free_head; i != NL_NIL; i = ct->flows[i].next) {
        if (i >= ct->max_flows)
            return NL_CHECK_LINK;
        if (seen[i]++)
            return NL_CHECK_CYCLE;
        if (ct->flows[i].state != NL_FS_FREE)
            return NL_CHECK_STATE;
        n++;
    }
    return ct->count + n == ct->max_flows ? NL_CHECK_OK : NL_CHECK_COUNT;
}

/* Compared as whole arrays: equal to counts, so never negative either. */
static int check_gauges(struct nl_lb *lb, const int64_t *gauges)
{
    size_t size = lb->cfg.max_backends * sizeof(int64_t);
    if (memcmp(lb->active, gauges, size) != 0 ||
        memcmp(lb->inactive, gauges + lb->cfg.max_backends, size) != 0)
        return NL_CHECK_GAUGE;
    return NL_CHECK_OK;
}

int nl_ct_check(struct nl_lb *lb)
{
    uint8_t *seen = calloc(lb->ct.max_flows, 1);
    int64_t *gauges = calloc(2 * (size_t)lb->cfg.max_backends, sizeof(int64_t));
    int r = NL_CHECK_OK;
    if (!seen || !gauges)
        r = NL_CHECK_NOMEM;
    else if ((r = check_chains(lb, seen, gauges)) == NL_CHECK_OK &&
        (r = check_free_list(&lb->ct, seen)) == NL_CHECK_OK)
        r = check_gauges(lb, gauges);
    free(seen);
    free(gauges);
    return r;
}
