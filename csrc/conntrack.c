/*
 * conntrack.c -- natlb's own connection tracking table.
 *
 * Theory of operation: entries live in one preallocated array (max_flows,
 * never grown) and are linked by index into hash chains; unused entries
 * form a free list.  A flow is reached from both directions through one
 * chain, because both directions are hashed on what they have in common,
 * (client address, client port, protocol).  That lets one spinlock stripe
 * cover a flow whichever queue/worker sees its packets, so two workers can
 * share the table without a global lock.
 *
 * Expiry is lazy (an expired entry is never matched) and reclaimed by
 * nl_ct_sweep, which workers call with a budget proportional to elapsed time.
 *
 * A full table (nl_ct_make_room, called by a new flow that found no free
 * entry) first frees the expired entries of the new flow's own bucket (its
 * own old tuple among them), then those of the next buckets at a shared
 * eviction cursor.  If none had expired, it evicts the least recently
 * active embryonic flow seen there (TCP before the handshake's last ACK,
 * UDP with no reply), as Linux conntrack's early_drop does with entries
 * that are not "assured" and IPVS's drop_entry with SYN_RECV ones.  A SYN
 * flood thus evicts its own entries, oldest first, and never an
 * established flow.  Other stripes are only ever try-locked here, since the
 * caller already holds one.
 *
 * TCP state machine (simplified from IPVS), one row per event:
 *     SYN (client)       -> SYN_SENT      timeout SYN
 *     SYN+ACK (server)   -> SYN_RECV      timeout SYN
 *     ACK in SYN_RECV    -> ESTABLISHED   timeout ESTABLISHED
 *     FIN (either side)  -> FIN           timeout FIN
 *     RST (either side)  -> CLOSE         timeout CLOSE
 * A data packet refreshes the timeout of the state it is in.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "internal.h"

int nl_ct_init(struct nl_ct *ct, uint32_t max_flows, const uint32_t *timeouts)
{
    memset(ct, 0, sizeof(*ct));
    if (max_flows == 0 || max_flows >= NL_NIL)
        return -1;
    uint32_t nb = 1;
    while (nb < max_flows && nb < (1u << 30))
        nb <<= 1;
    ct->flows = calloc(max_flows, sizeof(struct nl_flow));
    ct->buckets = malloc((size_t)nb * sizeof(uint32_t));
    if (!ct->flows || !ct->buckets) {
        nl_ct_fini(ct);
        return -1;
    }
    memset(ct->buckets, 0xff, (size_t)nb * sizeof(uint32_t));
    ct->n_buckets = nb;
    ct->max_flows = max_flows;
    for (uint32_t i = 0; i < max_flows; i++)
        ct->flows[i].next = (i + 1 < max_flows) ? i + 1 : NL_NIL;
    ct->free_head = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ct->seed = nl_mix32((uint32_t)ts.tv_nsec ^ (uint32_t)ts.tv_sec ^ (uint32_t)(uintptr_t)ct);
    pthread_spin_init(&ct->free_lock, PTHREAD_PROCESS_PRIVATE);
    for (int i = 0; i < NL_CT_STRIPES; i++)
        pthread_spin_init(&ct->stripes[i], PTHREAD_PROCESS_PRIVATE);
    memcpy(ct->timeout_ms, timeouts, sizeof(ct->timeout_ms));
    return 0;
}

void nl_ct_fini(struct nl_ct *ct)
{
    if (ct->store) {
        /* The arrays live in the file mapping; its owner unmaps it
         * (nl_ct_store_unmap, ctstore.c). */
        ct->flows = NULL;
        ct->buckets = NULL;
    }
    free(ct->flows);
    free(ct->buckets);
    ct->flows = NULL;
    ct->buckets = NULL;
}

struct nl_flow *nl_ct_find(struct nl_ct *ct, uint32_t bucket,
                           const struct nl_ct_key *k, uint32_t now)
{
    for (uint32_t i = ct->buckets[bucket]; i != NL_NIL; i = ct->flows[i].next) {
        struct nl_flow *f = &ct->flows[i];
        if (f->client_port != k->client_port || f->proto != k->proto ||
            !nl_addr_eq(&f->client_addr, k->client_addr))
            continue;
        if (k->reply ? (!nl_addr_eq(&f->backend_addr, k->other_addr) ||
                        f->backend_port != k->other_port)
                     : (!nl_addr_eq(&f->vip_addr, k->other_addr) ||
                        f->vip_port != k->other_port))
            continue;
        if (nl_time_before(f->expires_ms, now))
            return NULL;            /* expired: the sweeper will reclaim it */
        return f;
    }
    return NULL;
}

struct nl_flow *nl_ct_insert(struct nl_ct *ct, uint32_t bucket)
{
    pthread_spin_lock(&ct->free_lock);
    uint32_t i = ct->free_head;
    if (i != NL_NIL) {
        ct->free_head = ct->flows[i].next;
        ct->count++;
    }
    pthread_spin_unlock(&ct->free_lock);
    if (i == NL_NIL)
        return NULL;
    struct nl_flow *f = &ct->flows[i];
    memset(f, 0, sizeof(*f));
    f->next = ct->buckets[bucket];
    ct->buckets[bucket] = i;
    return f;
}

void nl_ct_free(struct nl_ct *ct, uint32_t *link)
{
    uint32_t i = *link;
    struct nl_flow *f = &ct->flows[i];
    if (ct->on_free)
        ct->on_free(ct->on_free_ctx, f);
    *link = f->next;
    f->state = NL_FS_FREE;
    pthread_spin_lock(&ct->free_lock);
    f->next = ct->free_head;
    ct->free_head = i;
    ct->count--;
    pthread_spin_unlock(&ct->free_lock);
}

uint32_t *nl_ct_link_of(struct nl_ct *ct, uint32_t bucket, uint32_t idx)
{
    for (uint32_t *link = &ct->buckets[bucket]; *link != NL_NIL;
         link = &ct->flows[*link].next)
        if (*link == idx)
            return link;
    return NULL;
}

void nl_ct_remove(struct nl_ct *ct, uint32_t bucket, struct nl_flow *f)
{
    uint32_t *link = nl_ct_link_of(ct, bucket, (uint32_t)(f - ct->flows));
    if (link)
        nl_ct_free(ct, link);
}

uint32_t nl_ct_flow_bucket(const struct nl_ct *ct, const struct nl_flow *f)
{
    struct nl_ct_key k = { .client_addr = &f->client_addr, .client_port = f->client_port,
                           .proto = f->proto };
    return nl_ct_bucket(ct, &k);
}

void nl_ct_tcp_update(struct nl_ct *ct, struct nl_flow *f, int reply,
                      uint8_t fl, uint32_t now)
{
    uint8_t s = f->state;
    if (fl & NL_TCP_RST)
        s = NL_FS_CLOSE;
    else if (fl & NL_TCP_FIN)
        s = (s == NL_FS_CLOSE) ? s : NL_FS_FIN;
    else if ((fl & NL_TCP_SYN) && (fl & NL_TCP_ACK) && reply && s == NL_FS_SYN_SENT)
        s = NL_FS_SYN_RECV;
    else if ((fl & NL_TCP_SYN) && !(fl & NL_TCP_ACK) && !reply && s == NL_FS_FREE)
        s = NL_FS_SYN_SENT;
    else if ((fl & NL_TCP_ACK) && !(fl & NL_TCP_SYN) && s == NL_FS_SYN_RECV && !reply)
        s = NL_FS_ESTABLISHED;
    f->state = s;
    f->expires_ms = now + nl_ct_tcp_timeout(ct, s);
}

/* An embryonic flow that could be evicted, noted while scanning. */
struct candidate {
    uint32_t bucket, idx, expires;
    int found;
};

/* Frees the expired entries of bucket b and, if c is given, notes the
 * least recently active embryonic flow in it.  The caller holds b's stripe. */
static uint32_t scan_bucket(struct nl_ct *ct, uint32_t b, uint32_t now, struct candidate *c)
{
    uint32_t freed = 0;
    uint32_t *link = &ct->buckets[b];
    while (*link != NL_NIL) {
        struct nl_flow *f = &ct->flows[*link];
        if (nl_time_before(f->expires_ms, now)) {
            nl_ct_free(ct, link);
            freed++;
            continue;
        }
        if (c && nl_flow_embryonic(f) &&
            (!c->found || nl_time_before(f->expires_ms, c->expires)))
            *c = (struct candidate){ b, *link, f->expires_ms, 1 };
        link = &f->next;
    }
    return freed;
}

#define EVICT_SCAN 8             /* buckets looked at, as Linux's early_drop */
#define EVICT_SCAN_MAX 64        /* ... or more while none was evictable    */

static void ct_count(struct nl_ct *ct, int which, uint64_t n)
{
    __atomic_fetch_add(&ct->counters[which], n, __ATOMIC_RELAXED);
}

/* Evicts the candidate if it is still the flow that was noted. */
static int evict(struct nl_ct *ct, pthread_spinlock_t *own, const struct candidate *c)
{
    pthread_spinlock_t *l = nl_ct_stripe(ct, c->bucket);
    if (l != own && pthread_spin_trylock(l) != 0)
        return 0;
    int done = 0;
    uint32_t *link = nl_ct_link_of(ct, c->bucket, c->idx);
    if (link) {
        struct nl_flow *f = &ct->flows[c->idx];
        if (nl_flow_embryonic(f) && f->expires_ms == c->expires) {
            ct_count(ct, f->proto == NL_IPPROTO_TCP ? NL_C_EVICTED_TCP : NL_C_EVICTED_UDP, 1);
            nl_ct_free(ct, link);
            done = 1;
        }
    }
    if (l != own)
        pthread_spin_unlock(l);
    return done;
}

int nl_ct_make_room(struct nl_ct *ct, uint32_t bucket, uint32_t now)
{
    pthread_spinlock_t *own = nl_ct_stripe(ct, bucket);
    struct candidate c = { 0 };
    uint32_t freed = scan_bucket(ct, bucket, now, &c);
    uint32_t start = __atomic_fetch_add(&ct->evict_cursor, EVICT_SCAN, __ATOMIC_RELAXED);
    for (uint32_t n = 0; !freed && n < EVICT_SCAN_MAX && n < ct->n_buckets; n++) {
        if (n >= EVICT_SCAN && c.found)
            break;
        uint32_t b = (start + n) & (ct->n_buckets - 1);
        if (b == bucket || __atomic_load_n(&ct->buckets[b], __ATOMIC_RELAXED) == NL_NIL)
            continue;
        pthread_spinlock_t *l = nl_ct_stripe(ct, b);
        if (l != own && pthread_spin_trylock(l) != 0)
            continue;               /* busy: never wait while holding `own` */
        freed += scan_bucket(ct, b, now, &c);
        if (l != own)
            pthread_spin_unlock(l);
    }
    if (freed) {
        ct_count(ct, NL_C_RECLAIMED, freed);
        return 1;
    }
    return c.found && evict(ct, own, &c);
}

uint32_t nl_ct_expire(struct nl_ct *ct, uint32_t now, uint32_t max_buckets)
{
    uint32_t freed = 0;
    if (max_buckets > ct->n_buckets)
        max_buckets = ct->n_buckets;
    uint32_t start = __atomic_fetch_add(&ct->sweep_cursor, max_buckets, __ATOMIC_RELAXED);
    for (uint32_t n = 0; n < max_buckets; n++) {
        uint32_t b = (start + n) & (ct->n_buckets - 1);
        if (__atomic_load_n(&ct->buckets[b], __ATOMIC_RELAXED) == NL_NIL)
            continue;
        pthread_spinlock_t *l = nl_ct_stripe(ct, b);
        pthread_spin_lock(l);
        freed += scan_bucket(ct, b, now, NULL);
        pthread_spin_unlock(l);
    }
    return freed;
}
