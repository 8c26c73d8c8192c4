/*
 * lb.c -- the load balancer object: published snapshots, counters, and
 * the per-packet path: parse -> conntrack -> schedule -> rewrite (nl_process)
 * or -> mark for nftables to rewrite (nl_decide); ICMP errors about flows go
 * to failover (unreachable) or back to the backend (fragmentation needed);
 * IP fragments after the first follow their first's verdict (fragtrack.c).
 *
 * Snapshot reclamation (quiescent-state based): a worker records the
 * publish generation it saw before loading the snapshot pointer for a batch
 * and clears it after the batch.  nl_publish stores the new pointer, then
 * bumps the generation, and retires the old snapshot tagged with the new
 * generation; it is freed once no worker is still inside a batch that began
 * before that generation.  Packets never wait for a publish.  Callers
 * outside the workers (tests, tools, the control plane driving time) take
 * one extra epoch slot in turn, under a mutex, for the length of each call.
 *
 * What natlb believes (a passive failure report takes a backend out):
 *  - a packet with a wrong checksum is dropped before anything else, so a
 *    SYN its backend would silently discard is never forwarded or timed;
 *  - an RST to a SYN counts only if it acknowledges that SYN (RFC 793,
 *    SYN-SENT: any other RST is dropped by the client, and by natlb);
 *  - an ICMP error counts only if it quotes a packet natlb forwarded: the
 *    tuple of a flow to that backend, the held SYN's seq for a SYN, a seq
 *    the client has sent for other TCP flows;
 *  - and only if natlb could verify the bytes: a SYN, RST or ICMP error
 *    longer than the head NFQUEUE copies in mark mode is passed on (SYN,
 *    RST) or dropped (ICMP) but never reported and never re-steered.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "internal.h"

#define EPOCH_IDLE UINT64_MAX

struct retired {
    struct nl_snapshot *snap;
    uint64_t gen;
    struct retired *next;
};

/* Per-lb reclamation state, kept out of nl_lb's hot cache lines. */
struct nl_reclaim {
    uint64_t epoch[NL_MAX_WORKERS + 1];   /* the last: callers outside workers */
    struct retired *list;
    pthread_mutex_t ext_lock;             /* one such caller at a time       */
};
#define EXT_SLOT NL_MAX_WORKERS

static struct nl_reclaim *reclaim_of(struct nl_lb *lb);

/* ---- snapshots --------------------------------------------------------- */

struct nl_snapshot *nl_snapshot_new(uint32_t n_services)
{
    if (n_services > NL_MAX_SERVICES)
        return NULL;
    struct nl_snapshot *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->n_services = n_services;
    s->services = calloc(n_services ? n_services : 1, sizeof(struct nl_service));
    uint32_t size = 4;
    while (size < 2 * n_services)
        size <<= 1;
    s->index = calloc(size, sizeof(uint32_t));
    s->index_mask = size - 1;
    if (!s->services || !s->index) {
        nl_snapshot_free(s);
        return NULL;
    }
    return s;
}

void nl_snapshot_free(struct nl_snapshot *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; s->services && i < s->n_services; i++) {
        free(s->services[i].backends);
        free(s->services[i].table);
    }
    nl_cluster_index_free(s);
    free(s->services);
    free(s->index);
    free(s);
}

int nl_snapshot_set_service(struct nl_snapshot *s, uint32_t index,
                            const struct nl_service_spec *spec,
                            const struct nl_backend_spec *backends, uint32_t n_backends,
                            const uint16_t *table, uint32_t table_len)
{
    if (!s || index >= s->n_services || spec->id >= NL_MAX_SERVICES ||
        spec->scheduler > NL_SCHED_MAGLEV || (spec->proto != 6 && spec->proto != 17) ||
        (spec->flags & ~(uint32_t)NL_SVC_CLUSTER) ||
        ((spec->flags & NL_SVC_CLUSTER) && spec->scheduler != NL_SCHED_MAGLEV) ||
        n_backends > NL_MAX_BACKENDS || n_backends > 65535)
        return -1;
    for (uint32_t i = 0; i < n_backends; i++)
        if (backends[i].id >= NL_MAX_BACKENDS)
            return -1;
    for (uint32_t i = 0; i < table_len; i++)
        if (table[i] >= n_backends)
            return -1;
    struct nl_service *svc = &s->services[index];
    free(svc->backends);
    free(svc->table);
    memset(svc, 0, sizeof(*svc));
    svc->spec = *spec;
    svc->backends = malloc((n_backends ? n_backends : 1) * sizeof(*backends));
    svc->table = malloc((table_len ? table_len : 1) * sizeof(*table));
    if (!svc->backends || !svc->table)
        return -1;
    memcpy(svc->backends, backends, n_backends * sizeof(*backends));
    memcpy(svc->table, table, table_len * sizeof(*table));
    svc->n_backends = n_backends;
    svc->table_len = table_len;
    svc->filled = 1;
    return 0;
}

static inline uint32_t svc_hash(uint32_t vip, uint16_t port, uint8_t proto)
{
    uint32_t h = vip * 0x9e3779b1u ^ ((uint32_t)port << 8 | proto) * 0x85ebca6bu;
    return h ^ (h >> 15);
}

static int build_index(struct nl_snapshot *s)
{
    memset(s->by_id, 0, sizeof(s->by_id));
    memset(s->alive, 0, sizeof(s->alive));
    for (uint32_t i = 0; i < s->n_services; i++) {
        struct nl_service *svc = &s->services[i];
        if (!svc->filled || s->by_id[svc->spec.id])
            return -1;
        s->by_id[svc->spec.id] = svc;
        for (uint32_t j = 0; j < svc->n_backends; j++)
            if (svc->backends[j].flags & NL_BE_ALIVE)
                s->alive[svc->backends[j].id] = 1;
        uint32_t h = svc_hash(svc->spec.vip, svc->spec.port, svc->spec.proto);
        for (;; h++) {
            uint32_t *slot = &s->index[h & s->index_mask];
            if (*slot == 0) {
                *slot = i + 1;
                break;
            }
            const struct nl_service_spec *o = &s->services[*slot - 1].spec;
            if (o->vip == svc->spec.vip && o->port == svc->spec.port &&
                o->proto == svc->spec.proto)
                return -1;
        }
    }
    return nl_cluster_index_build(s);
}

static const struct nl_service *find_service(const struct nl_snapshot *s, uint32_t vip,
                                             uint16_t port, uint8_t proto)
{
    if (!s)
        return NULL;
    for (uint32_t h = svc_hash(vip, port, proto);; h++) {
        uint32_t slot = s->index[h & s->index_mask];
        if (slot == 0)
            return NULL;
        const struct nl_service *svc = &s->services[slot - 1];
        if (svc->spec.vip == vip && svc->spec.port == port && svc->spec.proto == proto)
            return svc;
    }
}

static void reclaim(struct nl_lb *lb)
{
    struct nl_reclaim *r = reclaim_of(lb);
    uint64_t oldest = EPOCH_IDLE;
    for (uint32_t w = 0; w <= NL_MAX_WORKERS; w++) {
        uint64_t e = __atomic_load_n(&r->epoch[w], __ATOMIC_SEQ_CST);
        if (e < oldest)
            oldest = e;
    }
    struct retired **link = &r->list;
    while (*link) {
        struct retired *x = *link;
        if (x->gen <= oldest) {
            *link = x->next;
            nl_snapshot_free(x->snap);
            free(x);
        } else {
            link = &x->next;
        }
    }
}

int nl_publish(struct nl_lb *lb, struct nl_snapshot *snap)
{
    if (!snap || build_index(snap) < 0)
        return -1;
    struct retired *x = malloc(sizeof(*x));
    if (!x)
        return -1;
    pthread_mutex_lock(&lb->publish_lock);
    struct nl_snapshot *old = __atomic_exchange_n(&lb->snap, snap, __ATOMIC_SEQ_CST);
    uint64_t gen = __atomic_add_fetch(&lb->generation, 1, __ATOMIC_SEQ_CST);
    struct nl_reclaim *r = reclaim_of(lb);
    x->snap = old;
    x->gen = gen;
    x->next = r->list;
    r->list = x;
    reclaim(lb);
    pthread_mutex_unlock(&lb->publish_lock);
    return 0;
}

void nl_worker_enter(struct nl_lb *lb, uint32_t worker)
{
    struct nl_reclaim *r = reclaim_of(lb);
    __atomic_store_n(&r->epoch[worker], __atomic_load_n(&lb->generation, __ATOMIC_SEQ_CST),
                     __ATOMIC_SEQ_CST);
}

void nl_worker_quiescent(struct nl_lb *lb, uint32_t worker)
{
    __atomic_store_n(&reclaim_of(lb)->epoch[worker], EPOCH_IDLE, __ATOMIC_RELEASE);
}

void nl_ext_enter(struct nl_lb *lb)
{
    pthread_mutex_lock(&reclaim_of(lb)->ext_lock);
    nl_worker_enter(lb, EXT_SLOT);
}

void nl_ext_exit(struct nl_lb *lb)
{
    nl_worker_quiescent(lb, EXT_SLOT);
    pthread_mutex_unlock(&reclaim_of(lb)->ext_lock);
    nl_event_signal(lb);
}

/* ---- lifetime ---------------------------------------------------------- */

struct nl_lb_alloc {
    struct nl_lb lb;
    struct nl_reclaim reclaim;
};

static struct nl_reclaim *reclaim_of(struct nl_lb *lb)
{
    return &((struct nl_lb_alloc *)lb)->reclaim;
}

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
        cfg->syn_timeout_ms > 0x3fffffffu)
        return NULL;
    for (int i = 0; i < NL_T_MAX; i++)
        if (cfg->timeout_ms[i] == 0 || cfg->timeout_ms[i] > 0x3fffffffu)
            return NULL;
    if (cfg->max_fragments > (1u << 24) ||
        (cfg->max_fragments && (cfg->fragment_timeout_ms == 0 ||
                                cfg->fragment_timeout_ms > 0x3fffffffu)))
        return NULL;
    struct nl_lb_alloc *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    struct nl_lb *lb = &a->lb;
    lb->cfg = *cfg;
    for (uint32_t w = 0; w <= NL_MAX_WORKERS; w++)
        a->reclaim.epoch[w] = EPOCH_IDLE;
    pthread_mutex_init(&a->reclaim.ext_lock, NULL);
    lb->counters = calloc(cfg->n_workers + 1, sizeof(struct nl_worker_counters));
    lb->active = calloc(NL_MAX_BACKENDS, sizeof(int64_t));
    lb->inactive = calloc(NL_MAX_BACKENDS, sizeof(int64_t));
    lb->raw_fd = -1;
    if (!lb->counters || !lb->active || !lb->inactive || nl_failover_init(lb) < 0 ||
        nl_ct_init(&lb->ct, cfg->max_flows, cfg->timeout_ms) < 0 || nl_frag_init(lb) < 0) {
        nl_destroy(lb);
        return NULL;
    }
    lb->sched_seed = lb->ct.seed * 0x9e3779b1u + 1;
    lb->ct.on_free = release_flow;
    lb->ct.on_free_ctx = lb;
    pthread_mutex_init(&lb->publish_lock, NULL);
    return lb;
}

void nl_destroy(struct nl_lb *lb)
{
    if (!lb)
        return;
    nl_stop(lb);
    struct nl_reclaim *r = reclaim_of(lb);
    while (r->list) {
        struct retired *x = r->list;
        r->list = x->next;
        nl_snapshot_free(x->snap);
        free(x);
    }
    nl_snapshot_free(lb->snap);
    nl_ct_fini(&lb->ct);
    if (lb->ct.store)
        nl_ct_store_unmap(&lb->ct);
    nl_failover_fini(lb);
    pthread_mutex_destroy(&r->ext_lock);
    nl_frag_fini(lb);
    free(lb->counters);
    free(lb->active);
    free(lb->inactive);
    free(lb);
}

/* ---- the data path ----------------------------------------------------- */

/* Notes the client's SYN: its seq, and, if its bytes were all there and
 * checked (csum == NL_CSUM_OK), a copy for re-steering.  A SYN natlb could
 * not check is forwarded but never held, timed or re-steered, and nothing
 * said about it is believed. */
static void note_syn(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p, int csum,
                     uint32_t now, int hold)
{
    f->syn_seq = p->seq;
    if (csum == NL_CSUM_OK && !p->frag) {   /* a first fragment is not the whole SYN */
        f->flags |= NL_FL_SYN_CHECKED;
        /* The kernel may vouch for a SYN of which we have only the head;
         * cluster services hold none (see cluster.c). */
        if (hold && nl_pkt_len(p) <= p->caplen)
            nl_hold_syn(lb, f, p->ip, nl_pkt_len(p), now);
        else
            nl_drop_held(lb, f);
    } else {
        f->flags &= (uint8_t)~NL_FL_SYN_CHECKED;
        nl_drop_held(lb, f);
    }
}

/* Per-packet traffic counters of the packet's service and backend. */
static void count_packet(struct nl_worker_counters *wc, uint16_t sid, uint16_t bid,
                         uint32_t bytes, int is_reply)
{
    struct nl_counters *c[2] = { &wc->services[sid], &wc->backends[bid] };
    for (int i = 0; i < 2; i++) {
        if (is_reply) {
            c[i]->packets_out++;
            c[i]->bytes_out += bytes;
        } else {
            c[i]->packets_in++;
            c[i]->bytes_in += bytes;
        }
    }
}

/* The counter block of `worker`; callers outside the workers share the last. */
static struct nl_worker_counters *counters_of(struct nl_lb *lb, uint32_t worker)
{
    return &lb->counters[worker > lb->cfg.n_workers ? lb->cfg.n_workers : worker];
}

void nl_count_traffic(struct nl_lb *lb, uint32_t worker, uint16_t sid, uint16_t bid,
                      uint32_t bytes, int is_reply)
{
    count_packet(counters_of(lb, worker), sid, bid, bytes, is_reply);
}

/* Finds the flow of key `k` and returns it with its stripe locked in *lock;
 * NULL (nothing locked) if there is none. */
static struct nl_flow *find_locked(struct nl_lb *lb, const struct nl_ct_key *k, uint32_t now,
                                   pthread_spinlock_t **lock)
{
    uint32_t b = nl_ct_bucket(&lb->ct, k);
    *lock = nl_ct_stripe(&lb->ct, b);
    pthread_spin_lock(*lock);
    struct nl_flow *f = nl_ct_find(&lb->ct, b, k, now);
    if (!f)
        pthread_spin_unlock(*lock);
    return f;
}

/* TCP state update that keeps the per-backend gauges in step. */
static void track_tcp(struct nl_lb *lb, struct nl_flow *f, int is_reply, uint8_t flags,
                      uint32_t now)
{
    uint8_t before = f->state;
    if (flags & NL_TCP_FIN)
        f->flags |= is_reply ? NL_FL_FIN_SERVER : NL_FL_FIN_CLIENT;
    nl_ct_tcp_update(&lb->ct, f, is_reply, flags, now);
    if (nl_flow_closing(before) != nl_flow_closing(f->state)) {
        nl_flow_gauge(lb, f, before, -1);
        nl_flow_gauge(lb, f, f->state, 1);
    }
}

static int forward(struct nl_lb *lb, struct nl_worker_counters *wc,
                   const struct nl_snapshot *snap, const struct nl_service *svc,
                   struct nl_pkt *p, uint32_t pkt_flags, int csum, uint32_t now,
                   uint32_t *mark)
{
    struct nl_ct *ct = &lb->ct;
    struct nl_ct_key k = { p->saddr, p->sport, p->proto, 0, p->daddr, p->dport };
    uint32_t b = nl_ct_bucket(ct, &k);
    pthread_spinlock_t *lock = nl_ct_stripe(ct, b);
    int is_syn = p->proto == 6 && (p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK)) == NL_TCP_SYN;
    int cluster = nl_svc_cluster(svc);

    pthread_spin_lock(lock);
    struct nl_flow *f = nl_ct_find(ct, b, &k, now);
    if (f && (f->flags & NL_FL_PROBE_CLIENT) && p->proto == 6 &&
        !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_RST))) {
        nl_reset_probed(lb, f, p, 0);
        pthread_spin_unlock(lock);
        return NL_VERDICT_DROP;
    }
    if (f && is_syn && f->state >= NL_FS_FIN) {
        /* The client reuses a closed connection's port: a new flow. */
        nl_ct_remove(ct, b, f);
        f = NULL;
    }
    if (!f) {
        int reason = -1, idx = -1;
        if (p->proto == 6 && !is_syn && !cluster)
            reason = NL_R_NO_FLOW;
        else if ((idx = nl_schedule(lb, svc, p)) < 0)
            reason = NL_R_NO_BACKEND;
        else if (!(f = nl_ct_insert(ct, b)) &&
                 !(nl_ct_make_room(ct, b, now) && (f = nl_ct_insert(ct, b))))
            reason = NL_R_TABLE_FULL;
        if (reason >= 0) {
            pthread_spin_unlock(lock);
            wc->reasons[reason]++;
            return NL_VERDICT_DROP;
        }
        const struct nl_backend_spec *be = &svc->backends[idx];
        f->client_addr = p->saddr;
        f->client_port = p->sport;
        f->vip_addr = p->daddr;
        f->vip_port = p->dport;
        f->backend_addr = be->addr;
        f->backend_port = be->port;
        f->proto = p->proto;
        f->service_id = (uint16_t)svc->spec.id;
        f->backend_id = (uint16_t)be->id;
        f->state = p->proto == 6 ? NL_FS_FREE : NL_FS_UDP;
        f->tries = 1;
        f->held = NL_HELD_NONE;
        if (cluster)
            nl_cluster_flow_start(lb, f, p);
        nl_flow_gauge(lb, f, f->state, 1);
        if (is_syn)
            note_syn(lb, f, p, csum, now, !cluster);
        wc->services[svc->spec.id].new_flows++;
        wc->backends[be->id].new_flows++;
    } else if (!snap->alive[f->backend_id] &&
               (p->proto == 17 || (is_syn && f->state == NL_FS_SYN_SENT))) {
        /* Its backend is dead and nothing is lost by moving: a UDP flow,
         * or a TCP flow the backend never answered (this is the client's
         * SYN again). */
        if (nl_move_flow(lb, snap, f, p) == 0 && is_syn) {
            f->tries++;
            note_syn(lb, f, p, csum, now, !cluster);
        }
    }
    if (p->proto == 6) {
        if (cluster)
            nl_cluster_track(f, 0, p->tcp_flags);
        track_tcp(lb, f, 0, p->tcp_flags, now);
        f->client_seq_next = p->seq + p->seq_len;
    } else {
        f->expires_ms = now + ct->timeout_ms[NL_T_UDP];
    }
    uint32_t baddr = f->backend_addr;
    uint16_t bport = f->backend_port, bid = f->backend_id;
    /* natlb decides which flows the kernel may carry alone: established
     * TCP to a live backend, never a packet that changes the flow's state. */
    int fast = lb->cfg.fastpath && p->proto == 6 && f->state == NL_FS_ESTABLISHED &&
               !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_FIN | NL_TCP_RST)) &&
               snap->alive[f->backend_id];
    pthread_spin_unlock(lock);
    p->nat_addr = baddr;
    p->nat_service = (uint16_t)svc->spec.id;
    p->nat_backend = bid;

    if (mark)
        *mark = NL_MARK_FORWARD | bid | (fast ? NL_MARK_FAST : 0);
    else
        nl_rewrite(p, 1, baddr, bport, pkt_flags);
    count_packet(wc, (uint16_t)svc->spec.id, bid, nl_pkt_len(p), 0);
    return mark ? NL_VERDICT_MARK : NL_VERDICT_REWRITE;
}

static inline int seq_before(uint32_t a, uint32_t b)
{
    return (int32_t)(a - b) < 0;
}

/* A SYN-ACK that answers the SYN of a flow natlb has since moved to another
 * backend: the first backend was only slow (a loaded host, a long queue),
 * not dead.  Passed on, it would show the client a backend's address and
 * leave that backend a half-open connection; so it is dropped and the
 * backend gets the RST the client would have sent (seq = its ack, RFC 793).
 * Believed only if it acknowledges the flow's SYN and its checksum is right. */
static int late_synack(struct nl_lb *lb, const struct nl_pkt *p, int csum, uint32_t now)
{
    if (p->proto != 6 || (p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK | NL_TCP_RST)) !=
                             (NL_TCP_SYN | NL_TCP_ACK) || csum != NL_CSUM_OK)
        return 0;
    struct nl_ct_key k = { p->daddr, p->dport, 6, 1, 0, 0 };
    uint32_t b = nl_ct_bucket(&lb->ct, &k);
    pthread_spinlock_t *lock = nl_ct_stripe(&lb->ct, b);
    int late = 0;
    pthread_spin_lock(lock);
    for (uint32_t i = lb->ct.buckets[b]; i != NL_NIL; i = lb->ct.flows[i].next) {
        const struct nl_flow *f = &lb->ct.flows[i];
        if (f->client_addr == p->daddr && f->client_port == p->dport && f->proto == 6 &&
            f->tries > 1 && (f->flags & NL_FL_SYN_CHECKED) && p->ack == f->syn_seq + 1 &&
            !nl_time_before(f->expires_ms, now)) {
            late = 1;
            break;
        }
    }
    pthread_spin_unlock(lock);
    if (!late)
        return 0;
    uint8_t rst[40];
    nl_build_rst(rst, p->daddr, p->saddr, p->dport, p->sport, p->ack);
    nl_outbox_push(lb, rst, sizeof(rst));
    nl_count_failover(lb, NL_F_LATE_SYNACKS, 1);
    return 1;
}

static int reply(struct nl_lb *lb, struct nl_worker_counters *wc,
                 const struct nl_snapshot *snap, struct nl_pkt *p, uint32_t pkt_flags,
                 int csum, uint32_t now, uint32_t *mark)
{
    pthread_spinlock_t *lock;
    struct nl_ct_key k = { p->daddr, p->dport, p->proto, 1, p->saddr, p->sport };
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    int full = 0;
    if (!f)
        f = nl_cluster_adopt_reply(lb, snap, p, now, &lock, &full);
    if (!f) {
        /* A cluster reply we cannot track must not leak the backend. */
        if (!full && late_synack(lb, p, csum, now))
            return NL_VERDICT_DROP;
        wc->reasons[full ? NL_R_TABLE_FULL : NL_R_NOT_OURS]++;
        return full ? NL_VERDICT_DROP : NL_VERDICT_ACCEPT;
    }
    if ((f->flags & NL_FL_PROBE_SERVER) && p->proto == 6 &&
        !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_RST))) {
        nl_reset_probed(lb, f, p, 1);
        pthread_spin_unlock(lock);
        return NL_VERDICT_DROP;
    }
    if (p->proto == 6 && (p->tcp_flags & NL_TCP_RST) && f->state == NL_FS_SYN_SENT) {
        /* RFC 793, SYN-SENT: an RST is acceptable only with an ACK of the
         * SYN (a SYN with data may be acked whole).  The client would drop
         * any other; so does natlb, and believes nothing of it. */
        if (!(p->tcp_flags & NL_TCP_ACK) ||
            (p->ack != f->syn_seq + 1 && p->ack != f->client_seq_next)) {
            pthread_spin_unlock(lock);
            wc->reasons[NL_R_UNMATCHED]++;
            return NL_VERDICT_DROP;
        }
        /* The backend refused the connection: try the SYN elsewhere and
         * keep the RST from the client.  Unchecked bytes (either packet
         * longer than the copied head) only pass through. */
        if ((f->flags & NL_FL_SYN_CHECKED) && csum == NL_CSUM_OK) {
            nl_emit(lb, NL_EV_SYN_RST, f->service_id, f->backend_id, f->client_addr, now);
            if (nl_resteer_held(lb, f, now) == 0) {
                pthread_spin_unlock(lock);
                return NL_VERDICT_DROP;
            }
        }
    }
    f->flags |= NL_FL_REPLIED;
    if (p->proto == 6) {
        if (snap && nl_svc_cluster(snap->by_id[f->service_id]))
            nl_cluster_track(f, 1, p->tcp_flags);
        track_tcp(lb, f, 1, p->tcp_flags, now);
        f->server_seq_next = p->seq + p->seq_len;
    } else {
        f->expires_ms = now + lb->ct.timeout_ms[NL_T_UDP];
    }
    uint32_t vip = f->vip_addr;
    uint16_t vport = f->vip_port, sid = f->service_id, bid = f->backend_id;
    pthread_spin_unlock(lock);
    p->nat_addr = vip;
    p->nat_service = sid;
    p->nat_backend = bid;

    if (mark)
        *mark = NL_MARK_REPLY | sid;
    else
        nl_rewrite(p, 0, vip, vport, pkt_flags);
    count_packet(wc, sid, bid, nl_pkt_len(p), 1);
    return mark ? NL_VERDICT_MARK : NL_VERDICT_REWRITE;
}

/* "Fragmentation needed" about a reply (VIP -> client) is addressed to the
 * VIP, so the backend that sent the packet would never learn the path MTU
 * and its large segments would vanish.  Send it its own copy, quoting its
 * own packet (backend -> client), and drop the original.  Path MTU
 * discovery needs nothing more (RFC 1191); the other ICMP errors are not
 * translated. */
static int pmtu(struct nl_lb *lb, struct nl_worker_counters *wc, const struct nl_icmp *icmp,
                uint32_t now)
{
    /* The quoted packet went VIP -> client: find the flow by its VIP side. */
    const struct nl_pkt *in = &icmp->inner;
    struct nl_ct_key k = { in->daddr, in->dport, in->proto, 0, in->saddr, in->sport };
    pthread_spinlock_t *lock;
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    if (!f) {
        wc->reasons[NL_R_NOT_OURS]++;
        return NL_VERDICT_ACCEPT;
    }
    uint32_t baddr = f->backend_addr;
    uint16_t bport = f->backend_port;
    pthread_spin_unlock(lock);
    uint8_t out[20 + 8 + 60 + 8];
    uint32_t n = nl_build_frag_needed(out, icmp->outer_saddr, baddr, icmp->mtu, icmp->quoted,
                                      icmp->quoted_len, baddr, bport);
    if (nl_outbox_push(lb, out, n))
        nl_count_failover(lb, NL_F_PMTU_RELAYED, 1);
    return NL_VERDICT_DROP;
}

/* A segment natlb forwarded lies at or before what the client sends next,
 * and within what a receive window may hold in flight. */
#define ICMP_SEQ_WINDOW (16u << 20)

/* Whether an ICMP error quotes a packet natlb forwarded on flow f. */
static int quote_matches(const struct nl_flow *f, const struct nl_icmp *icmp)
{
    if (f->proto != 6)
        return 1;                   /* UDP: the tuple is all there is */
    uint32_t seq = icmp->quoted_seq;
    if (f->state == NL_FS_SYN_SENT)
        return (f->flags & NL_FL_SYN_CHECKED) && seq == f->syn_seq;
    return !seq_before(f->client_seq_next, seq) &&
           !seq_before(seq, f->client_seq_next - ICMP_SEQ_WINDOW);
}

/* An ICMP unreachable about a packet natlb sent to a backend: a passive
 * failure.  The ICMP is not passed on: it quotes the backend's address, and
 * the client could not match it to its connection anyway. */
static int icmp_unreach(struct nl_lb *lb, struct nl_worker_counters *wc, const uint8_t *pkt,
                        uint32_t len, uint32_t pkt_flags, uint32_t now)
{
    struct nl_icmp icmp;
    int r = nl_parse_icmp_unreach(pkt, len, &icmp, (pkt_flags & NL_PKT_HEAD_ONLY) != 0);
    if (r >= 0) {
        wc->reasons[r]++;
        return r == NL_R_MALFORMED ? NL_VERDICT_DROP : NL_VERDICT_ACCEPT;
    }
    int csum = nl_check_icmp_csum(pkt, len, pkt_flags);
    if (csum == NL_CSUM_BAD) {
        wc->reasons[NL_R_BAD_CHECKSUM]++;
        return NL_VERDICT_DROP;
    }
    if (icmp.frag_needed)
        return pmtu(lb, wc, &icmp, now);   /* news, not a failure: no check */
    /* The quoted packet went client -> backend: find the flow by its backend side. */
    const struct nl_pkt *in = &icmp.inner;
    struct nl_ct_key k = { in->saddr, in->sport, in->proto, 1, in->daddr, in->dport };
    pthread_spinlock_t *lock;
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    if (!f) {
        wc->reasons[NL_R_NOT_OURS]++;
        return NL_VERDICT_ACCEPT;
    }
    if (csum != NL_CSUM_OK || !quote_matches(f, &icmp)) {
        pthread_spin_unlock(lock);
        wc->reasons[NL_R_UNMATCHED]++;
        return NL_VERDICT_DROP;
    }
    nl_emit(lb, NL_EV_ICMP, f->service_id, f->backend_id, f->client_addr, now);
    if (f->proto == 6 && f->state == NL_FS_SYN_SENT)
        nl_resteer_held(lb, f, now);
    pthread_spin_unlock(lock);
    return NL_VERDICT_DROP;
}

/* A TCP/UDP fragment after the first: it gets its first's verdict. */
static int later_fragment(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                          uint64_t now_ms, uint32_t packet_id, uint32_t *mark)
{
    if (worker > lb->cfg.n_workers)
        worker = lb->cfg.n_workers;
    int v = nl_frag_follow(lb, worker, pkt, len, mark != NULL, now_ms, packet_id, mark);
    if (v == NL_VERDICT_DROP)
        counters_of(lb, worker)->reasons[NL_R_FRAGMENT]++;
    return v;
}

/* The first fragment of a datagram got verdict v: its others will too.
 * saddr/daddr are the addresses it arrived with. */
static void first_fragment(struct nl_lb *lb, const struct nl_pkt *p, uint32_t saddr,
                           uint32_t daddr, int forwarded, int v, uint64_t now_ms)
{
    struct nl_frag_key k = { .saddr = { saddr }, .daddr = { daddr }, .family = 4,
                             .proto = p->proto,
                             .id = ((uint32_t)p->ip[4] << 8) | p->ip[5] };
    struct nl_frag_verdict fv = { .verdict = v == NL_VERDICT_MARK ? NL_VERDICT_REWRITE : v };
    if (fv.verdict == NL_VERDICT_REWRITE) {
        fv.addr[0] = p->nat_addr;
        fv.dst = (uint8_t)forwarded;
        fv.service_id = p->nat_service;
        fv.backend_id = p->nat_backend;
        fv.mark = forwarded ? NL_MARK_FORWARD | p->nat_backend : NL_MARK_REPLY | p->nat_service;
    }
    nl_frag_first(lb, &k, &fv, p->l4len, now_ms);
}

static int process(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                   uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark)
{
    struct nl_worker_counters *wc = counters_of(lb, worker);
    struct nl_pkt p;
    int r = nl_parse(pkt, len, &p, (pkt_flags & NL_PKT_HEAD_ONLY) != 0);
    if (r == NL_R_UNSUPPORTED && len >= 20 && pkt[9] == 1)
        return icmp_unreach(lb, wc, pkt, len, pkt_flags, (uint32_t)now_ms);
    if (NL_UNLIKELY(r == NL_R_FRAGMENT) && (pkt[9] == 6 || pkt[9] == 17))
        return later_fragment(lb, worker, pkt, len, now_ms, packet_id, mark);
    if (r >= 0) {
        wc->reasons[r]++;
        return r == NL_R_UNSUPPORTED ? NL_VERDICT_ACCEPT : NL_VERDICT_DROP;
    }
    int csum = nl_check_csum(&p, pkt_flags);
    if (csum == NL_CSUM_BAD) {
        wc->reasons[NL_R_BAD_CHECKSUM]++;
        return NL_VERDICT_DROP;
    }
    /* A first fragment's checksum covers the whole datagram, which we do
     * not have: only an incremental update is right (and the kernel never
     * hands over a fragment with its checksum unfinished). */
    if (NL_UNLIKELY(p.frag))
        pkt_flags &= ~(uint32_t)(NL_PKT_CSUM_PARTIAL | NL_PKT_GSO);
    uint32_t saddr = p.saddr, daddr = p.daddr;
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    const struct nl_service *svc = find_service(snap, p.daddr, p.dport, p.proto);
    int v = svc ? forward(lb, wc, snap, svc, &p, pkt_flags, csum, (uint32_t)now_ms, mark)
                : reply(lb, wc, snap, &p, pkt_flags, csum, (uint32_t)now_ms, mark);
    if (NL_UNLIKELY(p.frag))
        first_fragment(lb, &p, saddr, daddr, svc != NULL, v, now_ms);
    return v;
}

int nl_packet(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark)
{
    if (mark) {
        *mark = 0;
    } else if (pkt_flags & NL_PKT_HEAD_ONLY) {
        /* Rewriting needs the whole packet: its checksums cover all of it. */
        counters_of(lb, worker)->reasons[NL_R_TRUNCATED]++;
        return NL_VERDICT_DROP;
    }
    return process(lb, worker, pkt, len, pkt_flags, now_ms, packet_id, mark);
}

int nl_process_id(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                  uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id)
{
    nl_ext_enter(lb);
    int v = nl_packet(lb, worker, pkt, len, pkt_flags, now_ms, packet_id, NULL);
    nl_ext_exit(lb);
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
    return v;
}

int nl_decide(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t *mark)
{
    return nl_decide_id(lb, worker, pkt, len, pkt_flags, now_ms, NL_NO_PACKET_ID, mark);
}

uint32_t nl_process_many(struct nl_lb *lb, uint32_t worker, uint8_t *bufs, uint32_t stride,
                         const uint32_t *lens, uint8_t *verdicts, uint32_t n,
                         uint32_t pkt_flags, uint64_t now_ms)
{
    uint32_t rewritten = 0;
    nl_ext_enter(lb);
    for (uint32_t i = 0; i < n; i++) {
        int v = nl_packet(lb, worker, bufs + (size_t)i * stride, lens[i], pkt_flags, now_ms,
                          NL_NO_PACKET_ID, NULL);
        verdicts[i] = (uint8_t)v;
        rewritten += v == NL_VERDICT_REWRITE;
    }
    nl_ext_exit(lb);
    return rewritten;
}

uint32_t nl_ct_sweep(struct nl_lb *lb, uint64_t now_ms, uint32_t max_buckets)
{
    return nl_ct_expire(&lb->ct, (uint32_t)now_ms, max_buckets);
}
