/*
 * fragtrack.c -- IP fragments follow their datagram's first fragment.
 *
 * Theory of operation.  Only a datagram's first fragment carries the ports
 * natlb balances on (and the L4 checksum, which covers the whole datagram).
 * The first fragment goes through the ordinary path (lb.c) and its verdict
 * -- pass, drop, or "write this address" -- is remembered here under the
 * datagram's identity (source, destination, protocol, IP id), which every
 * fragment carries.  Later fragments get that verdict: only their IP
 * address and IP checksum change (copy mode), or they get the same mark
 * and nftables writes the address (mark mode).  Nothing is reassembled.
 *
 * A fragment that arrives before its first is held: the caller gives no
 * verdict now (NL_VERDICT_HOLD), the packet stays in the kernel's queue
 * (mark mode; copy mode also keeps its bytes here), and when the first
 * fragment comes the held ones become releases that their worker answers
 * (nl_frag_take).  If it does not come within fragment_timeout_ms, they
 * are released as drops.
 *
 * Bounds (all preallocated except copy mode's held bytes, which have a
 * byte budget):
 *  - at most max_fragments datagrams; an entry ends when all the
 *    datagram's bytes have passed, or times out;
 *  - at most max_fragments/4 (at least 64) held fragments, 64 per datagram,
 *    and one source (by hash of its address) may hold at most an eighth of
 *    them, or 64; as many again may wait for their worker to answer them
 *    (released, not yet taken) -- a dropped one without its bytes;
 *  - eviction, oldest first, keeps working under a flood: a datagram whose
 *    first fragment was seen ("decided") may evict the oldest datagram
 *    still waiting for its first, then the oldest decided one; a fragment
 *    without its first may only evict the oldest waiting datagram.  So a
 *    flood of bogus later fragments can never push out datagrams whose
 *    first fragment came, and costs other sources only out-of-order
 *    fragments, and only once a whole buffer of them has turned over.
 *
 * Design taken from nfqueue-loadbalancer's fragtrack (key by the IP id,
 * store early fragments, preallocated pools, everything times out),
 * rewritten for natlb: one lock (fragmented traffic is rare), deferred
 * NFQUEUE verdicts instead of re-injecting through a tun device.
 *
 * IPv4 and IPv6 share the table: the key holds 128-bit addresses and a
 * 32-bit id (IPv6's fragment header carries one) and the family.  An IPv6
 * datagram's protocol in the key is its fragment header's next header,
 * which all its fragments carry alike.
 */
#include <stdlib.h>
#include <string.h>
#include "internal.h"
#include "natlb_test.h"

#define HELD_PER_DATAGRAM 64     /* a 64 KiB datagram in 1,280-byte pieces  */
#define HELD_BYTES_PER_SLOT 2048 /* copy mode byte budget per hold slot    */
#define SOURCES 256              /* source-address buckets for fair shares */

enum { FS_FREE, FS_WAITING, FS_DECIDED };

struct nl_frag {
    struct nl_frag_key key;
    struct nl_frag_verdict v;    /* FS_DECIDED                             */
    uint32_t next;               /* hash chain, or free list               */
    uint32_t older, newer;       /* its age list (waiting or decided)      */
    uint32_t expires_ms;
    uint32_t held_head, held_tail;
    uint32_t seen;               /* payload bytes passed or held           */
    uint32_t total;              /* payload bytes of the datagram: known
                                    from its last fragment, else 0         */
    uint8_t state;
    uint8_t n_held;
    uint8_t src;                 /* source bucket                          */
};

struct held {
    uint32_t next;               /* entry's held list, a ready list, or free */
    uint32_t packet_id;
    uint32_t len;
    uint8_t *bytes;              /* copy mode: the packet; mark mode: NULL  */
    uint8_t worker;
    uint8_t src;
    uint32_t verdict;            /* once released                          */
    struct nl_frag_verdict v;
};

struct age_list {
    uint32_t oldest, newest;
};

struct fifo {
    uint32_t head, tail;
};

struct nl_fragtrack {
    pthread_spinlock_t lock;
    uint32_t max;                /* entries; 0: fragments are dropped      */
    uint32_t timeout_ms;
    uint32_t seed;
    struct nl_frag *e;
    uint32_t *buckets;
    uint32_t mask;
    uint32_t free_head, count;
    struct age_list waiting, decided;
    struct held *h;              /* 2 * n_slots: held, then being answered */
    uint32_t n_slots;            /* bound on fragments held for a first    */
    uint32_t holding;            /* fragments held for a first now         */
    uint32_t held_free, held_used;
    uint64_t held_bytes, held_bytes_max;
    uint32_t src_cap;
    uint16_t src_held[SOURCES];
    struct fifo ready[NL_MAX_WORKERS + 1];
    uint64_t counters[NL_FR_MAX];
};

static inline uint16_t ld16(const uint8_t *p)
{
    return (uint16_t)(((uint32_t)p[0] << 8) | p[1]);
}

/* ---- lifetime ---------------------------------------------------------- */

int nl_frag_init(struct nl_lb *lb)
{
    struct nl_fragtrack *ft = calloc(1, sizeof(*ft));
    if (!ft)
        return -1;
    lb->ft = ft;
    pthread_spin_init(&ft->lock, PTHREAD_PROCESS_PRIVATE);
    for (uint32_t w = 0; w <= NL_MAX_WORKERS; w++)
        ft->ready[w].head = ft->ready[w].tail = NL_NIL;
    ft->waiting.oldest = ft->waiting.newest = NL_NIL;
    ft->decided.oldest = ft->decided.newest = NL_NIL;
    ft->free_head = ft->held_free = NL_NIL;
    ft->max = lb->cfg.max_fragments;
    ft->timeout_ms = lb->cfg.fragment_timeout_ms;
    if (!ft->max)
        return 0;
    uint32_t nb = 16;
    while (nb < ft->max)
        nb <<= 1;
    ft->mask = nb - 1;
    ft->seed = nl_mix32((uint32_t)(uintptr_t)ft ^ lb->ct.seed ^ 0x5f3759dfu);
    ft->n_slots = ft->max / 4 < HELD_PER_DATAGRAM ? HELD_PER_DATAGRAM : ft->max / 4;
    ft->src_cap = ft->n_slots / 8 < HELD_PER_DATAGRAM ? HELD_PER_DATAGRAM : ft->n_slots / 8;
    ft->held_bytes_max = (uint64_t)ft->n_slots * HELD_BYTES_PER_SLOT;
    ft->e = calloc(ft->max, sizeof(*ft->e));
    ft->buckets = malloc(nb * sizeof(uint32_t));
    ft->h = calloc(2 * (size_t)ft->n_slots, sizeof(*ft->h));
    if (!ft->e || !ft->buckets || !ft->h)
        return -1;
    memset(ft->buckets, 0xff, nb * sizeof(uint32_t));
    for (uint32_t i = ft->max; i-- > 0;) {
        ft->e[i].next = ft->free_head;
        ft->free_head = i;
    }
    for (uint32_t i = 2 * ft->n_slots; i-- > 0;) {
        ft->h[i].next = ft->held_free;
        ft->held_free = i;
    }
    return 0;
}

void nl_frag_fini(struct nl_lb *lb)
{
    struct nl_fragtrack *ft = lb->ft;
    if (!ft)
        return;
    for (uint32_t i = 0; ft->h && i < 2 * ft->n_slots; i++)
        free(ft->h[i].bytes);
    free(ft->e);
    free(ft->buckets);
    free(ft->h);
    pthread_spin_destroy(&ft->lock);
    free(ft);
    lb->ft = NULL;
}

/* ---- the table (caller holds ft->lock) --------------------------------- */

static uint32_t bucket_of(const struct nl_fragtrack *ft, const struct nl_frag_key *k)
{
    uint32_t h = ft->seed ^ k->id ^ ((uint32_t)k->proto << 24 | (uint32_t)k->family << 16);
    h = nl_addr_hash(&k->saddr, h);
    return nl_addr_hash(&k->daddr, h) & ft->mask;
}

static uint8_t source_of(const struct nl_fragtrack *ft, const struct nl_frag_key *k)
{
    return (uint8_t)nl_addr_hash(&k->saddr, ft->seed);
}

static int key_eq(const struct nl_frag_key *a, const struct nl_frag_key *b)
{
    return memcmp(a, b, sizeof(*a)) == 0;
}

static struct age_list *list_of(struct nl_fragtrack *ft, const struct nl_frag *e)
{
    return e->state == FS_WAITING ? &ft->waiting : &ft->decided;
}

static void age_append(struct nl_fragtrack *ft, uint32_t i)
{
    struct nl_frag *e = &ft->e[i];
    struct age_list *l = list_of(ft, e);
    e->older = l->newest;
    e->newer = NL_NIL;
    if (l->newest != NL_NIL)
        ft->e[l->newest].newer = i;
    else
        l->oldest = i;
    l->newest = i;
}

static void age_unlink(struct nl_fragtrack *ft, uint32_t i)
{
    struct nl_frag *e = &ft->e[i];
    struct age_list *l = list_of(ft, e);
    if (e->older != NL_NIL)
        ft->e[e->older].newer = e->newer;
    else
        l->oldest = e->newer;
    if (e->newer != NL_NIL)
        ft->e[e->newer].older = e->older;
    else
        l->newest = e->older;
}

/* Hands a held fragment its verdict and queues it for its worker. */
static void make_ready(struct nl_fragtrack *ft, uint32_t s, uint32_t verdict,
                       const struct nl_frag_verdict *v)
{
    struct held *h = &ft->h[s];
    h->verdict = verdict;
    if (v)
        h->v = *v;
    if (verdict == NL_VERDICT_REWRITE && h->bytes)
        nl_rewrite_addr(h->bytes, v->dst, &v->addr);
    else if (verdict == NL_VERDICT_REWRITE)
        h->verdict = NL_VERDICT_MARK;
    if (h->bytes && verdict != NL_VERDICT_REWRITE) {
        ft->held_bytes -= h->len;   /* the answer needs no bytes */
        free(h->bytes);
        h->bytes = NULL;
    }
    ft->src_held[h->src]--;
    ft->holding--;
    h->next = NL_NIL;
    struct fifo *q = &ft->ready[h->worker];
    if (q->tail != NL_NIL)
        ft->h[q->tail].next = s;
    else
        q->head = s;
    q->tail = s;
}

/* Releases every fragment held for entry i with verdict (DROP, or the
 * entry's own).  Returns how many. */
static uint32_t release_all(struct nl_fragtrack *ft, uint32_t i, uint32_t verdict)
{
    struct nl_frag *e = &ft->e[i];
    uint32_t n = 0;
    for (uint32_t s = e->held_head; s != NL_NIL; n++) {
        uint32_t next = ft->h[s].next;
        make_ready(ft, s, verdict, verdict == NL_VERDICT_DROP ? NULL : &e->v);
        s = next;
    }
    e->held_head = e->held_tail = NL_NIL;
    e->n_held = 0;
    return n;
}

/* Forgets entry i; its held fragments (if any) are dropped and counted
 * under `why`. */
static void forget(struct nl_fragtrack *ft, uint32_t i, int why)
{
    struct nl_frag *e = &ft->e[i];
    ft->counters[why] += release_all(ft, i, NL_VERDICT_DROP);
    uint32_t *link = &ft->buckets[bucket_of(ft, &e->key)];
    while (*link != i)
        link = &ft->e[*link].next;
    *link = e->next;
    age_unlink(ft, i);
    e->state = FS_FREE;
    e->next = ft->free_head;
    ft->free_head = i;
    ft->count--;
}

/* Times out what is due.  The lists are in expiry order. */
static void expire(struct nl_fragtrack *ft, uint32_t now)
{
    while (ft->waiting.oldest != NL_NIL &&
           !nl_time_before(now, ft->e[ft->waiting.oldest].expires_ms))
        forget(ft, ft->waiting.oldest, NL_FR_TIMEOUTS);
    while (ft->decided.oldest != NL_NIL &&
           !nl_time_before(now, ft->e[ft->decided.oldest].expires_ms)) {
        ft->counters[NL_FR_INCOMPLETE]++;
        forget(ft, ft->decided.oldest, NL_FR_TIMEOUTS);
    }
}

static uint32_t find(struct nl_fragtrack *ft, const struct nl_frag_key *k, uint32_t now)
{
    expire(ft, now);
    for (uint32_t i = ft->buckets[bucket_of(ft, k)]; i != NL_NIL; i = ft->e[i].next)
        if (key_eq(&ft->e[i].key, k))
            return i;
    return NL_NIL;
}

/* Evicts the oldest datagram still waiting for its first fragment, except
 * `keep`.  0 if there was none. */
static int evict_waiting(struct nl_fragtrack *ft, uint32_t keep)
{
    uint32_t i = ft->waiting.oldest;
    if (i == keep && i != NL_NIL)
        i = ft->e[i].newer;
    if (i == NL_NIL)
        return 0;
    ft->counters[NL_FR_OVERFLOW]++;
    forget(ft, i, NL_FR_HOLD_FULL);
    return 1;
}

/* A new entry for k in `state`, evicting as the policy above allows; NL_NIL
 * (counted) if there is no room. */
static uint32_t insert(struct nl_fragtrack *ft, const struct nl_frag_key *k, uint8_t state,
                       uint32_t now)
{
    if (ft->free_head == NL_NIL && !evict_waiting(ft, NL_NIL)) {
        if (state == FS_WAITING || ft->decided.oldest == NL_NIL) {
            ft->counters[NL_FR_OVERFLOW]++;
            return NL_NIL;
        }
        ft->counters[NL_FR_OVERFLOW]++;
        forget(ft, ft->decided.oldest, NL_FR_HOLD_FULL);
    }
    uint32_t i = ft->free_head;
    struct nl_frag *e = &ft->e[i];
    ft->free_head = e->next;
    memset(e, 0, sizeof(*e));
    e->key = *k;
    e->state = state;
    e->src = source_of(ft, k);
    e->held_head = e->held_tail = NL_NIL;
    e->expires_ms = now + ft->timeout_ms;
    uint32_t b = bucket_of(ft, k);
    e->next = ft->buckets[b];
    ft->buckets[b] = i;
    age_append(ft, i);
    ft->count++;
    ft->counters[NL_FR_DATAGRAMS]++;
    return i;
}

/* Adds `payload` bytes to entry i (the datagram's length is known from its
 * last fragment); forgets it once every byte has passed. */
static void account(struct nl_fragtrack *ft, uint32_t i, uint32_t payload, uint32_t end,
                    int last)
{
    struct nl_frag *e = &ft->e[i];
    e->seen += payload;
    if (last)
        e->total = end;
    if (e->state == FS_DECIDED && e->total && e->seen >= e->total)
        forget(ft, i, NL_FR_TIMEOUTS);
}

/* Keeps a copy (copy mode) or just the id (mark mode) of a fragment that
 * came before its first.  0, or -1 if there is no room for it. */
static int hold(struct nl_fragtrack *ft, uint32_t i, uint32_t worker, uint32_t packet_id,
                const uint8_t *pkt, uint32_t len, int mark_mode)
{
    struct nl_frag *e = &ft->e[i];
    if (packet_id == NL_NO_PACKET_ID || e->n_held >= HELD_PER_DATAGRAM ||
        ft->src_held[e->src] >= ft->src_cap)
        return -1;
    uint32_t need = mark_mode ? 0 : len;
    while (ft->holding >= ft->n_slots || ft->held_bytes + need > ft->held_bytes_max)
        if (!evict_waiting(ft, i))
            return -1;
    if (ft->held_free == NL_NIL)
        return -1;      /* the workers are behind with their answers */
    uint8_t *copy = NULL;
    if (!mark_mode && !(copy = malloc(len ? len : 1)))
        return -1;
    if (copy)
        memcpy(copy, pkt, len);
    uint32_t s = ft->held_free;
    struct held *h = &ft->h[s];
    ft->held_free = h->next;
    memset(h, 0, sizeof(*h));
    h->packet_id = packet_id;
    h->len = len;
    h->bytes = copy;
    h->worker = (uint8_t)worker;
    h->src = e->src;
    h->next = NL_NIL;
    if (e->held_tail != NL_NIL)
        ft->h[e->held_tail].next = s;
    else
        e->held_head = s;
    e->held_tail = s;
    e->n_held++;
    ft->src_held[e->src]++;
    ft->holding++;
    ft->held_used++;
    ft->held_bytes += need;
    ft->counters[NL_FR_HELD]++;
    return 0;
}

/* ---- the data path ----------------------------------------------------- */

void nl_frag_first(struct nl_lb *lb, const struct nl_frag_key *k,
                   const struct nl_frag_verdict *v, uint32_t payload_len, uint64_t now_ms)
{
    struct nl_fragtrack *ft = lb->ft;
    uint32_t now = (uint32_t)now_ms;
    if (!ft->max)
        return;
    pthread_spin_lock(&ft->lock);
    uint32_t i = find(ft, k, now);
    if (i == NL_NIL) {
        i = insert(ft, k, FS_DECIDED, now);
    } else {
        /* Waiting for this, or an IP id reused while the old datagram was
         * still incomplete: either way a fresh start in the decided list. */
        struct nl_frag *e = &ft->e[i];
        age_unlink(ft, i);
        if (e->state == FS_DECIDED)
            e->seen = e->total = 0;
        e->state = FS_DECIDED;
        e->expires_ms = now + ft->timeout_ms;
        age_append(ft, i);
    }
    if (i != NL_NIL) {
        ft->e[i].v = *v;
        ft->counters[NL_FR_RELEASED] += release_all(ft, i, (uint32_t)v->verdict);
        account(ft, i, payload_len, 0, 0);
    }
    pthread_spin_unlock(&ft->lock);
}

int nl_frag_follow(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                   const struct nl_pkt *p, int mark_mode, uint64_t now_ms, uint32_t packet_id,
                   uint32_t *mark)
{
    struct nl_fragtrack *ft = lb->ft;
    uint32_t now = (uint32_t)now_ms;
    uint32_t payload = p->frag_data;
    uint32_t end = p->frag_off + payload;
    int last = p->frag_last;
    uint32_t tot = (uint32_t)(p->family == 6 ? NL_IP6_HLEN + ld16(pkt + NL_OFF_IP6_PLEN)
                                             : ld16(pkt + NL_OFF_IP_TOT_LEN));
    struct nl_frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->frag_id,
                             .family = p->family, .proto = p->frag_nh };
    if (!ft->max) {
        __atomic_fetch_add(&ft->counters[NL_FR_UNTRACKED], 1, __ATOMIC_RELAXED);
        return NL_VERDICT_DROP;
    }
    pthread_spin_lock(&ft->lock);
    uint32_t i = find(ft, &k, now);
    if (i != NL_NIL && ft->e[i].state == FS_DECIDED) {
        struct nl_frag_verdict v = ft->e[i].v;
        ft->counters[NL_FR_FOLLOWED]++;
        account(ft, i, payload, end, last);
        pthread_spin_unlock(&ft->lock);
        if (v.verdict != NL_VERDICT_REWRITE)
            return v.verdict;
        nl_count_traffic(lb, worker, v.service_id, v.backend_id, tot, !v.dst);
        if (mark_mode) {
            *mark = v.mark;
            return NL_VERDICT_MARK;
        }
        nl_rewrite_addr(pkt, v.dst, &v.addr);
        return NL_VERDICT_REWRITE;
    }
    int created = i == NL_NIL;
    int verdict = NL_VERDICT_DROP;
    if (created) {
        /* Evict nobody for a fragment that could not be held anyway. */
        if (packet_id == NL_NO_PACKET_ID || ft->src_held[source_of(ft, &k)] >= ft->src_cap)
            ft->counters[NL_FR_HOLD_FULL]++;
        else
            i = insert(ft, &k, FS_WAITING, now);
    }
    if (i != NL_NIL) {
        if (hold(ft, i, worker, packet_id, pkt, len, mark_mode) == 0) {
            account(ft, i, payload, end, last);
            verdict = NL_VERDICT_HOLD;
        } else {
            ft->counters[NL_FR_HOLD_FULL]++;
            if (created) {
                ft->counters[NL_FR_DATAGRAMS]--;   /* never really tracked */
                forget(ft, i, NL_FR_HOLD_FULL);
            }
        }
    }
    pthread_spin_unlock(&ft->lock);
    return verdict;
}

int nl_frag_take(struct nl_lb *lb, uint32_t worker, struct nl_release *out, uint8_t *buf,
                 uint32_t cap)
{
    struct nl_fragtrack *ft = lb->ft;
    if (worker > NL_MAX_WORKERS)
        worker = NL_MAX_WORKERS;
    struct fifo *q = &ft->ready[worker];
    if (__atomic_load_n(&q->head, __ATOMIC_RELAXED) == NL_NIL)
        return 0;       /* the common case, without the lock */
    pthread_spin_lock(&ft->lock);
    uint32_t s = q->head;
    if (s == NL_NIL) {
        pthread_spin_unlock(&ft->lock);
        return 0;
    }
    struct held *h = &ft->h[s];
    q->head = h->next;
    if (q->head == NL_NIL)
        q->tail = NL_NIL;
    out->packet_id = h->packet_id;
    out->verdict = h->verdict;
    out->mark = h->verdict == NL_VERDICT_MARK ? h->v.mark : 0;
    out->len = 0;
    if (h->verdict == NL_VERDICT_REWRITE) {
        if (h->len <= cap) {
            memcpy(buf, h->bytes, h->len);
            out->len = h->len;
        } else {
            out->verdict = NL_VERDICT_DROP;
        }
    }
    struct nl_frag_verdict v = h->v;
    uint32_t len = h->len;
    if (h->bytes) {
        ft->held_bytes -= h->len;
        free(h->bytes);
        h->bytes = NULL;
    }
    h->next = ft->held_free;
    ft->held_free = s;
    ft->held_used--;
    pthread_spin_unlock(&ft->lock);
    if (out->verdict == NL_VERDICT_REWRITE || out->verdict == NL_VERDICT_MARK)
        nl_count_traffic(lb, worker, v.service_id, v.backend_id, len, !v.dst);
    return 1;
}

void nl_frag_tick(struct nl_lb *lb, uint64_t now_ms)
{
    struct nl_fragtrack *ft = lb->ft;
    if (!ft->max || __atomic_load_n(&ft->count, __ATOMIC_RELAXED) == 0)
        return;
    pthread_spin_lock(&ft->lock);
    expire(ft, (uint32_t)now_ms);
    pthread_spin_unlock(&ft->lock);
}

/* ---- introspection ----------------------------------------------------- */

void nl_read_fragments(struct nl_lb *lb, uint64_t *out)
{
    struct nl_fragtrack *ft = lb->ft;
    pthread_spin_lock(&ft->lock);
    memcpy(out, ft->counters, sizeof(ft->counters));
    pthread_spin_unlock(&ft->lock);
}

uint32_t nl_frag_count(struct nl_lb *lb)
{
    return __atomic_load_n(&lb->ft->count, __ATOMIC_RELAXED);
}

uint32_t nl_frag_held(struct nl_lb *lb)
{
    return __atomic_load_n(&lb->ft->held_used, __ATOMIC_RELAXED);
}

uint32_t nl_frag_entry_size(void)
{
    return sizeof(struct nl_frag);
}

uint64_t nl_frag_memory(struct nl_lb *lb)
{
    struct nl_fragtrack *ft = lb->ft;
    return sizeof(*ft) + (uint64_t)ft->max * sizeof(struct nl_frag) +
           (ft->max ? (uint64_t)(ft->mask + 1) * sizeof(uint32_t) : 0) +
           2 * (uint64_t)ft->n_slots * sizeof(struct held);
}
