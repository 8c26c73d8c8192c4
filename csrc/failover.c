/*
 * failover.c -- what lets a new connection survive a dead backend.
 *
 * Theory of operation.
 *  - Held SYNs: when a TCP flow is created, a copy of the client's SYN is
 *    kept in a FIFO ring with a deadline (now + syn_timeout_ms).  If the
 *    backend answers SYN with RST, or the deadline passes while the flow is
 *    still SYN_SENT, the flow is moved to another alive backend and the held
 *    SYN is sent there at once, so the client never notices (it would
 *    otherwise wait a whole RTO, 1 s on Linux, before retrying).
 *  - A flow whose backend the control plane no longer calls alive moves on
 *    its next packet if it is UDP or an unanswered SYN (lb.c).
 *  - Events: each passive failure is pushed to a small ring and signalled
 *    by the I/O layer on an eventfd (nfqueue.c); the control plane decides
 *    what it means.  No Python runs per packet, and nobody polls.  The
 *    eventfd is written after the batch, never under a lock, and re-armed by
 *    a reader that leaves events behind.  A full ring drops its oldest event: the
 *    newest say most about the backends now.
 *  - The held ring is a FIFO in deadline order.  A flow that is freed or
 *    evicted takes its held SYN with it; a full ring overwrites its oldest
 *    entry, and that is counted (NL_F_HELD_LOST).
 *  - Outbox: packets natlb itself originates (re-sent SYNs, RSTs) are queued
 *    here.  The workers send them through a raw socket; in tests they stay
 *    for inspection, which keeps this file sans-IO.
 *  - The tc fast path (lb.fastpath) may carry a new flow's handshake
 *    (lb.c marks the first SYN fast; csrc/bpf/fastpath.bpf.c).  A flow
 *    natlb moves to another backend (NL_FL_FAST) must not be carried to
 *    the old one any more, nor a late SYN-ACK from it to the client: its
 *    kernel entries go on the forget queue, which the fast path's observer
 *    (tcfast.c, woken through the I/O layer's eventfd) empties into the
 *    kernel's map at once.  And the held-SYN timer must not move a flow
 *    whose SYN-ACK the kernel carried but the observer has not applied yet
 *    (it applies records about 1 ms late): such a due flow is forgotten
 *    by the kernel first, then waits (the sync list) until the observer has
 *    applied every record written before that (nl_fp_sync_*), and is
 *    re-steered only if it is still SYN_SENT then.  The kernel carries no
 *    SYN-ACK later than a margin before natlb's deadline (synack_window), so
 *    none can slip in after that point.  Sans-IO: the core only queues keys
 *    and counts requests; the I/O layers do the system calls.
 *
 * Lock order: a conntrack stripe, then the held or outbox or event or
 * forget lock, never the reverse.
 */
#define _GNU_SOURCE
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"
#include "natlb_test.h"

#define HELD_SLOTS 8192          /* power of two, < 0xffff                 */
#define PKT_MAX NL_PKT_OUT_MAX   /* bigger SYNs (with data) are not held   */
/* Backends' answers waiting for the observer: as many as the ring holds
 * records (256 KiB of about 150 bytes each), so a full ring's flows'
 * answers all find room; 2048 x 136 bytes, about 280 KiB per natlb. */
#define DEFER_SLOTS 2048

/* A published backend's answer (any packet, or an ICMP error quoting what
 * went to it) that finds no flow while the kernel decides: the kernel may
 * have placed that flow and the observer not applied its record yet.
 * Tried again after its next round. */
struct deferred {
    uint16_t len;
    uint32_t pkt_flags;
    uint8_t bytes[PKT_MAX];
};
/* First packets the kernel placed that natlb refused (its table full, the
 * service or backend gone since the publish, a session kept elsewhere):
 * the backend got the packet all the same, and its answer is not to be
 * sent on.  Refusals are rare; one is looked for only by a published
 * backend's answer that finds no flow while the kernel decides. */
#define REFUSED_SLOTS 64
#define REFUSED_MS 3000          /* a SYN-ACK and its first retransmissions */
struct refused {
    struct nl_addr client_addr;
    uint32_t ack;                /* the SYN's seq + 1: what its SYN-ACK acks */
    uint32_t at_ms;
    uint16_t client_port;
    uint8_t proto;
    uint8_t used;
};
#define OUTBOX_SLOTS 4096
#define EVENT_SLOTS 1024
#define FORGET_SLOTS 1024        /* keys the fast path is to forget        */
#define SYNC_SLOTS 256           /* due flows waiting for the observer     */

struct held {
    uint32_t flow;
    struct nl_addr client_addr;
    uint16_t client_port;
    uint8_t proto;
    uint8_t attempt;             /* f->tries when it was held              */
    uint32_t deadline;
    uint16_t len;
    uint8_t bytes[PKT_MAX];      /* the client's SYN as it arrived         */
};

struct out_pkt {
    uint16_t len;
    uint8_t bytes[PKT_MAX];
};

/* A due held SYN whose flow the kernel may have carried a SYN-ACK of:
 * re-examined once the observer answered sync request `req`. */
struct sync_wait {
    uint64_t req;
    struct nl_addr client_addr;
    uint32_t flow, slot;
    uint16_t client_port;
    uint8_t proto, attempt;
};

struct nl_failover {
    pthread_spinlock_t held_lock;
    uint64_t held_head, held_tail;
    struct held held[HELD_SLOTS];
    pthread_spinlock_t out_lock;
    uint64_t out_head, out_tail;
    struct out_pkt out[OUTBOX_SLOTS];
    pthread_spinlock_t ev_lock;
    uint64_t ev_head, ev_tail;
    struct nl_event ev[EVENT_SLOTS];
    int ev_pending;              /* pushed since nl_events_unsignalled     */
    uint64_t counters[NL_F_MAX];
    pthread_spinlock_t forget_lock;   /* the forget queue and the sync list */
    uint64_t forget_head, forget_tail;
    struct nl_fp_forget forget[FORGET_SLOTS];
    int forget_overflow;         /* keys were lost: forget every flow      */
    uint32_t n_sync;             /* written under forget_lock, read without
                                    it as a hint (atomic)                 */
    struct sync_wait sync[SYNC_SLOTS];
    uint64_t sync_req, sync_done;     /* atomic: asked of the observer, and
                                         the last it answered            */
    int observing;               /* atomic: an observer applies records    */
    int deciding;                /* atomic: the kernel places first packets */
    int fp_pending;              /* atomic: keys or a request to signal    */
    pthread_spinlock_t defer_lock;    /* ICMP errors waiting for the observer */
    uint32_t n_defer;
    struct deferred defer[DEFER_SLOTS];
    uint32_t refused_next;       /* under defer_lock, as refused[] */
    struct refused refused[REFUSED_SLOTS];
    /* The kernel's flows map, asked whether it placed a flow natlb has no
     * record of yet (nl_fp_placed).  The fd is natlb's own copy (atomic, -1:
     * none): the map outlives the fast path's object while a worker asks. */
    nl_placed_fn placed_fn;
    nl_placed_release_fn placed_release;
    int placed_fd;
};

/* ---- packets about flows the kernel placed, before natlb holds them ------------------------- */

int nl_defer_packet(struct nl_lb *lb, const uint8_t *pkt, uint32_t len, uint32_t pkt_flags)
{
    struct nl_failover *fo = lb->fo;
    if (len > PKT_MAX || !__atomic_load_n(&fo->observing, __ATOMIC_ACQUIRE))
        return 0;
    int queued = 0;
    pthread_spin_lock(&fo->defer_lock);
    if (fo->n_defer < DEFER_SLOTS) {
        struct deferred *d = &fo->defer[fo->n_defer++];
        d->len = (uint16_t)len;
        d->pkt_flags = pkt_flags;
        memcpy(d->bytes, pkt, len);
        queued = 1;
    }
    pthread_spin_unlock(&fo->defer_lock);
    if (queued)
        __atomic_store_n(&fo->fp_pending, 1, __ATOMIC_RELEASE);
    return queued;
}

void nl_refused_note(struct nl_lb *lb, const struct nl_addr *client, uint16_t port,
                     uint8_t proto, uint32_t isn, uint32_t now_ms)
{
    struct nl_failover *fo = lb->fo;
    pthread_spin_lock(&fo->defer_lock);
    struct refused *r = &fo->refused[fo->refused_next++ % REFUSED_SLOTS];
    *r = (struct refused){ .client_addr = *client, .ack = isn + 1, .at_ms = now_ms,
                           .client_port = port, .proto = proto, .used = 1 };
    pthread_spin_unlock(&fo->defer_lock);
}

int nl_refused_find(struct nl_lb *lb, const struct nl_addr *client, uint16_t port,
                    uint8_t proto, const uint32_t *ack, uint32_t now_ms)
{
    struct nl_failover *fo = lb->fo;
    int found = 0;
    pthread_spin_lock(&fo->defer_lock);
    /* Kept when found: a retransmission (our RST lost) is answered too. */
    for (uint32_t i = 0; i < REFUSED_SLOTS && !found; i++) {
        const struct refused *r = &fo->refused[i];
        found = r->used && r->client_port == port && r->proto == proto &&
                (!ack || r->ack == *ack) && now_ms - r->at_ms <= REFUSED_MS &&
                nl_addr_eq(&r->client_addr, client);
    }
    pthread_spin_unlock(&fo->defer_lock);
    return found;
}

uint32_t nl_deferred_take(struct nl_lb *lb, uint8_t *buf, uint32_t cap, uint32_t *pkt_flags)
{
    struct nl_failover *fo = lb->fo;
    uint32_t len = 0;
    pthread_spin_lock(&fo->defer_lock);
    if (fo->n_defer) {
        struct deferred *d = &fo->defer[--fo->n_defer];
        len = d->len <= cap ? d->len : 0;
        memcpy(buf, d->bytes, len);
        *pkt_flags = d->pkt_flags;
    }
    pthread_spin_unlock(&fo->defer_lock);
    return len;
}

int nl_failover_init(struct nl_lb *lb)
{
    struct nl_failover *fo = calloc(1, sizeof(*fo));
    if (!fo)
        return -1;
    pthread_spin_init(&fo->held_lock, PTHREAD_PROCESS_PRIVATE);
    pthread_spin_init(&fo->out_lock, PTHREAD_PROCESS_PRIVATE);
    pthread_spin_init(&fo->ev_lock, PTHREAD_PROCESS_PRIVATE);
    pthread_spin_init(&fo->forget_lock, PTHREAD_PROCESS_PRIVATE);
    pthread_spin_init(&fo->defer_lock, PTHREAD_PROCESS_PRIVATE);
    fo->placed_fd = -1;
    lb->fo = fo;
    return 0;
}

void nl_failover_fini(struct nl_lb *lb)
{
    if (lb->fo) {
        if (lb->fo->placed_fd >= 0 && lb->fo->placed_release)
            lb->fo->placed_release(lb->fo->placed_fd);
        free(lb->fo);
        lb->fo = NULL;
    }
}

void nl_count_failover(struct nl_lb *lb, int which, uint64_t n)
{
    __atomic_fetch_add(&lb->fo->counters[which], n, __ATOMIC_RELAXED);
}

void nl_read_failover(struct nl_lb *lb, uint64_t *out)
{
    for (int i = 0; i < NL_F_MAX; i++)
        out[i] = __atomic_load_n(&lb->fo->counters[i], __ATOMIC_RELAXED);
}

/* ---- events ------------------------------------------------------------ */

void nl_emit(struct nl_lb *lb, uint32_t kind, uint32_t service_id, uint32_t backend_id,
             const struct nl_addr *client_addr, uint64_t now)
{
    struct nl_failover *fo = lb->fo;
    int lost = 0;
    pthread_spin_lock(&fo->ev_lock);
    if (fo->ev_head - fo->ev_tail >= EVENT_SLOTS) {
        fo->ev_tail++;
        lost = 1;
    }
    fo->ev[fo->ev_head++ % EVENT_SLOTS] = (struct nl_event){ kind, service_id, backend_id,
                                                             *client_addr, now };
    pthread_spin_unlock(&fo->ev_lock);
    __atomic_store_n(&fo->ev_pending, 1, __ATOMIC_RELEASE);
    if (lost)
        nl_count_failover(lb, NL_F_EVENTS_LOST, 1);
}

int nl_events_unsignalled(struct nl_lb *lb)
{
    struct nl_failover *fo = lb->fo;
    return __atomic_load_n(&fo->ev_pending, __ATOMIC_ACQUIRE) &&
           __atomic_exchange_n(&fo->ev_pending, 0, __ATOMIC_ACQ_REL);
}

uint32_t nl_events_take(struct nl_lb *lb, struct nl_event *out, uint32_t max, int *left)
{
    struct nl_failover *fo = lb->fo;
    uint32_t n = 0;
    pthread_spin_lock(&fo->ev_lock);
    while (n < max && fo->ev_tail != fo->ev_head)
        out[n++] = fo->ev[fo->ev_tail++ % EVENT_SLOTS];
    *left = fo->ev_tail != fo->ev_head;
    pthread_spin_unlock(&fo->ev_lock);
    return n;
}

/* ---- outbox ------------------------------------------------------------ */

uint32_t nl_outbox_push(struct nl_lb *lb, const uint8_t *pkt, uint32_t len)
{
    struct nl_failover *fo = lb->fo;
    int full = 0;
    pthread_spin_lock(&fo->out_lock);
    if (fo->out_head - fo->out_tail >= OUTBOX_SLOTS || len > PKT_MAX) {
        full = 1;
    } else {
        struct out_pkt *o = &fo->out[fo->out_head++ % OUTBOX_SLOTS];
        o->len = (uint16_t)len;
        memcpy(o->bytes, pkt, len);
    }
    pthread_spin_unlock(&fo->out_lock);
    if (full)
        nl_count_failover(lb, NL_F_OUTBOX_FULL, 1);
    return !full;
}

uint32_t nl_outbox_take(struct nl_lb *lb, uint8_t *buf, uint32_t cap)
{
    struct nl_failover *fo = lb->fo;
    uint32_t len = 0;
    pthread_spin_lock(&fo->out_lock);
    if (fo->out_tail != fo->out_head) {
        struct out_pkt *o = &fo->out[fo->out_tail % OUTBOX_SLOTS];
        if (o->len <= cap) {
            len = o->len;
            memcpy(buf, o->bytes, len);
            fo->out_tail++;
        }
    }
    pthread_spin_unlock(&fo->out_lock);
    return len;
}

/* ---- the fast path: keys to forget, and syncing with its observer ------- */

void nl_fp_forget_flow(struct nl_lb *lb, struct nl_flow *f)
{
    struct nl_failover *fo = lb->fo;
    if (!(f->flags & NL_FL_FAST))
        return;
    f->flags &= (uint8_t)~NL_FL_FAST;
    struct nl_fp_forget k = { .client_addr = f->client_addr, .vip_addr = f->vip_addr,
                              .backend_addr = f->backend_addr,
                              .client_port = f->client_port, .vip_port = f->vip_port,
                              .backend_port = f->backend_port, .proto = f->proto };
    pthread_spin_lock(&fo->forget_lock);
    if (fo->forget_head - fo->forget_tail >= FORGET_SLOTS)
        fo->forget_overflow = 1;
    else
        fo->forget[fo->forget_head++ % FORGET_SLOTS] = k;
    pthread_spin_unlock(&fo->forget_lock);
    __atomic_store_n(&fo->fp_pending, 1, __ATOMIC_RELEASE);
}

uint32_t nl_fp_forget_take(struct nl_lb *lb, struct nl_fp_forget *out, uint32_t max,
                           int *overflow)
{
    struct nl_failover *fo = lb->fo;
    uint32_t n = 0;
    pthread_spin_lock(&fo->forget_lock);
    while (n < max && fo->forget_tail != fo->forget_head)
        out[n++] = fo->forget[fo->forget_tail++ % FORGET_SLOTS];
    *overflow = fo->forget_overflow;
    fo->forget_overflow = 0;
    pthread_spin_unlock(&fo->forget_lock);
    return n;
}

void nl_fp_placed_source(struct nl_lb *lb, nl_placed_fn fn, nl_placed_release_fn release,
                         int fd)
{
    struct nl_failover *fo = lb->fo;
    __atomic_store_n(&fo->placed_fn, fn, __ATOMIC_RELEASE);
    nl_placed_release_fn old_release = fo->placed_release;
    fo->placed_release = release;
    int old = __atomic_exchange_n(&fo->placed_fd, fd, __ATOMIC_ACQ_REL);
    /* Another fast path for this lb (tests; a daemon opens one): a worker
     * still asking the old copy gets an error, which holds the packet. */
    if (old >= 0 && old != fd && old_release)
        old_release(old);
}

int nl_fp_placed(struct nl_lb *lb, const struct nl_addr *saddr, const struct nl_addr *daddr,
                 uint16_t sport, uint16_t dport, uint8_t proto)
{
    struct nl_failover *fo = lb->fo;
    int fd = __atomic_load_n(&fo->placed_fd, __ATOMIC_ACQUIRE);
    nl_placed_fn fn = __atomic_load_n(&fo->placed_fn, __ATOMIC_ACQUIRE);
    if (fd < 0 || !fn)
        return 1;               /* nobody to ask: held, as every such answer was */
    return fn(fd, saddr, daddr, sport, dport, proto);
}

void nl_fp_deciding(struct nl_lb *lb, int on)
{
    __atomic_store_n(&lb->fo->deciding, on != 0, __ATOMIC_RELEASE);
}

int nl_fp_is_deciding(struct nl_lb *lb)
{
    return __atomic_load_n(&lb->fo->deciding, __ATOMIC_ACQUIRE);
}

void nl_fp_observing(struct nl_lb *lb, int on)
{
    struct nl_failover *fo = lb->fo;
    __atomic_store_n(&fo->observing, on, __ATOMIC_RELEASE);
    if (!on)   /* nobody will answer: what waits is answered now */
        __atomic_store_n(&fo->sync_done, __atomic_load_n(&fo->sync_req, __ATOMIC_ACQUIRE),
                         __ATOMIC_RELEASE);
}

uint64_t nl_fp_sync_wanted(struct nl_lb *lb)
{
    return __atomic_load_n(&lb->fo->sync_req, __ATOMIC_ACQUIRE);
}

void nl_fp_sync_done(struct nl_lb *lb, uint64_t req)
{
    struct nl_failover *fo = lb->fo;
    uint64_t done = __atomic_load_n(&fo->sync_done, __ATOMIC_ACQUIRE);
    while (done < req &&
           !__atomic_compare_exchange_n(&fo->sync_done, &done, req, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
    }
}

int nl_fp_unsignalled(struct nl_lb *lb)
{
    struct nl_failover *fo = lb->fo;
    return __atomic_load_n(&fo->fp_pending, __ATOMIC_ACQUIRE) &&
           __atomic_exchange_n(&fo->fp_pending, 0, __ATOMIC_ACQ_REL);
}

/* A due flow whose SYN-ACK the kernel may have carried: the kernel forgets
 * it now, and it waits for the observer (caller holds f's stripe).  0 if it
 * does not need to (or cannot: the list is full, and it is re-steered as
 * without the fast path). */
static int sync_first(struct nl_lb *lb, struct nl_flow *f, uint32_t slot)
{
    struct nl_failover *fo = lb->fo;
    if (!(f->flags & NL_FL_FAST) || !__atomic_load_n(&fo->observing, __ATOMIC_ACQUIRE))
        return 0;
    struct sync_wait w = { .client_addr = f->client_addr, .flow = (uint32_t)(f - lb->ct.flows),
                           .slot = slot, .client_port = f->client_port, .proto = f->proto,
                           .attempt = f->tries };
    /* The keys first, the request after: an observer that sees the request
     * sees the keys, and forgets them before it reads the ring. */
    nl_fp_forget_flow(lb, f);
    int queued = 0;
    pthread_spin_lock(&fo->forget_lock);
    if (fo->n_sync < SYNC_SLOTS) {
        w.req = __atomic_add_fetch(&fo->sync_req, 1, __ATOMIC_ACQ_REL);
        fo->sync[fo->n_sync] = w;
        __atomic_store_n(&fo->n_sync, fo->n_sync + 1, __ATOMIC_RELAXED);
        queued = 1;
    }
    pthread_spin_unlock(&fo->forget_lock);
    if (queued)
        __atomic_store_n(&fo->fp_pending, 1, __ATOMIC_RELEASE);
    return queued;
}

/* ---- held SYNs ----------------------------------------------------------- */

/* Whether ring entry h is f's held SYN (any attempt). */
static int held_by(const struct nl_lb *lb, const struct held *h, const struct nl_flow *f)
{
    return h->flow == (uint32_t)(f - lb->ct.flows) &&
           nl_addr_eq(&h->client_addr, &f->client_addr) &&
           h->client_port == f->client_port && h->proto == f->proto;
}

void nl_drop_held(struct nl_lb *lb, struct nl_flow *f)
{
    struct nl_failover *fo = lb->fo;
    if (f->held == NL_HELD_NONE)
        return;
    pthread_spin_lock(&fo->held_lock);
    struct held *h = &fo->held[f->held];
    if (held_by(lb, h, f))
        h->flow = NL_NIL;
    pthread_spin_unlock(&fo->held_lock);
    f->held = NL_HELD_NONE;
}

void nl_hold_syn(struct nl_lb *lb, struct nl_flow *f, const uint8_t *pkt, uint32_t len,
                 uint32_t now)
{
    struct nl_failover *fo = lb->fo;
    nl_drop_held(lb, f);
    if (!lb->cfg.syn_timeout_ms || len > PKT_MAX)
        return;
    int lost = 0;
    pthread_spin_lock(&fo->held_lock);
    uint32_t slot = (uint32_t)(fo->held_head % HELD_SLOTS);
    struct held *h = &fo->held[slot];
    if (fo->held_head - fo->held_tail >= HELD_SLOTS) {
        fo->held_tail++;            /* the oldest is overwritten */
        lost = h->flow != NL_NIL;
    }
    h->flow = (uint32_t)(f - lb->ct.flows);
    h->client_addr = f->client_addr;
    h->client_port = f->client_port;
    h->proto = f->proto;
    h->attempt = f->tries;
    h->deadline = now + lb->cfg.syn_timeout_ms;
    h->len = (uint16_t)len;
    memcpy(h->bytes, pkt, len);
    fo->held_head++;
    pthread_spin_unlock(&fo->held_lock);
    f->held = (uint16_t)slot;
    if (lost)
        nl_count_failover(lb, NL_F_HELD_LOST, 1);
}

/* Copies f's held SYN if the slot still belongs to f's current attempt. */
static uint32_t held_copy(struct nl_lb *lb, const struct nl_flow *f, uint8_t *buf)
{
    struct nl_failover *fo = lb->fo;
    uint32_t len = 0;
    if (f->held == NL_HELD_NONE)
        return 0;
    pthread_spin_lock(&fo->held_lock);
    const struct held *h = &fo->held[f->held];
    if (held_by(lb, h, f) && h->attempt == f->tries) {
        len = h->len;
        memcpy(buf, h->bytes, len);
    }
    pthread_spin_unlock(&fo->held_lock);
    return len;
}

static void move_to(struct nl_lb *lb, struct nl_flow *f, const struct nl_backend_spec *be)
{
    nl_fp_forget_flow(lb, f);
    nl_flow_gauge(lb, f, f->state, -1);
    f->backend_addr = be->addr;
    f->backend_port = be->port;
    f->backend_id = (uint16_t)be->id;
    nl_flow_gauge(lb, f, f->state, 1);
    nl_count_failover(lb, NL_F_RESTEERED, 1);
}

int nl_move_flow(struct nl_lb *lb, const struct nl_snapshot *snap, struct nl_flow *f,
                 const struct nl_pkt *p)
{
    const struct nl_service *svc = snap ? snap->by_id[f->service_id] : NULL;
    if (!svc)
        return -1;
    int idx = nl_schedule_other(lb, svc, p, f->backend_id, snap->alive);
    if (idx < 0)
        return -1;
    move_to(lb, f, &svc->backends[idx]);
    return 0;
}

int nl_resteer_held(struct nl_lb *lb, struct nl_flow *f, uint32_t now)
{
    uint8_t orig[PKT_MAX], out[PKT_MAX];
    if (f->tries >= lb->cfg.resteer_tries)
        return -1;
    uint32_t len = held_copy(lb, f, orig);
    if (!len)
        return -1;
    memcpy(out, orig, len);
    struct nl_pkt p;
    if (nl_parse(out, len, &p, 0) >= 0)
        return -1;
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    if (nl_move_flow(lb, snap, f, &p) < 0)
        return -1;
    f->tries++;
    /* The held copy may carry a partial checksum: compute it in full. */
    nl_rewrite(&p, 1, &f->backend_addr, f->backend_port, NL_PKT_CSUM_PARTIAL);
    nl_outbox_push(lb, out, len);
    nl_count_failover(lb, NL_F_SYN_RESENT, 1);
    nl_hold_syn(lb, f, orig, len, now);
    return 0;
}

uint32_t nl_syn_deadline_next(struct nl_lb *lb, uint32_t now)
{
    struct nl_failover *fo = lb->fo;
    uint32_t wait = UINT32_MAX;
    pthread_spin_lock(&fo->held_lock);
    if (fo->held_tail != fo->held_head) {
        uint32_t d = fo->held[fo->held_tail % HELD_SLOTS].deadline;
        wait = nl_time_before(now, d) ? d - now : 0;
    }
    pthread_spin_unlock(&fo->held_lock);
    /* Flows waiting for the observer: look again in a millisecond. */
    if (wait > 1 && __atomic_load_n(&fo->n_sync, __ATOMIC_RELAXED))
        wait = 1;
    return wait;
}

/* A held SYN's deadline passed: if its flow is still waiting for a SYN-ACK
 * from the same attempt, re-steer it (or first sync with the fast path's
 * observer, when `may_wait` and the kernel may have carried its SYN-ACK). */
static void due_flow(struct nl_lb *lb, const struct sync_wait *d, uint64_t now_ms, int may_wait)
{
    struct nl_ct_key k = { .client_addr = &d->client_addr, .client_port = d->client_port,
                           .proto = d->proto };
    uint32_t b = nl_ct_bucket(&lb->ct, &k);
    pthread_spinlock_t *lock = nl_ct_stripe(&lb->ct, b);
    pthread_spin_lock(lock);
    /* The entry may have been freed and reused by a flow of another
     * stripe: read it only if it is in this bucket's chain. */
    struct nl_flow *f = &lb->ct.flows[d->flow];
    if (nl_ct_link_of(&lb->ct, b, d->flow) && f->state == NL_FS_SYN_SENT &&
        f->held == d->slot && nl_addr_eq(&f->client_addr, &d->client_addr) &&
        f->client_port == d->client_port && f->tries == d->attempt &&
        !(may_wait && sync_first(lb, f, d->slot))) {
        nl_emit(lb, NL_EV_SYN_TIMEOUT, f->service_id, f->backend_id, &f->client_addr, now_ms);
        nl_resteer_held(lb, f, (uint32_t)now_ms);
    }
    pthread_spin_unlock(lock);
}

/* The flows the observer has caught up for: due again, without waiting. */
static void synced(struct nl_lb *lb, uint64_t now_ms)
{
    struct nl_failover *fo = lb->fo;
    if (!__atomic_load_n(&fo->n_sync, __ATOMIC_RELAXED))
        return;
    uint64_t done = __atomic_load_n(&fo->sync_done, __ATOMIC_ACQUIRE);
    struct sync_wait ready[SYNC_SLOTS];
    uint32_t n = 0;
    pthread_spin_lock(&fo->forget_lock);
    for (uint32_t i = 0; i < fo->n_sync;) {
        if (fo->sync[i].req <= done) {
            ready[n++] = fo->sync[i];
            __atomic_store_n(&fo->n_sync, fo->n_sync - 1, __ATOMIC_RELAXED);
            fo->sync[i] = fo->sync[fo->n_sync];
        } else {
            i++;
        }
    }
    pthread_spin_unlock(&fo->forget_lock);
    for (uint32_t i = 0; i < n; i++)
        due_flow(lb, &ready[i], now_ms, 0);
}

void nl_failover_due(struct nl_lb *lb, uint64_t now_ms)
{
    struct nl_failover *fo = lb->fo;
    uint32_t now = (uint32_t)now_ms;
    synced(lb, now_ms);
    for (;;) {
        struct sync_wait due[32];
        uint32_t n = 0;
        pthread_spin_lock(&fo->held_lock);
        while (n < 32 && fo->held_tail != fo->held_head) {
            uint32_t slot = (uint32_t)(fo->held_tail % HELD_SLOTS);
            struct held *h = &fo->held[slot];
            if (nl_time_before(now, h->deadline))
                break;
            fo->held_tail++;
            if (h->flow == NL_NIL)
                continue;           /* its flow is gone */
            /* The bytes stay in the ring for nl_resteer_held to copy. */
            due[n++] = (struct sync_wait){ .flow = h->flow, .client_addr = h->client_addr,
                                           .client_port = h->client_port, .proto = h->proto,
                                           .attempt = h->attempt, .slot = slot };
        }
        pthread_spin_unlock(&fo->held_lock);
        if (!n)
            return;
        for (uint32_t i = 0; i < n; i++)
            due_flow(lb, &due[i], now_ms, 1);
    }
}

/* ---- resetting the flows of a dead backend ------------------------------ */

/* With the fast path the kernel carried the flow's later packets, so the
 * sequence numbers natlb holds may be stale and its RSTs fall outside the
 * window.  An ACK just behind the window makes each end answer with an ACK
 * that carries its exact numbers (RFC 793 "unacceptable segment"); the flow
 * stays, closed, until those answers come (nl_reset_probed) or it expires.
 * The fast-path maps are flushed before this runs and a dead backend's
 * packets get no NL_MARK_FAST, so the answers reach natlb. */
static void probe(struct nl_lb *lb, struct nl_flow *f)
{
    uint8_t pkt[NL_TCP_PKT_MAX];
    nl_outbox_push(lb, pkt, nl_build_tcp(pkt, &f->vip_addr, &f->client_addr, f->vip_port,
                                         f->client_port, f->server_seq_next - 1,
                                         f->client_seq_next, NL_TCP_ACK));
    nl_outbox_push(lb, pkt, nl_build_tcp(pkt, &f->client_addr, &f->backend_addr,
                                         f->client_port, f->backend_port,
                                         f->client_seq_next - 1, f->server_seq_next,
                                         NL_TCP_ACK));
    uint8_t before = f->state;
    f->state = NL_FS_CLOSE;
    if (!nl_flow_closing(before)) {
        nl_flow_gauge(lb, f, before, -1);
        nl_flow_gauge(lb, f, f->state, 1);
    }
    f->flags |= NL_FL_PROBE_CLIENT | NL_FL_PROBE_SERVER;
    f->expires_ms = (uint32_t)nl_monotonic_ms() + lb->ct.timeout_ms[NL_T_TCP_CLOSE];
}

void nl_reset_probed(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p, int reply)
{
    uint8_t rst[NL_TCP_PKT_MAX];
    /* p's ack is what its sender expects next: its RST's exact seq.  p's seq
     * is what the other end expects next, if nothing is in flight. */
    uint8_t self = reply ? NL_FL_PROBE_SERVER : NL_FL_PROBE_CLIENT;
    uint8_t other = reply ? NL_FL_PROBE_CLIENT : NL_FL_PROBE_SERVER;
    if (reply) {
        nl_outbox_push(lb, rst, nl_build_rst(rst, &f->client_addr, &f->backend_addr,
                                             f->client_port, f->backend_port, p->ack));
        if (f->flags & other)
            nl_outbox_push(lb, rst, nl_build_rst(rst, &f->vip_addr, &f->client_addr,
                                                 f->vip_port, f->client_port, p->seq));
    } else {
        nl_outbox_push(lb, rst, nl_build_rst(rst, &f->vip_addr, &f->client_addr, f->vip_port,
                                             f->client_port, p->ack));
        if (f->flags & other)
            nl_outbox_push(lb, rst, nl_build_rst(rst, &f->client_addr, &f->backend_addr,
                                                 f->client_port, f->backend_port, p->seq));
    }
    f->flags &= (uint8_t)~self;
}

uint32_t nl_reset_buckets(struct nl_lb *lb, uint32_t backend_id, uint32_t first, uint32_t n)
{
    struct nl_ct *ct = &lb->ct;
    uint32_t reset = 0;
    uint8_t rst[NL_TCP_PKT_MAX];
    if (first >= ct->n_buckets)
        return 0;
    uint32_t end = n < ct->n_buckets - first ? first + n : ct->n_buckets;
    for (uint32_t b = first; b < end; b++) {
        if (__atomic_load_n(&ct->buckets[b], __ATOMIC_RELAXED) == NL_NIL)
            continue;
        pthread_spinlock_t *lock = nl_ct_stripe(ct, b);
        pthread_spin_lock(lock);
        uint32_t *link = &ct->buckets[b];
        while (*link != NL_NIL) {
            struct nl_flow *f = &ct->flows[*link];
            if (f->backend_id != backend_id) {
                link = &f->next;
                continue;
            }
            /* Reset what is still open: not a SYN being re-steered, not a
             * flow closed by RST or by FINs from both sides. */
            if (f->proto == NL_IPPROTO_TCP && f->state != NL_FS_SYN_SENT &&
                f->state != NL_FS_CLOSE &&
                (f->flags & (NL_FL_FIN_CLIENT | NL_FL_FIN_SERVER)) !=
                    (NL_FL_FIN_CLIENT | NL_FL_FIN_SERVER)) {
                nl_outbox_push(lb, rst, nl_build_rst(rst, &f->vip_addr, &f->client_addr,
                                                     f->vip_port, f->client_port,
                                                     f->server_seq_next));
                nl_outbox_push(lb, rst, nl_build_rst(rst, &f->client_addr, &f->backend_addr,
                                                     f->client_port, f->backend_port,
                                                     f->client_seq_next));
                nl_count_failover(lb, NL_F_RESETS_SENT, 1);
                if (lb->cfg.fastpath) {
                    probe(lb, f);
                    link = &f->next;
                    reset++;
                    continue;
                }
            }
            if (f->proto == NL_IPPROTO_TCP && f->state == NL_FS_SYN_SENT) {
                link = &f->next;   /* its SYN is re-steered, not reset */
                continue;
            }
            nl_ct_free(ct, link);
            reset++;
        }
        pthread_spin_unlock(lock);
    }
    return reset;
}
