/*
 * fastpath.bpf.c -- natlb's fast path for established flows, as two tc
 * programs on the router's interfaces (README "The fast path").
 *
 * learn (tc egress): a packet natlb marked NL_MARK_FAST has been rewritten
 *   by the nft rewrite chain and is leaving towards its backend.  Its mark
 *   names the backend; the backends map gives the VIP.  Both directions'
 *   entries go into the flows map, with a fixed deadline: never refreshed,
 *   so natlb's own flow table stays the authority.
 * carry (tc ingress): an IPv4 TCP (no SYN) or UDP packet, not a
 *   fragment, without IP options, arriving where its entry says, before the
 *   deadline, with TTL > 1 and within the out device's MTU: rewritten, TTL
 *   decremented, counted and sent with bpf_redirect_neigh, skipping
 *   netfilter and the forwarding path.  Everything else: TC_ACT_OK, the
 *   normal path (nft, NFQUEUE, natlb).  A SYN that matches deletes both
 *   sides' entries (a new connection on the tuple is natlb's to place).
 *   A FIN cuts both sides' deadlines to natlb's closing timeout, an RST
 *   deletes both sides' entries; either is carried only if its head (as it
 *   arrived) and ingress device fit in the events ring buffer, where
 *   natlb's observer (csrc/tcfast.c) reads it and moves its own flow as a
 *   queued one would: natlb misses no state change (but a packet whose
 *   rewrite fails halfway, dropped untold).  Those two are
 *   not counted here (natlb counts them when it applies them).
 *
 * Every header read is bounds-checked against data_end.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath.h"

#define IP_MF_OFFSET 0x3fff        /* more fragments, fragment offset */
#define IP_CSUM_OFF (ETH_HLEN + 10)
#define IP_TTL_OFF (ETH_HLEN + 8)
#define IP_SADDR_OFF (ETH_HLEN + 12)
#define IP_DADDR_OFF (ETH_HLEN + 16)
#define L4_OFF (ETH_HLEN + 20)     /* ihl == 5 only */
#define TCP_CSUM_OFF (L4_OFF + 16)
#define UDP_CSUM_OFF (L4_OFF + 6)

/* Sizes are set by the loader before it loads the object. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct nl_fp_backend);
} backends SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 2);
    __type(key, struct nl_fp_key);
    __type(value, struct nl_fp_flow);
} flows SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, struct nl_fp_count);
} counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct nl_fp_config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NL_FP_STAT_MAX);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, NL_FP_RING_BYTES);
} events SEC(".maps");

/* The other side's key of a flow entry f found under k. */
static __always_inline struct nl_fp_key other_side(const struct nl_fp_key *k,
                                                   const struct nl_fp_flow *f)
{
    struct nl_fp_key r = {.proto = k->proto};
    if (f->dir == NL_FP_IN) {
        r.saddr = f->addr;
        r.daddr = k->saddr;
        r.sport = f->port;
        r.dport = k->sport;
    } else {
        r.saddr = k->daddr;
        r.daddr = f->addr;
        r.sport = k->dport;
        r.dport = f->port;
    }
    return r;
}

/* A FIN: neither entry outlives natlb's flow, which gets its closing
 * timeout when natlb applies the FIN (later than now). */
static __always_inline void cut_deadline(const struct nl_fp_key *k)
{
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    struct nl_fp_flow *f = bpf_map_lookup_elem(&flows, k);
    if (!cfg || !f)
        return;
    __u64 closing = bpf_ktime_get_ns() + cfg->tcp_closing_ns;
    if (closing < f->deadline_ns)
        f->deadline_ns = closing;
}

static __always_inline void count_stat(__u32 which)
{
    __u64 *v = bpf_map_lookup_elem(&stats, &which);
    if (v)
        (*v)++;
}

/* The handshake's last ACK was carried: natlb's flow is ESTABLISHED (once
 * it applies the record), so both entries live as an established flow's. */
static __always_inline void handshake_done(struct nl_fp_flow *f, const struct nl_fp_key *rk,
                                           int fin)
{
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    f->flags &= ~NL_FP_F_HANDSHAKE;
    if (!cfg || fin)
        return;                /* a FIN already cut both deadlines */
    __u64 deadline = bpf_ktime_get_ns() + cfg->tcp_lifetime_ns;
    f->deadline_ns = deadline;
    struct nl_fp_flow *r = bpf_map_lookup_elem(&flows, rk);
    if (r)
        r->deadline_ns = deadline;
}

/* The IPv4 header of a packet with an Ethernet header, bounds-checked. */
static __always_inline struct iphdr *ipv4_header(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + ETH_HLEN;

    if ((void *)(ip + 1) > data_end)
        return 0;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return 0;
    return ip;
}

SEC("tc")
int learn(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;

    if ((mark & NL_FP_MARK_KIND) != NL_FP_MARK_BASE || !(mark & NL_FP_MARK_FAST))
        return TC_ACT_OK;
    /* The mark was for nft and for us: nobody downstream reads it. */
    skb->mark = 0;

    struct iphdr *ip = ipv4_header(skb);
    if (!ip || ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF_OFFSET)))
        return TC_ACT_OK;
    void *data_end = (void *)(long)skb->data_end;
    __be16 *ports = (void *)(ip + 1);
    if ((void *)(ports + 2) > data_end)
        return TC_ACT_OK;
    /* A client's SYN (natlb marks only a new flow's first): the handshake
     * is carried, each step told to natlb (carry). */
    int syn = 0;
    __be32 synack_ack = 0;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th = (void *)(ip + 1);
        if ((void *)(th + 1) > data_end)
            return TC_ACT_OK;
        syn = th->syn && !th->ack;
        synack_ack = bpf_htonl(bpf_ntohl(th->seq) + 1);
    }

    __u32 bid = mark & NL_FP_MARK_ID;
    struct nl_fp_backend *b = bpf_map_lookup_elem(&backends, &bid);
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!b || !cfg || !b->proto || b->proto != ip->protocol || b->addr != ip->daddr ||
        b->port != ports[1])
        return TC_ACT_OK;      /* a stale mark (a publish in between): skip */

    __u64 now = bpf_ktime_get_ns();
    __u64 deadline = now + (syn ? cfg->syn_lifetime_ns
                            : b->proto == IPPROTO_TCP ? cfg->tcp_lifetime_ns
                            : cfg->udp_lifetime_ns);
    __u8 in_flags = syn ? NL_FP_F_HANDSHAKE : 0;
    __u8 out_flags = syn ? NL_FP_F_HANDSHAKE
                   : b->proto == IPPROTO_UDP ? NL_FP_F_UNREPLIED : 0;
    struct nl_fp_key fk = {.saddr = ip->saddr, .daddr = b->vip, .sport = ports[0],
                           .dport = b->vport, .proto = b->proto};
    struct nl_fp_flow fv = {.addr = b->addr, .port = b->port, .dir = NL_FP_IN,
                            .flags = in_flags, .backend_id = bid,
                            .out_ifindex = skb->ifindex,
                            .in_ifindex = skb->ingress_ifindex, .deadline_ns = deadline};
    struct nl_fp_key rk = {.saddr = b->addr, .daddr = ip->saddr, .sport = b->port,
                           .dport = ports[0], .proto = b->proto};
    struct nl_fp_flow rv = {.addr = b->vip, .port = b->vport, .dir = NL_FP_OUT,
                            .flags = out_flags, .backend_id = bid,
                            .out_ifindex = skb->ingress_ifindex,
                            .in_ifindex = skb->ifindex, .deadline_ns = deadline,
                            .synack_by_ns = syn ? now + cfg->synack_window_ns : 0,
                            .synack_ack = syn ? synack_ack : 0};
    if (!skb->ingress_ifindex)
        return TC_ACT_OK;      /* not forwarded: nothing to carry back */
    bpf_map_update_elem(&flows, &rk, &rv, BPF_ANY);
    bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
    return TC_ACT_OK;
}

SEC("tc")
int carry(struct __sk_buff *skb)
{
    struct iphdr *ip = ipv4_header(skb);
    if (!ip || ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF_OFFSET)))
        return TC_ACT_OK;
    void *data_end = (void *)(long)skb->data_end;
    struct nl_fp_key k = {.saddr = ip->saddr, .daddr = ip->daddr, .proto = ip->protocol};
    __u32 csum_off, csum_flags = BPF_F_PSEUDO_HDR;
    int syn = 0, fin = 0, rst = 0, ack = 0;
    __be32 ack_seq = 0;
    __u16 tot_len = bpf_ntohs(ip->tot_len);

    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th = (void *)(ip + 1);
        if ((void *)(th + 1) > data_end)
            return TC_ACT_OK;
        k.sport = th->source;
        k.dport = th->dest;
        syn = th->syn;
        fin = th->fin;
        rst = th->rst;
        ack = th->ack;
        ack_seq = th->ack_seq;
        csum_off = TCP_CSUM_OFF;
    } else if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *uh = (void *)(ip + 1);
        if ((void *)(uh + 1) > data_end)
            return TC_ACT_OK;
        k.sport = uh->source;
        k.dport = uh->dest;
        csum_off = UDP_CSUM_OFF;
        csum_flags |= BPF_F_MARK_MANGLED_0;   /* a zero UDP checksum stays zero */
    } else {
        return TC_ACT_OK;
    }

    struct nl_fp_flow *f = bpf_map_lookup_elem(&flows, &k);
    if (!f)
        return TC_ACT_OK;
    /* Copies: the helpers below invalidate every packet pointer. */
    struct nl_fp_flow flow = *f;
    struct nl_fp_key rk = other_side(&k, &flow);
    if (flow.in_ifindex != skb->ingress_ifindex)
        return TC_ACT_OK;      /* spoofed: changes nothing here, SYN or not */
    __u64 now = bpf_ktime_get_ns();
    int handshake = flow.flags & NL_FP_F_HANDSHAKE;
    /* The backend's answer to the SYN natlb placed: carried (and told) only
     * if it is the SYN-ACK that SYN asks for, in time. */
    int synack = handshake && flow.dir == NL_FP_OUT && syn && ack && !rst && !fin &&
                 ack_seq == flow.synack_ack && now <= flow.synack_by_ns;
    if ((syn && !synack) || (handshake && flow.dir == NL_FP_OUT && rst)) {
        /* A new connection on an old tuple, a SYN again (natlb counts its
         * tries and may move the flow), or the backend refusing the SYN
         * (natlb re-steers it; the client must never see that RST): natlb
         * places it, and neither side is carried until it marks one again. */
        bpf_map_delete_elem(&flows, &k);
        bpf_map_delete_elem(&flows, &rk);
        return TC_ACT_OK;
    }
    if (now > flow.deadline_ns) {
        /* natlb must see this one, and the flow's next packets until it
         * marks one fast again. */
        bpf_map_delete_elem(&flows, &k);
        return TC_ACT_OK;
    }
    int record = fin || rst || synack;
    int hs_ack = 0;
    if (handshake && !synack) {
        if (flow.dir == NL_FP_OUT)
            return TC_ACT_OK;  /* the backend, before its SYN-ACK: natlb's */
        /* The client: carried once the SYN-ACK was (natlb then holds its flow
         * in SYN_RECV, or will when it applies that record, which the ring
         * gives it first), with a record. */
        struct nl_fp_flow *r = bpf_map_lookup_elem(&flows, &rk);
        if (!r || (r->flags & NL_FP_F_HANDSHAKE))
            return TC_ACT_OK;
        record = 1;
        hs_ack = !rst;
    }
    int unreplied = flow.dir == NL_FP_OUT && (flow.flags & NL_FP_F_UNREPLIED);
    record |= unreplied;
    if (rst) {
        /* Carried or queued, natlb closes its flow on it: neither side may
         * be carried after it. */
        bpf_map_delete_elem(&flows, &k);
        bpf_map_delete_elem(&flows, &rk);
    } else if (fin) {
        cut_deadline(&k);
        cut_deadline(&rk);
    }
    if (ip->ttl <= 1)
        return TC_ACT_OK;      /* natlb's ICMP to send */

    __u8 ttl = ip->ttl, proto = ip->protocol;
    __u32 mtu_len = 0;
    if (bpf_check_mtu(skb, flow.out_ifindex, &mtu_len, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
        return TC_ACT_OK;      /* too big: natlb and the kernel do PMTU */

    struct nl_fp_event *ev = 0;
    if (record) {
        ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
        if (!ev) {
            count_stat(NL_FP_STAT_RING_FULL);
            return TC_ACT_OK;  /* no room to tell natlb: it sees the packet */
        }
        /* 64-bit all along: the verifier then knows 28 <= n <= 128. */
        __u64 n = skb->len;
        n = n > ETH_HLEN ? n - ETH_HLEN : 0;
        if (n > tot_len)
            n = tot_len;       /* never the Ethernet padding */
        if (n > NL_FP_HEAD)
            n = NL_FP_HEAD;
        if (n < sizeof(struct iphdr) + sizeof(struct udphdr) ||
            bpf_skb_load_bytes(skb, ETH_HLEN, ev->head, n)) {
            bpf_ringbuf_discard(ev, 0);
            return TC_ACT_OK;
        }
        ev->ifindex = skb->ingress_ifindex;
        ev->len = n;
        ev->tot_len = tot_len;
    }

    __be32 old_addr;
    __be16 old_port;
    __u32 addr_off, port_off;
    if (flow.dir == NL_FP_IN) {
        old_addr = k.daddr;
        old_port = k.dport;
        addr_off = IP_DADDR_OFF;
        port_off = L4_OFF + 2;
    } else {
        old_addr = k.saddr;
        old_port = k.sport;
        addr_off = IP_SADDR_OFF;
        port_off = L4_OFF;
    }
    if (bpf_l4_csum_replace(skb, csum_off, old_addr, flow.addr, csum_flags | 4) ||
        bpf_l4_csum_replace(skb, csum_off, old_port, flow.port,
                            (csum_flags & BPF_F_MARK_MANGLED_0) | 2) ||
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, flow.addr, 4) ||
        bpf_skb_store_bytes(skb, addr_off, &flow.addr, 4, 0) ||
        bpf_skb_store_bytes(skb, port_off, &flow.port, 2, 0))
        goto shot;             /* half rewritten: never send it on */
    /* TTL shares a 16-bit checksum word with the protocol. */
    __be16 old_word = bpf_htons(((__u16)ttl << 8) | proto);
    __be16 new_word = bpf_htons(((__u16)(ttl - 1) << 8) | proto);
    __u8 new_ttl = ttl - 1;
    if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_word, new_word, 2) ||
        bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, 1, 0))
        goto shot;

    if (ev) {
        /* What the record tells natlb needs telling only once: the flag goes
         * with the packet that carried it (f is the map's value; an entry
         * deleted meanwhile is not reused while we hold it). */
        if (synack || unreplied)
            f->flags &= ~(NL_FP_F_HANDSHAKE | NL_FP_F_UNREPLIED);
        else if (hs_ack)
            handshake_done(f, &rk, fin);
        /* A wakeup per record would cost natlb a context switch per FIN;
         * while its observer polls (busy) it needs none, unless the ring
         * fills up: then the wakeup ends the observer's 1 ms wait early. */
        __u32 zero = 0;
        struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
        __u64 wake = 0;
        if (cfg && cfg->observer_polling)
            wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > NL_FP_RING_BYTES / 4
                   ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
        bpf_ringbuf_submit(ev, wake);
    } else {
        __u32 slot = flow.backend_id * 2 + flow.dir;
        struct nl_fp_count *c = bpf_map_lookup_elem(&counters, &slot);
        if (c) {
            c->packets++;
            c->bytes += skb->len - ETH_HLEN;   /* IP length, as natlb counts */
        }
    }
    return bpf_redirect_neigh(flow.out_ifindex, 0, 0, 0);
shot:
    if (ev)
        bpf_ringbuf_discard(ev, 0);
    return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
