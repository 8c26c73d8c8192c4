/*
 * cluster.c -- several natlb nodes carrying one VIP at once.
 *
 * Theory of operation.  Routers spread a VIP's packets over the nodes with
 * ECMP and hash the two directions of a flow separately, so one node may
 * see a flow's client packets and another its replies; and when a node
 * dies, its flows arrive, mid-way, at the others.  No state is shared.
 * Instead, for a service flagged NL_SVC_CLUSTER:
 *  - Every node makes the same choice.  The scheduler is maglev, its table
 *    is built from the config alone (natlb/schedulers.py), and the hash of
 *    the client's address and port uses a fixed seed (NL_CLUSTER_SEED), so
 *    a flow maps to one backend on every node.
 *  - A client packet that matches no flow is steered by that hash even if
 *    it is not a SYN, and its flow is created, ESTABLISHED (as Maglev and
 *    Katran do).  Connection tracking comes first, so a flow a node already
 *    knows stays where it is while the nodes' health views differ.
 *  - A backend's reply that matches no flow is mapped back to its service
 *    by the backend's address, port and protocol (the config makes that
 *    unique) and rewritten to the VIP; its flow is created too, so this
 *    node tracks it (timeouts, FIN/RST, least-connection counts) and would
 *    send the client's packets to the same backend if they came here.
 *  - A node seeing one direction moves the handshake on by itself:
 *    the client's ACK after its SYN, or the backend's packet after its
 *    SYN-ACK, means the connection is established (nl_cluster_track).
 *  - Both families alike: addresses are hashed and compared whole (an
 *    IPv4 client hashes as it did before IPv6, so nodes of both builds
 *    agree on IPv4 flows).
 *  - Cluster services do not hold SYNs for re-steering: a SYN re-sent to a
 *    backend the hash did not choose would put the flow where no other
 *    node would look for it.
 */
#include <stdlib.h>
#include <string.h>
#include "internal.h"

struct cluster_slot {
    struct nl_addr addr;             /* either family                       */
    uint16_t port;                   /* network order                       */
    uint8_t proto;
    uint8_t used;
    const struct nl_service *svc;
    uint32_t backend;                /* index into svc->backends            */
};

struct nl_cluster_index {
    uint32_t mask;
    struct cluster_slot slots[];
};

static uint32_t slot_hash(const struct nl_addr *addr, uint16_t port, uint8_t proto)
{
    return nl_addr_hash(addr, nl_mix32(((uint32_t)port << 8) | proto));
}

int nl_cluster_index_build(struct nl_snapshot *s)
{
    uint32_t n = 0;
    nl_cluster_index_free(s);
    for (uint32_t i = 0; i < s->n_services; i++)
        if (nl_svc_cluster(&s->services[i]))
            n += s->services[i].n_backends;
    if (n == 0)
        return 0;
    uint32_t size = 4;
    while (size < 2 * n)
        size <<= 1;
    struct nl_cluster_index *x = calloc(1, sizeof(*x) + size * sizeof(struct cluster_slot));
    if (!x)
        return -1;
    x->mask = size - 1;
    s->cluster = x;
    for (uint32_t i = 0; i < s->n_services; i++) {
        const struct nl_service *svc = &s->services[i];
        if (!nl_svc_cluster(svc))
            continue;
        for (uint32_t j = 0; j < svc->n_backends; j++) {
            const struct nl_backend_spec *b = &svc->backends[j];
            for (uint32_t h = slot_hash(&b->addr, b->port, svc->spec.proto);; h++) {
                struct cluster_slot *sl = &x->slots[h & x->mask];
                if (!sl->used) {
                    *sl = (struct cluster_slot){ b->addr, b->port, svc->spec.proto, 1, svc, j };
                    break;
                }
                if (nl_addr_eq(&sl->addr, &b->addr) && sl->port == b->port &&
                    sl->proto == svc->spec.proto)
                    return -1;   /* its replies could not be told apart */
            }
        }
    }
    return 0;
}

void nl_cluster_index_free(struct nl_snapshot *s)
{
    free(s->cluster);
    s->cluster = NULL;
}

static const struct cluster_slot *find_backend(const struct nl_cluster_index *x,
                                               const struct nl_addr *addr, uint16_t port,
                                               uint8_t proto)
{
    if (!x)
        return NULL;
    for (uint32_t h = slot_hash(addr, port, proto);; h++) {
        const struct cluster_slot *sl = &x->slots[h & x->mask];
        if (!sl->used)
            return NULL;
        if (nl_addr_eq(&sl->addr, addr) && sl->port == port && sl->proto == proto)
            return sl;
    }
}

void nl_cluster_flow_start(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p)
{
    /* Anything but the client's plain SYN is mid-flow, a SYN-ACK from the
     * client included (else its flow would be left in no state at all). */
    if (p->proto != NL_IPPROTO_TCP ||
        (p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK)) == NL_TCP_SYN)
        return;
    f->state = NL_FS_ESTABLISHED;
    nl_count_failover(lb, NL_F_ADOPTED, 1);
}

struct nl_flow *nl_cluster_adopt_reply(struct nl_lb *lb, const struct nl_snapshot *snap,
                                       const struct nl_pkt *p, uint32_t now,
                                       pthread_spinlock_t **lock, int *full)
{
    const struct cluster_slot *sl =
        find_backend(snap ? snap->cluster : NULL, &p->saddr, p->sport, p->proto);
    if (!sl)
        return NULL;
    const struct nl_service *svc = sl->svc;
    const struct nl_backend_spec *be = &svc->backends[sl->backend];
    struct nl_ct *ct = &lb->ct;
    struct nl_ct_key k = { .client_addr = &p->daddr, .client_port = p->dport, .proto = p->proto,
                           .reply = 1, .other_addr = &p->saddr, .other_port = p->sport };
    uint32_t b = nl_ct_bucket(ct, &k);
    *lock = nl_ct_stripe(ct, b);
    pthread_spin_lock(*lock);
    /* Another worker may have created it since the caller looked. */
    struct nl_flow *f = nl_ct_find(ct, b, &k, now);
    if (f)
        return f;
    if (!(f = nl_ct_insert(ct, b)) &&
        !(nl_ct_make_room(ct, b, now) && (f = nl_ct_insert(ct, b)))) {
        pthread_spin_unlock(*lock);
        *full = 1;
        return NULL;
    }
    f->client_addr = p->daddr;
    f->client_port = p->dport;
    f->vip_addr = svc->spec.vip;
    f->vip_port = svc->spec.port;
    f->backend_addr = be->addr;
    f->backend_port = be->port;
    f->proto = p->proto;
    f->service_id = (uint16_t)svc->spec.id;
    f->backend_id = (uint16_t)be->id;
    f->tries = 1;
    f->held = NL_HELD_NONE;
    if (p->proto != NL_IPPROTO_TCP)
        f->state = NL_FS_UDP;
    else if ((p->tcp_flags & (NL_TCP_SYN | NL_TCP_ACK)) == (NL_TCP_SYN | NL_TCP_ACK))
        f->state = NL_FS_SYN_SENT;   /* the SYN-ACK moves it to SYN_RECV */
    else
        f->state = NL_FS_ESTABLISHED;
    nl_flow_gauge(lb, f, f->state, 1);
    nl_count_failover(lb, NL_F_REPLY_ADOPTED, 1);
    return f;
}

void nl_cluster_track(struct nl_flow *f, int is_reply, uint8_t fl)
{
    if ((fl & (NL_TCP_SYN | NL_TCP_RST | NL_TCP_FIN)) || !(fl & NL_TCP_ACK))
        return;
    /* The client's ACK after its SYN: the SYN-ACK passed another node.
     * The backend's packet after its SYN-ACK: the client's ACK did. */
    if ((!is_reply && f->state == NL_FS_SYN_SENT) || (is_reply && f->state == NL_FS_SYN_RECV))
        f->state = NL_FS_ESTABLISHED;
}
