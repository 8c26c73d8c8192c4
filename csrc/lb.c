/*
 * lb.c -- the per-packet path: parse -> conntrack -> schedule -> rewrite
 * (nl_process) or -> mark for nftables to rewrite (nl_decide); ICMP errors
 * about flows go to failover (unreachable) or back to the backend
 * (fragmentation needed); IP fragments after the first follow their
 * first's verdict (fragtrack.c).  Workers call nl_packet inside their epoch
 * (snapshot.c); callers outside them go through balancer.c.
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
#include "internal.h"

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
    if (NL_LIKELY(!(flags & (NL_TCP_SYN | NL_TCP_FIN | NL_TCP_RST)) &&
                  before != NL_FS_SYN_RECV)) {
        /* Most segments: no flag the state machine reads in a state an
         * ACK would leave, so only the expiry moves (nl_ct_tcp_update). */
        f->expires_ms = now + nl_ct_tcp_timeout(&lb->ct, before);
        return;
    }
    if (flags & NL_TCP_FIN)
        f->flags |= is_reply ? NL_FL_FIN_SERVER : NL_FL_FIN_CLIENT;
    nl_ct_tcp_update(&lb->ct, f, is_reply, flags, now);
    if (nl_flow_closing(before) != nl_flow_closing(f->state)) {
        nl_flow_gauge(lb, f, before, -1);
        nl_flow_gauge(lb, f, f->state, 1);
    }
}

/* What a client packet does to its flow, found or just made (caller holds
 * its stripe): the queued path and the observer (nl_observed) alike. */
static void forward_track(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p,
                          int cluster, uint32_t now)
{
    if (p->proto == NL_IPPROTO_TCP) {
        if (cluster)
            nl_cluster_track(f, 0, p->tcp_flags);
        track_tcp(lb, f, 0, p->tcp_flags, now);
        f->client_seq_next = p->seq + p->seq_len;
    } else {
        f->expires_ms = now + lb->ct.timeout_ms[NL_T_UDP];
    }
}

/* What a backend's packet does to its flow (caller holds its stripe; it
 * stays held): the queued path and the observer alike.  NL_VERDICT_DROP if
 * natlb keeps the packet from the client (an RST to the SYN it does not
 * believe, or one it answers by re-steering the SYN), else -1. */
static int reply_track(struct nl_lb *lb, struct nl_worker_counters *wc,
                       const struct nl_snapshot *snap, struct nl_flow *f,
                       const struct nl_pkt *p, int csum, uint32_t now)
{
    if (p->proto == NL_IPPROTO_TCP && (p->tcp_flags & NL_TCP_RST) && f->state == NL_FS_SYN_SENT) {
        /* RFC 793, SYN-SENT: an RST is acceptable only with an ACK of the
         * SYN (a SYN with data may be acked whole).  The client would drop
         * any other; so does natlb, and believes nothing of it. */
        if (!(p->tcp_flags & NL_TCP_ACK) ||
            (p->ack != f->syn_seq + 1 && p->ack != f->client_seq_next)) {
            wc->reasons[NL_R_UNMATCHED]++;
            return NL_VERDICT_DROP;
        }
        /* The backend refused the connection: try the SYN elsewhere and
         * keep the RST from the client.  Unchecked bytes (either packet
         * longer than the copied head) only pass through. */
        if ((f->flags & NL_FL_SYN_CHECKED) && csum == NL_CSUM_OK) {
            nl_emit(lb, NL_EV_SYN_RST, f->service_id, f->backend_id, &f->client_addr, now);
            if (nl_resteer_held(lb, f, now) == 0)
                return NL_VERDICT_DROP;
        }
    }
    f->flags |= NL_FL_REPLIED;
    if (p->proto == NL_IPPROTO_TCP) {
        if (snap && nl_svc_cluster(snap->by_id[f->service_id]))
            nl_cluster_track(f, 1, p->tcp_flags);
        track_tcp(lb, f, 1, p->tcp_flags, now);
        f->server_seq_next = p->seq + p->seq_len;
    } else {
        f->expires_ms = now + lb->ct.timeout_ms[NL_T_UDP];
    }
    return -1;
}

/* A flow natlb holds that a first packet the kernel placed anew must not
 * move, as the packet queued would not have moved it: a UDP session on a
 * live backend (its kernel entries emptied or evicted), an established
 * connection, or one still at the SYN that this one repeats (same ISN: a
 * duplicate within the observer's lag, whose first copy natlb placed). */
static int kept_from_kernel(const struct nl_ct *ct, const struct nl_snapshot *snap,
                            const struct nl_flow *f, const struct nl_pkt *p, uint32_t placed)
{
    if (p->proto == NL_IPPROTO_UDP)
        return snap->alive[f->backend_id] != 0;
    if (f->state == NL_FS_SYN_SENT) {
        /* The same SYN natlb noted no earlier than the kernel placed it
         * (1 ms of rounding): the copy natlb placed meanwhile.  Noted
         * before: the kernel's is a retransmission (natlb's copy may have
         * been lost, in a handover), and the flow follows it, as before. */
        uint32_t noted = f->expires_ms - nl_ct_tcp_timeout(ct, NL_FS_SYN_SENT);
        return (f->flags & NL_FL_SYN_CHECKED) && f->syn_seq == p->seq &&
               (!placed || !nl_time_before(noted + 1, placed));
    }
    return f->state == NL_FS_ESTABLISHED;
}

static int forward(struct nl_lb *lb, struct nl_worker_counters *wc,
                   const struct nl_snapshot *snap, const struct nl_service *svc,
                   struct nl_pkt *p, const struct nl_ct_key *k, uint32_t b, uint32_t pkt_flags,
                   int csum, uint32_t now, uint32_t *mark, int chosen, uint32_t placed)
{
    struct nl_ct *ct = &lb->ct;
    pthread_spinlock_t *lock = nl_ct_stripe(ct, b);
    int is_syn = p->proto == NL_IPPROTO_TCP &&
                 (p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK)) == NL_TCP_SYN;
    int cluster = nl_svc_cluster(svc);

    pthread_spin_lock(lock);
    struct nl_flow *f = nl_ct_find(ct, b, k, now);
    int created = 0;
    if (f && (f->flags & NL_FL_PROBE_CLIENT) && p->proto == NL_IPPROTO_TCP &&
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
    if (f && chosen >= 0 && (is_syn || f->backend_id != svc->backends[chosen].id) &&
        kept_from_kernel(ct, snap, f, p, placed)) {
        /* natlb's flow stays where it is: the kernel forgets what it
         * placed (nl_observed_new refuses its record). */
        pthread_spin_unlock(lock);
        return NL_VERDICT_ACCEPT;
    }
    if (f && chosen >= 0 && (is_syn || f->backend_id != svc->backends[chosen].id)) {
        /* The kernel placed a first packet on a tuple natlb still holds (a
         * port reused before natlb saw the old connection close, a flow
         * whose kernel entries were emptied): it went where the kernel
         * chose, so that is where the flow is now, as a new one. */
        nl_ct_remove(ct, b, f);
        f = NULL;
    }
    if (!f) {
        int reason = -1, idx = -1;
        if (p->proto == NL_IPPROTO_TCP && !is_syn && !cluster)
            reason = NL_R_NO_FLOW;
        else if ((idx = chosen >= 0 ? chosen : nl_schedule(lb, svc, p)) < 0)
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
        f->state = p->proto == NL_IPPROTO_TCP ? NL_FS_FREE : NL_FS_UDP;
        f->tries = 1;
        f->held = NL_HELD_NONE;
        created = 1;
        if (cluster)
            nl_cluster_flow_start(lb, f, p);
        nl_flow_gauge(lb, f, f->state, 1);
        if (is_syn)
            note_syn(lb, f, p, csum, now, !cluster);
        wc->services[svc->spec.id].new_flows++;
        wc->backends[be->id].new_flows++;
    } else if (!snap->alive[f->backend_id] &&
               (p->proto == NL_IPPROTO_UDP || (is_syn && f->state == NL_FS_SYN_SENT))) {
        /* Its backend is dead and nothing is lost by moving: a UDP flow,
         * or a TCP flow the backend never answered (this is the client's
         * SYN again). */
        if (nl_move_flow(lb, snap, f, p) == 0) {
            f->flags &= (uint8_t)~NL_FL_REPLIED;   /* the new backend has not answered */
            if (is_syn) {
                f->tries++;
                note_syn(lb, f, p, csum, now, !cluster);
            }
        }
    }
    forward_track(lb, f, p, cluster, now);
    struct nl_addr baddr = f->backend_addr;
    uint16_t bport = f->backend_port, bid = f->backend_id;
    /* natlb decides which flows the kernel may carry alone, to a live
     * backend: a new flow from its first packet (the client's SYN, a UDP
     * flow's first datagram), the kernel telling natlb of each packet that
     * moves the flow's state (the SYN-ACK, the handshake's last ACK, FIN,
     * RST, the first UDP answer) and keeping from the client whatever natlb
     * must act on (an RST or anything but the SYN-ACK from the backend,
     * SYNs again: fastpath.bpf.c); an established TCP flow's packet that
     * changes no state; UDP once the backend has answered.  Not a cluster
     * service's first packet (its replies may come through another node),
     * nor a re-steered or repeated SYN (natlb follows those itself).  A dead
     * backend's UDP flows move on their next packet: the control plane
     * empties the kernel's maps when a backend stops being alive.  Either
     * family: the kernel carries IPv6 alike (but a packet with extension
     * headers, which it leaves to natlb). */
    int first = created && !cluster && !p->frag &&
                (p->proto == NL_IPPROTO_UDP || is_syn);
    int fast = lb->cfg.fastpath && snap->alive[f->backend_id] &&
               (first ||
                (p->proto == NL_IPPROTO_TCP && f->state == NL_FS_ESTABLISHED &&
                 !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_FIN | NL_TCP_RST))) ||
                (p->proto == NL_IPPROTO_UDP && (f->flags & NL_FL_REPLIED)));
    if (fast && first)
        f->flags |= NL_FL_FAST;   /* moving it must make the kernel forget it */
    pthread_spin_unlock(lock);
    if (NL_UNLIKELY(p->frag)) {
        p->nat_addr = baddr;
        p->nat_service = (uint16_t)svc->spec.id;
        p->nat_backend = bid;
    }

    if (mark)
        *mark = NL_MARK_FORWARD | bid | (fast ? NL_MARK_FAST : 0);
    else
        nl_rewrite(p, 1, &baddr, bport, pkt_flags);
    nl_count_packet(wc, (uint16_t)svc->spec.id, bid, nl_pkt_len(p), 0);
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
 * Believed only if it acknowledges the flow's SYN and its checksum is right,
 * and if that SYN went to more than one backend: natlb moved the flow
 * (tries), or the SYN came twice within the observer's lag and the kernel
 * and natlb each placed one (a held answer tried again after the round that
 * applied the kernel's record, NL_PKT_DEFERRED: still no flow of its own). */
static int late_synack(struct nl_lb *lb, const struct nl_pkt *p, int csum, uint32_t now,
                       uint32_t pkt_flags)
{
    if (p->proto != NL_IPPROTO_TCP ||
        (p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK | NL_TCP_RST)) != (NL_TCP_SYN | NL_TCP_ACK) ||
        csum != NL_CSUM_OK)
        return 0;
    struct nl_ct_key k = { .client_addr = &p->daddr, .client_port = p->dport,
                           .proto = NL_IPPROTO_TCP, .reply = 1 };
    uint32_t b = nl_ct_bucket(&lb->ct, &k);
    pthread_spinlock_t *lock = nl_ct_stripe(&lb->ct, b);
    int late = 0;
    pthread_spin_lock(lock);
    for (uint32_t i = lb->ct.buckets[b]; i != NL_NIL; i = lb->ct.flows[i].next) {
        const struct nl_flow *f = &lb->ct.flows[i];
        if (nl_addr_eq(&f->client_addr, &p->daddr) && f->client_port == p->dport &&
            f->proto == NL_IPPROTO_TCP &&
            (f->tries > 1 || (pkt_flags & NL_PKT_DEFERRED)) &&
            (f->flags & NL_FL_SYN_CHECKED) && p->ack == f->syn_seq + 1 &&
            !nl_time_before(f->expires_ms, now)) {
            late = 1;
            break;
        }
    }
    pthread_spin_unlock(lock);
    if (!late && (pkt_flags & NL_PKT_DEFERRED))
        late = nl_refused_find(lb, &p->daddr, p->dport, NL_IPPROTO_TCP, &p->ack, now);
    if (!late)
        return 0;
    uint8_t rst[NL_TCP_PKT_MAX];
    nl_outbox_push(lb, rst, nl_build_rst(rst, &p->daddr, &p->saddr, p->dport, p->sport, p->ack));
    nl_count_failover(lb, NL_F_LATE_SYNACKS, 1);
    return 1;
}

/* Whether addr:port is a backend of a service natlb publishes (cluster
 * services adopt their replies elsewhere): only such a source's answer may
 * belong to a flow the kernel placed and natlb hears of late.  A scan of
 * the services' backends, done only for packets that found no flow while
 * the kernel decides. */
static int published_backend(const struct nl_snapshot *snap, const struct nl_addr *addr,
                             uint16_t port, uint8_t proto)
{
    for (uint32_t i = 0; snap && i < snap->n_services; i++) {
        const struct nl_service *svc = &snap->services[i];
        if (svc->spec.proto != proto || nl_svc_cluster(svc))
            continue;
        for (uint32_t j = 0; j < svc->n_backends; j++)
            if (svc->backends[j].port == port && nl_addr_eq(&svc->backends[j].addr, addr))
                return 1;
    }
    return 0;
}

/* A published backend's answer (or an ICMP error about what went to one)
 * that finds no flow while the kernel decides: the flow may be one the
 * kernel placed whose record the observer has not applied yet (ring full,
 * a SYN-ACK the kernel does not carry, an answer on another interface).
 * Passed on, it would show the client the backend's address: if the
 * kernel holds an entry for it (or placed a first packet natlb refused) it
 * is kept for the observer's next round (nl_deferred_retry, which sends it
 * on rewritten if a flow then takes it), and dropped if it cannot be kept
 * or still finds none.  With no such entry it is not natlb's (a client's
 * connection straight to the backend's own address): passed on at once,
 * to the kernel's own forwarding and filters.  HOLD_NONE: not held (the
 * caller's to pass); HOLD_KEPT, HOLD_DROPPED: natlb's to drop now. */
enum { HOLD_NONE, HOLD_KEPT, HOLD_DROPPED };
static int hold_back(struct nl_lb *lb, const struct nl_snapshot *snap, const struct nl_pkt *p,
                     const struct nl_addr *baddr, uint16_t bport, const struct nl_addr *client,
                     uint16_t cport, uint8_t proto, uint32_t pkt_flags, uint32_t now)
{
    if (pkt_flags & NL_PKT_DEFERRED)
        return HOLD_DROPPED;    /* held once, and the round brought no flow */
    if (!nl_fp_is_deciding(lb) || !published_backend(snap, baddr, bport, proto))
        return HOLD_NONE;
    if (!nl_fp_placed(lb, baddr, client, bport, cport, proto) &&
        !nl_refused_find(lb, client, cport, proto, NULL, now))
        return HOLD_NONE;
    if (!nl_defer_packet(lb, p->ip, nl_pkt_len(p) < p->caplen ? nl_pkt_len(p) : p->caplen,
                         pkt_flags))
        return HOLD_DROPPED;
    nl_count_failover(lb, NL_F_ANSWERS_HELD, 1);
    return HOLD_KEPT;
}

static int reply(struct nl_lb *lb, struct nl_worker_counters *wc,
                 const struct nl_snapshot *snap, struct nl_pkt *p, const struct nl_ct_key *k,
                 uint32_t b, uint32_t pkt_flags, int csum, uint32_t now, uint32_t *mark)
{
    pthread_spinlock_t *lock = nl_ct_stripe(&lb->ct, b);
    pthread_spin_lock(lock);
    struct nl_flow *f = nl_ct_find(&lb->ct, b, k, now);
    if (!f)
        pthread_spin_unlock(lock);
    int full = 0;
    if (!f)
        f = nl_cluster_adopt_reply(lb, snap, p, now, &lock, &full);
    if (!f) {
        /* A cluster reply we cannot track must not leak the backend. */
        if (!full && late_synack(lb, p, csum, now, pkt_flags))
            return NL_VERDICT_DROP;
        /* An answer to a flow the kernel placed, before the observer applied
         * its record (a backend refusing the SYN: natlb re-steers it then). */
        int held = full ? HOLD_NONE : hold_back(lb, snap, p, &p->saddr, p->sport, &p->daddr,
                                                p->dport, p->proto, pkt_flags, now);
        if (full || held != HOLD_KEPT)
            wc->reasons[full ? NL_R_TABLE_FULL
                             : held == HOLD_DROPPED ? NL_R_ANSWER_DROPPED : NL_R_NOT_OURS]++;
        return full || held ? NL_VERDICT_DROP : NL_VERDICT_ACCEPT;
    }
    if ((f->flags & NL_FL_PROBE_SERVER) && p->proto == NL_IPPROTO_TCP &&
        !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_RST))) {
        nl_reset_probed(lb, f, p, 1);
        pthread_spin_unlock(lock);
        return NL_VERDICT_DROP;
    }
    int v = reply_track(lb, wc, snap, f, p, csum, now);
    if (v >= 0) {
        pthread_spin_unlock(lock);
        return v;
    }
    struct nl_addr vip = f->vip_addr;
    uint16_t vport = f->vip_port, sid = f->service_id, bid = f->backend_id;
    /* A cluster service's reply may cross a node that never sees the
     * client's packets (the routers hash each direction apart): marked
     * fast as a client packet would be, so the kernel carries the flow
     * from its replies too.  An ordinary service's replies need not be:
     * the client's packet installs both directions. */
    int fast = lb->cfg.fastpath && !p->frag && snap && nl_svc_cluster(snap->by_id[sid]) &&
               snap->alive[bid] &&
               ((p->proto == NL_IPPROTO_TCP && f->state == NL_FS_ESTABLISHED &&
                 !(p->tcp_flags & (NL_TCP_SYN | NL_TCP_FIN | NL_TCP_RST))) ||
                (p->proto == NL_IPPROTO_UDP && (f->flags & NL_FL_REPLIED)));
    pthread_spin_unlock(lock);
    if (NL_UNLIKELY(p->frag)) {
        p->nat_addr = vip;
        p->nat_service = sid;
        p->nat_backend = bid;
    }

    if (mark)
        *mark = NL_MARK_REPLY | (fast ? NL_MARK_FAST | bid : sid);
    else
        nl_rewrite(p, 0, &vip, vport, pkt_flags);
    nl_count_packet(wc, sid, bid, nl_pkt_len(p), 1);
    return mark ? NL_VERDICT_MARK : NL_VERDICT_REWRITE;
}

/* "Fragmentation needed" (ICMPv6 "packet too big") about a reply (VIP ->
 * client) is addressed to the VIP, so the backend that sent the packet
 * would never learn the path MTU and its large segments would vanish.  Send
 * it its own copy, quoting its own packet (backend -> client), and drop the
 * original.  Path MTU discovery needs nothing more (RFC 1191, RFC 8201);
 * the other ICMP errors are not translated. */
static int pmtu(struct nl_lb *lb, struct nl_worker_counters *wc, const struct nl_icmp *icmp,
                uint32_t now)
{
    /* The quoted packet went VIP -> client: find the flow by its VIP side. */
    const struct nl_pkt *in = &icmp->inner;
    struct nl_ct_key k = { .client_addr = &in->daddr, .client_port = in->dport,
                           .proto = in->proto, .other_addr = &in->saddr,
                           .other_port = in->sport };
    pthread_spinlock_t *lock;
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    if (!f) {
        wc->reasons[NL_R_NOT_OURS]++;
        return NL_VERDICT_ACCEPT;
    }
    struct nl_addr baddr = f->backend_addr;
    uint16_t bport = f->backend_port;
    pthread_spin_unlock(lock);
    uint8_t out[NL_PKT_OUT_MAX];
    uint32_t n = nl_build_pmtu(out, sizeof(out), icmp, &baddr, bport);
    if (n && nl_outbox_push(lb, out, n))
        nl_count_failover(lb, NL_F_PMTU_RELAYED, 1);
    return NL_VERDICT_DROP;
}

/* A segment natlb forwarded lies at or before what the client sends next,
 * and within what a receive window may hold in flight. */
#define ICMP_SEQ_WINDOW (16u << 20)

/* Whether an ICMP error quotes a packet natlb forwarded on flow f. */
static int quote_matches(const struct nl_flow *f, const struct nl_icmp *icmp)
{
    if (f->proto != NL_IPPROTO_TCP)
        return 1;                   /* UDP: the tuple is all there is */
    uint32_t seq = icmp->quoted_seq;
    if (f->state == NL_FS_SYN_SENT)
        return (f->flags & NL_FL_SYN_CHECKED) && seq == f->syn_seq;
    return !seq_before(f->client_seq_next, seq) &&
           !seq_before(seq, f->client_seq_next - ICMP_SEQ_WINDOW);
}

/* An ICMP(v6) unreachable about a packet natlb sent to a backend: a
 * passive failure.  The ICMP is not passed on: it quotes the backend's
 * address, and the client could not match it to its connection anyway. */
static int icmp_error(struct nl_lb *lb, struct nl_worker_counters *wc, const struct nl_pkt *p,
                      uint32_t pkt_flags, uint32_t now)
{
    struct nl_icmp icmp;
    int r = nl_parse_icmp(p, &icmp);
    if (r >= 0) {
        wc->reasons[r]++;
        return r == NL_R_MALFORMED ? NL_VERDICT_DROP : NL_VERDICT_ACCEPT;
    }
    int csum = nl_check_icmp_csum(p, pkt_flags);
    if (csum == NL_CSUM_BAD) {
        wc->reasons[NL_R_BAD_CHECKSUM]++;
        return NL_VERDICT_DROP;
    }
    if (icmp.frag_needed)
        return pmtu(lb, wc, &icmp, now);   /* news, not a failure: no check */
    /* The quoted packet went client -> backend: find the flow by its backend side. */
    const struct nl_pkt *in = &icmp.inner;
    struct nl_ct_key k = { .client_addr = &in->saddr, .client_port = in->sport,
                           .proto = in->proto, .reply = 1, .other_addr = &in->daddr,
                           .other_port = in->dport };
    pthread_spinlock_t *lock;
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    int held = f ? HOLD_NONE
                 : hold_back(lb, __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE), p, &in->daddr,
                             in->dport, &in->saddr, in->sport, in->proto, pkt_flags, now);
    if (held) {
        if (held == HOLD_DROPPED)
            wc->reasons[NL_R_ANSWER_DROPPED]++;
        return NL_VERDICT_DROP;     /* a flow the kernel placed: later, or lost */
    }
    if (!f) {
        wc->reasons[NL_R_NOT_OURS]++;
        return NL_VERDICT_ACCEPT;
    }
    if (csum != NL_CSUM_OK || !quote_matches(f, &icmp)) {
        pthread_spin_unlock(lock);
        wc->reasons[NL_R_UNMATCHED]++;
        return NL_VERDICT_DROP;
    }
    nl_emit(lb, NL_EV_ICMP, f->service_id, f->backend_id, &f->client_addr, now);
    if (f->proto == NL_IPPROTO_TCP && f->state == NL_FS_SYN_SENT)
        nl_resteer_held(lb, f, now);
    pthread_spin_unlock(lock);
    return NL_VERDICT_DROP;
}

/* A TCP/UDP fragment after the first: it gets its first's verdict. */
static int later_fragment(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                          const struct nl_pkt *p, uint64_t now_ms, uint32_t packet_id,
                          uint32_t *mark)
{
    if (worker > lb->cfg.n_workers)
        worker = lb->cfg.n_workers;
    int v = nl_frag_follow(lb, worker, pkt, len, p, mark != NULL, now_ms, packet_id, mark);
    if (v == NL_VERDICT_DROP)
        nl_counters_of(lb, worker)->reasons[NL_R_FRAGMENT]++;
    return v;
}

/* The first fragment of a datagram got verdict v: its others will too. */
static void first_fragment(struct nl_lb *lb, const struct nl_pkt *p, int forwarded, int v,
                           uint64_t now_ms)
{
    struct nl_frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .family = p->family,
                             .proto = p->frag_nh, .id = p->frag_id };
    struct nl_frag_verdict fv = { .verdict = v == NL_VERDICT_MARK ? NL_VERDICT_REWRITE : v };
    if (fv.verdict == NL_VERDICT_REWRITE) {
        fv.addr = p->nat_addr;
        fv.dst = (uint8_t)forwarded;
        fv.service_id = p->nat_service;
        fv.backend_id = p->nat_backend;
        fv.mark = forwarded ? NL_MARK_FORWARD | p->nat_backend : NL_MARK_REPLY | p->nat_service;
    }
    nl_frag_first(lb, &k, &fv, p->frag_data, now_ms);
}

/* Fragments natlb can follow: of TCP or UDP (IPv6: or of destination
 * options that precede them). */
static inline int followable(const struct nl_pkt *p)
{
    return p->frag_nh == NL_IPPROTO_TCP || p->frag_nh == NL_IPPROTO_UDP ||
           (p->family == 6 && p->frag_nh == NL_IPPROTO_DSTOPTS);
}

/* A packet parsed and classified, between the two halves of the path
 * (classify, then flow_packet or other_packet). */
struct classified {
    struct nl_pkt p;
    int r;                           /* nl_parse's answer                  */
    int csum;                        /* NL_CSUM_*                          */
    uint32_t pkt_flags;
    const struct nl_snapshot *snap;
    const struct nl_service *svc;    /* forward: its service; NULL: a reply */
    struct nl_ct_key key;            /* its flow's, pointing into p         */
    uint32_t bucket;                 /* of its flow's chain                */
};

/* The last service lookup of a batch and its answer: a batch's packets
 * mostly go to one VIP (or come back from backends: no service), and a few
 * compares cost less than the hash and the index.  Keyed by the snapshot
 * too: it lives for one nl_packets call, inside the caller's epoch, so a
 * snapshot it names cannot be freed and its address reused meanwhile. */
struct svc_memo {
    const struct nl_snapshot *snap;  /* NULL: nothing remembered            */
    uint64_t hi, lo;                 /* the destination address's halves   */
    uint16_t port;
    uint8_t proto;
    const struct nl_service *svc;
};

static inline const struct nl_service *find_service(struct svc_memo *m,
                                                    const struct nl_snapshot *snap,
                                                    const struct nl_pkt *p)
{
    uint64_t hi = nl_addr_hi(&p->daddr), lo = nl_addr_lo(&p->daddr);
    if (m->snap == snap && m->lo == lo && m->hi == hi && m->port == p->dport &&
        m->proto == p->proto)
        return m->svc;
    m->snap = snap;             /* field by field: see classify */
    m->hi = hi;
    m->lo = lo;
    m->port = p->dport;
    m->proto = p->proto;
    m->svc = nl_find_service(snap, &p->daddr, p->dport, p->proto);
    return m->svc;
}

/* The first half, which reads nothing but the packet and the snapshot: 1 if
 * the packet is a whole TCP/UDP header with good checksums (c->bucket says
 * where its flow would be), 0 for other_packet. */
static int classify(struct nl_lb *lb, uint8_t *pkt, uint32_t len, uint32_t pkt_flags,
                    struct classified *c, struct svc_memo *memo)
{
    c->r = nl_parse(pkt, len, &c->p, (pkt_flags & NL_PKT_HEAD_ONLY) != 0);
    c->pkt_flags = pkt_flags;
    if (NL_UNLIKELY(c->r >= 0))
        return 0;
    c->csum = nl_check_csum(&c->p, pkt_flags);
    if (NL_UNLIKELY(c->csum == NL_CSUM_BAD))
        return 0;
    /* A first fragment's checksum covers the whole datagram, which we do
     * not have: only an incremental update is right (and the kernel never
     * hands over a fragment with its checksum unfinished). */
    if (NL_UNLIKELY(c->p.frag))
        c->pkt_flags &= ~(uint32_t)(NL_PKT_CSUM_PARTIAL | NL_PKT_GSO);
    c->snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    c->svc = find_service(memo, c->snap, &c->p);
    /* The conntrack key: a forward packet's client is its source, a
     * reply's its destination.  Field by field: a struct assignment is built on the stack by narrow
     * stores and copied by 16-byte loads, which cannot be forwarded from
     * them and wait for the cache (the hash reads the key right after). */
    const struct nl_pkt *p = &c->p;
    int reply = c->svc == NULL;
    c->key.client_addr = reply ? &p->daddr : &p->saddr;
    c->key.other_addr = reply ? &p->saddr : &p->daddr;
    c->key.client_port = reply ? p->dport : p->sport;
    c->key.other_port = reply ? p->sport : p->dport;
    c->key.proto = p->proto;
    c->key.reply = (uint8_t)reply;
    c->bucket = nl_ct_bucket(&lb->ct, &c->key);
    return 1;
}

/* The second half for a packet classify took: its flow, and the rewrite. */
static int flow_packet(struct nl_lb *lb, struct nl_worker_counters *wc, struct classified *c,
                       uint64_t now_ms, uint32_t *mark)
{
    struct nl_pkt *p = &c->p;
    int v = c->svc ? forward(lb, wc, c->snap, c->svc, p, &c->key, c->bucket, c->pkt_flags,
                             c->csum, (uint32_t)now_ms, mark, -1, 0)
                   : reply(lb, wc, c->snap, p, &c->key, c->bucket, c->pkt_flags, c->csum,
                           (uint32_t)now_ms, mark);
    if (NL_UNLIKELY(p->frag))
        first_fragment(lb, p, c->svc != NULL, v, now_ms);
    return v;
}

/* The second half for the others: ICMP errors, later fragments, packets
 * natlb refuses. */
static int other_packet(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                        struct classified *c, uint64_t now_ms, uint32_t packet_id,
                        uint32_t *mark)
{
    struct nl_worker_counters *wc = nl_counters_of(lb, worker);
    struct nl_pkt *p = &c->p;
    int r = c->r;
    if (r == NL_R_UNSUPPORTED &&
        p->proto == (p->family == 6 ? NL_IPPROTO_ICMPV6 : NL_IPPROTO_ICMP))
        return icmp_error(lb, wc, p, c->pkt_flags, (uint32_t)now_ms);
    if (r == NL_R_FRAGMENT && followable(p))
        return later_fragment(lb, worker, pkt, len, p, now_ms, packet_id, mark);
    if (r >= 0) {
        wc->reasons[r]++;
        return r == NL_R_UNSUPPORTED ? NL_VERDICT_ACCEPT : NL_VERDICT_DROP;
    }
    wc->reasons[NL_R_BAD_CHECKSUM]++;       /* classify refused it for nothing else */
    return NL_VERDICT_DROP;
}

/* Before the packet's own path: what only copy mode refuses. */
static inline int refused(struct nl_lb *lb, uint32_t worker, uint32_t pkt_flags,
                          uint32_t *mark)
{
    if (mark) {
        *mark = 0;
        return 0;
    }
    if (pkt_flags & NL_PKT_HEAD_ONLY) {
        /* Rewriting needs the whole packet: its checksums cover all of it. */
        nl_counters_of(lb, worker)->reasons[NL_R_TRUNCATED]++;
        return 1;
    }
    return 0;
}

int nl_packet(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark)
{
    if (refused(lb, worker, pkt_flags, mark))
        return NL_VERDICT_DROP;
    struct classified c;
    struct svc_memo memo = { .snap = NULL };
    if (classify(lb, pkt, len, pkt_flags, &c, &memo))
        return flow_packet(lb, nl_counters_of(lb, worker), &c, now_ms, mark);
    return other_packet(lb, worker, pkt, len, &c, now_ms, packet_id, mark);
}

/* How far nl_packets runs ahead: a packet's bytes are fetched PIPE_AHEAD
 * packets before it is classified, and it is classified (its bucket
 * fetched) PIPE_AHEAD packets before its turn, its flow's entry
 * PIPE_AHEAD / 2 before.  8 hid the misses of a 1,000,000-flow table as
 * well as 16 did (bench/abcore); 6 did a little worse, 24 and 40 worse. */
#define PIPE_SLOTS 16
#define PIPE_AHEAD 8
_Static_assert(PIPE_AHEAD < PIPE_SLOTS, "a slot is reused only after its packet's turn");

/* A batch: while one packet waits on its flow's bucket and entry (a cache
 * miss each in a big table), the next ones are parsed and their buckets
 * fetched.  Only reads run ahead (parse, checksums, snapshot, prefetches);
 * every packet's flow is found, changed and written in turn, under its
 * stripe lock, exactly as nl_packet would. */
void nl_packets(struct nl_lb *lb, uint32_t worker, struct nl_batch_pkt *b, uint32_t n,
                uint64_t now_ms, int mark_mode)
{
    struct nl_ct *ct = &lb->ct;
    struct nl_worker_counters *wc = nl_counters_of(lb, worker);
    struct classified ring[PIPE_SLOTS];
    uint8_t ours[PIPE_SLOTS];
    struct svc_memo memo = { .snap = NULL };
    for (uint32_t i = 0; i < n + PIPE_AHEAD; i++) {
        if (i + PIPE_AHEAD < n)
            __builtin_prefetch(b[i + PIPE_AHEAD].pkt, 1);
        if (i < n) {
            struct nl_batch_pkt *q = &b[i];
            uint32_t s = i % PIPE_SLOTS;
            uint32_t *mark = mark_mode ? &q->mark : NULL;
            ours[s] = 0;
            if (refused(lb, worker, q->pkt_flags, mark))
                q->verdict = NL_VERDICT_DROP;
            else if ((ours[s] = (uint8_t)classify(lb, q->pkt, q->len, q->pkt_flags, &ring[s],
                                                        &memo)))
                __builtin_prefetch(&ct->buckets[ring[s].bucket]);
            else
                q->verdict = -1;            /* other_packet, in turn */
        }
        uint32_t j = i - PIPE_AHEAD / 2;
        if (i >= PIPE_AHEAD / 2 && j < n && ours[j % PIPE_SLOTS]) {
            uint32_t head = __atomic_load_n(&ct->buckets[ring[j % PIPE_SLOTS].bucket],
                                            __ATOMIC_RELAXED);
            if (head < ct->max_flows) {
                const char *f = (const char *)&ct->flows[head];
                __builtin_prefetch(f, 1);
                __builtin_prefetch(f + sizeof(struct nl_flow) - 1, 1);
            }
        }
        uint32_t k = i - PIPE_AHEAD;
        if (i < PIPE_AHEAD || k >= n)
            continue;
        struct nl_batch_pkt *q = &b[k];
        struct classified *c = &ring[k % PIPE_SLOTS];
        uint32_t *mark = mark_mode ? &q->mark : NULL;
        if (ours[k % PIPE_SLOTS])
            q->verdict = flow_packet(lb, wc, c, now_ms, mark);
        else if (q->verdict == -1)
            q->verdict = other_packet(lb, worker, q->pkt, q->len, c, now_ms, q->packet_id, mark);
    }
}

/* A packet the kernel carried alone and told natlb of (a FIN, an RST, the
 * handshake's SYN-ACK and last ACK, a UDP flow's first answer), applied as
 * the queued packet would have been in mark mode: the same decisions
 * (forward_track, reply_track: state, flags, passive detection, gauges),
 * the same counters, no verdict or mark.  One pass under the flow's stripe
 * lock, and only to a flow natlb holds: an observed packet never creates
 * one, even for a cluster service that would adopt it, nor moves one (a
 * client's SYN is never carried).
 *
 * Checksums: a record holding the whole packet is checked like a queued
 * one, and a bad sum is not believed (counted).  A record holding only the
 * head (a packet with more data than the fast path copies) cannot be
 * checked, and is believed as the queued path believes a head-only copy:
 * the kernel forwards without checking L4 sums, so natlb's flow follows
 * what was forwarded.  What a forged one could do is bounded anyway: the
 * fast path already carried it and changed its own entries alike, and a
 * forged RST carries no data (it always fits the head whole). */
int nl_observed(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                uint32_t pkt_flags, uint64_t now_ms)
{
    struct nl_pkt p;
    int r = nl_parse(pkt, len, &p, (pkt_flags & NL_PKT_HEAD_ONLY) != 0);
    if (r >= 0 || p.frag ||
        (p.proto == NL_IPPROTO_TCP && (p.tcp_flags & (NL_TCP_SYN | NL_TCP_ACK)) == NL_TCP_SYN))
        return 0;
    struct nl_worker_counters *wc = nl_counters_of(lb, worker);
    /* tc sees a packet from a local or virtual sender (a veth peer, a VM)
     * before its L4 sum is finished: CHECKSUM_PARTIAL, the field holding
     * the pseudo-header's sum alone, and the fast path cannot say so.  That
     * form is believed with the IP header checked; any other wrong sum is
     * not (on a wire, the partial form is a bad sum: believing it at worst
     * moves natlb's flow a step early, and the kernel carried it anyway). */
    int csum = nl_check_csum(&p, pkt_flags);
    if (csum == NL_CSUM_BAD) {
        if (!nl_csum_partial_form(&p)) {
            wc->reasons[NL_R_BAD_CHECKSUM]++;
            return 0;
        }
        csum = NL_CSUM_OK;
    }
    uint32_t now = (uint32_t)now_ms;
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    const struct nl_service *svc = nl_find_service(snap, &p.daddr, p.dport, p.proto);
    int fwd = svc != NULL;
    if (fwd && p.proto == NL_IPPROTO_TCP && (p.tcp_flags & NL_TCP_SYN))
        return 0;               /* a SYN-ACK from the client: never carried */
    struct nl_ct_key k = { .client_addr = fwd ? &p.saddr : &p.daddr,
                           .client_port = fwd ? p.sport : p.dport, .proto = p.proto,
                           .reply = !fwd, .other_addr = fwd ? &p.daddr : &p.saddr,
                           .other_port = fwd ? p.dport : p.sport };
    pthread_spinlock_t *lock;
    struct nl_flow *f = find_locked(lb, &k, now, &lock);
    if (!f)
        return 0;
    /* A flow natlb is resetting (probe ACKs out) answers packets with
     * RSTs; one carried before the kernel's entries were emptied must not
     * make it send anything. */
    if (f->flags & (NL_FL_PROBE_CLIENT | NL_FL_PROBE_SERVER)) {
        pthread_spin_unlock(lock);
        return 0;
    }
    uint16_t sid = f->service_id, bid = f->backend_id;
    if (fwd)
        forward_track(lb, f, &p, nl_svc_cluster(svc), now);
    else
        reply_track(lb, wc, snap, f, &p, csum, now);
    pthread_spin_unlock(lock);
    nl_count_packet(wc, sid, bid, nl_pkt_len(&p), !fwd);
    return 1;
}

/* A new flow's first packet the kernel placed on backend_id (fastpath.bpf.c
 * decide), applied as forward() would have applied it queued with that
 * choice (mark mode): the same flow, flags, held SYN, gauges and counters.
 * The packet already went there, so natlb follows it even to a backend no
 * longer eligible or alive (the held SYN re-steers it; a UDP flow moves on
 * its next packet): only whether the kernel may go on carrying it is
 * natlb's to say, as its mark would. */
static int observed_new(struct nl_lb *lb, uint32_t worker, struct nl_pkt *pp,
                        uint32_t pkt_flags, uint32_t backend_id, uint32_t sent_csum,
                        uint64_t placed_ms, uint64_t now_ms);

int nl_observed_new(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                    uint32_t pkt_flags, uint32_t backend_id, uint32_t sent_csum,
                    uint64_t placed_ms, uint64_t now_ms)
{
    struct nl_pkt p;
    int r = nl_parse(pkt, len, &p, (pkt_flags & NL_PKT_HEAD_ONLY) != 0);
    if (r >= 0 || p.frag ||
        (p.proto == NL_IPPROTO_TCP &&
         (p.tcp_flags & (NL_TCP_SYN | NL_TCP_ACK | NL_TCP_RST | NL_TCP_FIN)) != NL_TCP_SYN))
        return 0;
    int took = observed_new(lb, worker, &p, pkt_flags, backend_id, sent_csum, placed_ms, now_ms);
    /* The packet reached its backend all the same: the answer is to be
     * held and dropped, a SYN-ACK refused as the client would (a flow natlb
     * placed elsewhere meanwhile makes it late_synack's anyway). */
    if (!took)
        nl_refused_note(lb, &p.saddr, p.sport, p.proto, p.seq, (uint32_t)now_ms);
    return took;
}

static int observed_new(struct nl_lb *lb, uint32_t worker, struct nl_pkt *pp,
                        uint32_t pkt_flags, uint32_t backend_id, uint32_t sent_csum,
                        uint64_t placed_ms, uint64_t now_ms)
{
    struct nl_pkt p = *pp;
    struct nl_worker_counters *wc = nl_counters_of(lb, worker);
    int csum = nl_check_csum(&p, pkt_flags);
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    const struct nl_service *svc = nl_find_service(snap, &p.daddr, p.dport, p.proto);
    if (!svc || nl_svc_cluster(svc))
        return 0;
    int chosen = -1;
    for (uint32_t i = 0; i < svc->n_backends; i++)
        if (svc->backends[i].id == backend_id) {
            chosen = (int)i;
            break;
        }
    if (chosen < 0)
        return 0;
    /* A veth peer's packet is CHECKSUM_PARTIAL in tc (the field holds the
     * pseudo-header's sum; the kernel finishes it on the way out): the
     * kernel then rewrote that field into the partial form of the header
     * it sent, and says what it sent.  The same form from a wire is a wrong
     * sum that the kernel rewrote as a full one, which the backend drops:
     * believed, a client could make natlb report backends silent at will.
     * Refused as the queued packet would be (a held SYN is re-sent with its
     * sum computed in full). */
    if (csum == NL_CSUM_BAD) {
        if (!nl_csum_partial_form(&p) || sent_csum > 0xffff ||
            !nl_csum_partial_form_to(&p, &svc->backends[chosen].addr, (uint16_t)sent_csum)) {
            wc->reasons[NL_R_BAD_CHECKSUM]++;
            return 0;
        }
        csum = NL_CSUM_OK;
    }
    struct nl_ct_key k = { .client_addr = &p.saddr, .client_port = p.sport, .proto = p.proto,
                           .reply = 0, .other_addr = &p.daddr, .other_port = p.dport };
    uint32_t mark = 0;
    int v = forward(lb, wc, snap, svc, &p, &k, nl_ct_bucket(&lb->ct, &k), pkt_flags, csum,
                    (uint32_t)now_ms, &mark, chosen, (uint32_t)placed_ms);
    return v == NL_VERDICT_MARK && (mark & NL_MARK_FAST) &&
           (uint16_t)mark == backend_id;   /* ids fit 16 bits */
}

/* Each kept packet decided again, rewritten in place (no mark: its queued
 * copy is gone) and its verdict honoured: one rewritten (a flow took it)
 * is sent on through the outbox as the kernel would have forwarded it (its
 * hop counted); any other is dropped (a re-steered SYN's RST, an ICMP
 * error applied, a late SYN-ACK, still no flow).  Bounded: a packet tried
 * again is never kept again.  Returns the number sent on. */
uint32_t nl_deferred_retry(struct nl_lb *lb, uint64_t now_ms)
{
    uint8_t buf[NL_PKT_OUT_MAX];
    uint32_t flags, len, sent = 0;
    while ((len = nl_deferred_take(lb, buf, sizeof buf, &flags))) {
        int v = nl_packet(lb, lb->cfg.n_workers, buf, len, flags | NL_PKT_DEFERRED, now_ms,
                          NL_NO_PACKET_ID, NULL);
        if (v == NL_VERDICT_REWRITE && nl_forward_hop(buf, len))
            sent += nl_outbox_push(lb, buf, len) != 0;
    }
    return sent;
}
