/*
 * fastpath.bpf.c -- natlb's fast path for established flows, as two tc
 * programs on the router's interfaces (README "The fast path").
 *
 * learn (tc egress): a packet natlb marked NL_MARK_FAST has been rewritten
 *   by the nft rewrite chain and is leaving towards its backend (or, a
 *   cluster service's reply, towards its client).  Its mark names the
 *   backend; the backends map gives the VIP.  Both directions'
 *   entries go into the flows map, with a fixed deadline: never refreshed,
 *   so natlb's own flow table stays the authority.
 * carry (tc ingress): a TCP (no SYN) or UDP packet, IPv4 not a fragment,
 *   without IP options and with a right header checksum, or IPv6 with TCP
 *   or UDP right after its fixed header (no extension header; a UDP
 *   checksum), whose IP length lies within the frame and holds its L4
 *   header (a TCP data offset of 5 words or more, a UDP length of 8 bytes
 *   or more, neither past the IP length), arriving where its entry
 *   says, before the deadline, with TTL (hop limit) > 1 and within the out
 *   device's MTU (a GSO packet: each of its segments): rewritten, TTL decremented, counted and sent with
 *   bpf_redirect_neigh, skipping netfilter and the forwarding path
 *   (counted by its IP length, not a frame's padding).
 *   Everything else: TC_ACT_OK, the normal path (nft, NFQUEUE, natlb).  A SYN that matches deletes both
 *   sides' entries (a new connection on the tuple is natlb's to place).
 *   A SYN arriving elsewhere than its entry says changes nothing.
 *   A FIN cuts both sides' deadlines to natlb's closing timeout, an RST
 *   deletes both sides' entries; either is carried only if its head (as it
 *   arrived) and ingress device fit in the events ring buffer, where
 *   natlb's observer (csrc/tcfast.c) reads it and moves its own flow as a
 *   queued one would: natlb misses no state change (but a packet whose
 *   rewrite fails halfway, dropped untold).  Those two are
 *   not counted here (natlb counts them when it applies them).
 *
 * forget_flows (never attached): run by natlb (BPF_PROG_TEST_RUN) when a
 *   backend's flows must go (`reset`, a UDP backend lost): one pass of the
 *   kernel over the flows map, making that backend's entries dead in place.
 *
 * Both families run the same code: the functions taking `v6` are always
 * inlined with a constant, so each family's program text is straight, with
 * only its own header's offsets and checksums (IPv6 has no header checksum;
 * its L4 pseudo-header changes with the 128-bit address).  Headers are
 * written directly, not through a helper call each (rewrite()): the
 * verifier then makes the kernel unclone a cloned packet before the
 * program runs.
 *
 * Every header read is bounds-checked against data_end.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "fastpath.h"
#include "../mix32.h"

#define IP_MF_OFFSET 0x3fff        /* more fragments, fragment offset */
#define IPV4_PLAIN 0x45            /* version 4, a 20-byte header: no options */

/* Where each family keeps what the programs read and write. */
static __always_inline __u32 l3_len(int v6)
{
    return v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
}

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

/* What natlb lets the kernel decide (a new flow's first packet): the
 * services, and their scheduler tables (backend ids), which the loader
 * writes through a mapping of the array. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1);
    __type(key, struct nl_fp_svc_key);
    __type(value, struct nl_fp_svc);
} svcs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __uint(map_flags, BPF_F_MMAPABLE);
    __type(key, __u32);
    __type(value, struct nl_fp_slots);
} tables SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, NL_FP_RING_BYTES);
} events SEC(".maps");

/* The backends whose flows a walk of `forget_flows` makes dead: one bit per
 * backend id (the loader sizes it to max_backends). */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} doomed SEC(".maps");

/* A socket of natlb's observer: the kernel removes it from here when it
 * closes, natlb killed or not (config.observer_alive says one is due). */
struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} observer SEC(".maps");

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
    f->flags |= NL_FP_F_CLOSING;
}

/* The client's side of a flow natlb places again (its SYN again, the
 * backend refusing it) is kept dead rather than deleted, as an expired one
 * is: the tuple's next first packet then goes to natlb, which may still
 * hold the flow, instead of being placed anew by decide (an rr service
 * would move it).  learn's next entry for it replaces it; the LRU evicts
 * it otherwise. */
static __always_inline void bury(struct nl_fp_flow *f)
{
    /* Dead from now on, and dead since when: natlb takes a backend side
     * that died moments ago for a placed flow's (nl_fp_placed).  One dead
     * already keeps its time of death: a packet on a long-dead tuple (a
     * client reusing a port straight to the backend) must not revive it. */
    __u64 now = bpf_ktime_get_ns();
    if (f->deadline_ns >= now)
        f->deadline_ns = now - 1;
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
    /* An entry made dead meanwhile (forget_flows on another CPU, a reset)
     * stays dead: only a live one gets the established lifetime. */
    __u64 now = bpf_ktime_get_ns(), deadline = now + cfg->tcp_lifetime_ns;
    if (f->deadline_ns > now)
        f->deadline_ns = deadline;
    struct nl_fp_flow *r = bpf_map_lookup_elem(&flows, rk);
    if (r && r->deadline_ns > now)
        r->deadline_ns = deadline;
}

/* The EtherType of a frame, or 0 if it has no whole Ethernet header. */
static __always_inline __be16 eth_proto(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return 0;
    return eth->h_proto;
}

/* An IPv4 address as natlb's core holds it: ::ffff:a.b.c.d */
static __always_inline void map_v4(__be32 *a, __be32 v4)
{
    a[0] = 0;
    a[1] = 0;
    a[2] = bpf_htonl(0xffff);
    a[3] = v4;
}

/* An IPv4 source the kernel's routing never forwards from (ip_route_input:
 * martian): 0/8, 127/8, multicast, the limited broadcast. */
static __always_inline int martian_v4(__be32 a)
{
    __u32 h = bpf_ntohl(a);
    __u32 top = h >> 24;
    return top == 0 || top == 127 || (top & 0xf0) == 0xe0 || h == 0xffffffff;
}

/* What the programs read of a packet they may take. */
struct parsed {
    struct nl_fp_key k;            /* its 5-tuple and family, as it arrived */
    __u32 tot_len;                 /* its IP length                         */
    __be32 seq, ack_seq;           /* TCP                                   */
    __u8 ttl;                      /* TTL or hop limit                      */
    __u8 syn, fin, rst, ack;       /* TCP flags                             */
};

/* A 32-bit sum of 16-bit words, folded to 16 bits (one's complement). */
static __always_inline __u16 fold(__u32 s)
{
    s = (s & 0xffff) + (s >> 16);
    return s + (s >> 16);
}

/* An IPv4 header (without options) whose checksum is right: the kernel
 * drops the others on receive (ip_rcv), before natlb could see them. */
static __always_inline int ip4_sum_ok(const struct iphdr *ip)
{
    const __u16 *w = (const __u16 *)ip;
    __u32 s = 0;
    for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
        s += w[i];
    return fold(s) == 0xffff;
}

/* A frame of family v6, every header read bounds-checked, if the fast path
 * takes its packet: IPv4 without options, not a fragment, with a right
 * header checksum, or IPv6 without extension headers; TCP, or UDP (over
 * IPv6 with a checksum: none is a bad one, RFC 8200 8.1, natlb's to drop).
 * Its IP length must lie within the frame and hold the L4 header (a TCP
 * data offset of at least 5 words, a UDP length of at least 8 bytes, no
 * more than the packet has): what the kernel would drop on receive, or
 * natlb as malformed, is theirs (a rewrite would touch bytes past the
 * packet, or pass on one that lies about its length).  0 if taken. */
static __always_inline int parse(struct __sk_buff *skb, int v6, struct parsed *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct nl_fp_key *k = &p->k;

    if (v6) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
            return -1;
        __builtin_memcpy(k->saddr, &ip6->saddr, sizeof k->saddr);
        __builtin_memcpy(k->daddr, &ip6->daddr, sizeof k->daddr);
        /* Extension headers (fragment, hop-by-hop, routing...): natlb's. */
        k->proto = ip6->nexthdr;
        p->tot_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
        p->ttl = ip6->hop_limit;
    } else {
        struct iphdr *ip = data + ETH_HLEN;
        if ((void *)(ip + 1) > data_end || *(__u8 *)ip != IPV4_PLAIN ||
            (ip->frag_off & bpf_htons(IP_MF_OFFSET)) || !ip4_sum_ok(ip))
            return -1;
        map_v4(k->saddr, ip->saddr);
        map_v4(k->daddr, ip->daddr);
        k->proto = ip->protocol;
        p->tot_len = bpf_ntohs(ip->tot_len);
        p->ttl = ip->ttl;
    }
    /* skb->len holds the whole IP header (read above): no underflow.  A
     * GSO packet's IP length is its whole (GRO writes it so); a BIG TCP
     * one's 0: queued. */
    if (p->tot_len > skb->len - ETH_HLEN || p->tot_len < l3_len(v6))
        return -1;
    __u32 l4_len = p->tot_len - l3_len(v6);
    k->family = v6 ? 6 : 4;
    void *l4 = data + ETH_HLEN + l3_len(v6);
    if (k->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end || th->doff < 5 || th->doff * 4u > l4_len)
            return -1;
        k->sport = th->source;
        k->dport = th->dest;
        p->seq = th->seq;
        p->ack_seq = th->ack_seq;
        p->syn = th->syn;
        p->fin = th->fin;
        p->rst = th->rst;
        p->ack = th->ack;
        return 0;
    }
    if (k->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end || (v6 && !uh->check) ||
            bpf_ntohs(uh->len) < sizeof(*uh) || bpf_ntohs(uh->len) > l4_len)
            return -1;
        k->sport = uh->source;
        k->dport = uh->dest;
        return 0;
    }
    return -1;
}

static __always_inline int same_addr(int v6, const __be32 *a, const __be32 *b)
{
    if (!v6)
        return a[3] == b[3];   /* the family is compared apart */
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline int learn_ip(struct __sk_buff *skb, int v6, __u32 bid)
{
    /* The packet as it leaves: client -> backend. */
    struct parsed p = {};
    if (parse(skb, v6, &p))
        return TC_ACT_OK;
    /* A client's SYN (natlb marks only a new flow's first): the handshake
     * is carried, each step told to natlb (carry). */
    int syn = p.syn && !p.ack;
    __be32 synack_ack = bpf_htonl(bpf_ntohl(p.seq) + 1);

    struct nl_fp_backend *b = bpf_map_lookup_elem(&backends, &bid);
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!b || !cfg || !b->proto || b->proto != p.k.proto || b->family != p.k.family ||
        !same_addr(v6, b->addr, p.k.daddr) || b->port != p.k.dport)
        return TC_ACT_OK;      /* a stale mark (a publish in between): skip */
    if (!skb->ingress_ifindex)
        return TC_ACT_OK;      /* not forwarded: nothing to carry back */

    __u64 now = bpf_ktime_get_ns();
    __u64 deadline = now + (syn ? cfg->syn_lifetime_ns
                            : b->proto == IPPROTO_TCP ? cfg->tcp_lifetime_ns
                            : cfg->udp_lifetime_ns);
    struct nl_fp_key fk = {.sport = p.k.sport, .dport = b->vport, .proto = b->proto,
                           .family = p.k.family};
    __builtin_memcpy(fk.saddr, p.k.saddr, sizeof fk.saddr);
    __builtin_memcpy(fk.daddr, b->vip, sizeof fk.daddr);
    struct nl_fp_flow fv = {.port = b->port, .dir = NL_FP_IN,
                            .flags = syn ? NL_FP_F_HANDSHAKE : 0, .backend_id = bid,
                            .out_ifindex = skb->ifindex,
                            .in_ifindex = skb->ingress_ifindex, .deadline_ns = deadline};
    __builtin_memcpy(fv.addr, b->addr, sizeof fv.addr);
    struct nl_fp_key rk;
    nl_fp_other_side(&fk, &fv, &rk);
    struct nl_fp_flow rv = {.port = b->vport, .dir = NL_FP_OUT,
                            .flags = syn ? NL_FP_F_HANDSHAKE
                                   : b->proto == IPPROTO_UDP ? NL_FP_F_UNREPLIED : 0,
                            .backend_id = bid, .out_ifindex = skb->ingress_ifindex,
                            .in_ifindex = skb->ifindex, .deadline_ns = deadline,
                            .synack_by_ns = syn ? now + cfg->synack_window_ns : 0,
                            .synack_ack = syn ? synack_ack : 0};
    __builtin_memcpy(rv.addr, b->vip, sizeof rv.addr);
    bpf_map_update_elem(&flows, &rk, &rv, BPF_ANY);
    bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
    return TC_ACT_OK;
}

/* A cluster service's established reply natlb marked fast, leaving towards
 * the client (VIP -> client, rewritten): both directions installed as
 * learn_ip installs them from the client's side, mirrored.  The node may
 * never see the client's packets (the routers hash each direction apart);
 * if it does, they are carried back where this reply came from.  Never
 * from a handshake: natlb marks only an established flow's replies. */
static __always_inline int learn_reply_ip(struct __sk_buff *skb, int v6, __u32 bid)
{
    struct parsed p = {};
    if (parse(skb, v6, &p))
        return TC_ACT_OK;
    struct nl_fp_backend *b = bpf_map_lookup_elem(&backends, &bid);
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!b || !cfg || !b->proto || b->proto != p.k.proto || b->family != p.k.family ||
        !same_addr(v6, b->vip, p.k.saddr) || b->vport != p.k.sport || p.syn)
        return TC_ACT_OK;      /* a stale mark (a publish in between): skip */
    if (!skb->ingress_ifindex)
        return TC_ACT_OK;

    __u64 deadline = bpf_ktime_get_ns() + (b->proto == IPPROTO_TCP ? cfg->tcp_lifetime_ns
                                                                   : cfg->udp_lifetime_ns);
    struct nl_fp_key rk = {.sport = b->port, .dport = p.k.dport, .proto = b->proto,
                           .family = p.k.family};
    __builtin_memcpy(rk.saddr, b->addr, sizeof rk.saddr);
    __builtin_memcpy(rk.daddr, p.k.daddr, sizeof rk.daddr);
    struct nl_fp_flow rv = {.port = b->vport, .dir = NL_FP_OUT, .backend_id = bid,
                            .out_ifindex = skb->ifindex, .in_ifindex = skb->ingress_ifindex,
                            .deadline_ns = deadline};
    __builtin_memcpy(rv.addr, b->vip, sizeof rv.addr);
    struct nl_fp_key fk;
    nl_fp_other_side(&rk, &rv, &fk);
    struct nl_fp_flow fv = {.port = b->port, .dir = NL_FP_IN, .backend_id = bid,
                            .out_ifindex = skb->ingress_ifindex, .in_ifindex = skb->ifindex,
                            .deadline_ns = deadline};
    __builtin_memcpy(fv.addr, b->addr, sizeof fv.addr);
    bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
    bpf_map_update_elem(&flows, &rk, &rv, BPF_ANY);
    return TC_ACT_OK;
}

SEC("tc")
int learn(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;
    __u32 kind = mark & NL_FP_MARK_KIND;

    if ((kind != NL_FP_MARK_BASE && kind != NL_FP_MARK_REPLY) || !(mark & NL_FP_MARK_FAST))
        return TC_ACT_OK;
    /* The mark was for nft and for us: nobody downstream reads it. */
    skb->mark = 0;
    int reply = kind == NL_FP_MARK_REPLY;
    __be16 proto = eth_proto(skb);
    if (proto == bpf_htons(ETH_P_IP))
        return reply ? learn_reply_ip(skb, 0, mark & NL_FP_MARK_ID)
                     : learn_ip(skb, 0, mark & NL_FP_MARK_ID);
    if (proto == bpf_htons(ETH_P_IPV6))
        return reply ? learn_reply_ip(skb, 1, mark & NL_FP_MARK_ID)
                     : learn_ip(skb, 1, mark & NL_FP_MARK_ID);
    return TC_ACT_OK;
}

/* The rewrite of a carried packet found under k: its address and port to
 * flow's, the checksums after them, TTL (hop limit) decremented.  The L4
 * checksum goes through the kernel's helpers (they know CHECKSUM_PARTIAL and
 * GSO packets); the headers, all in the linear part (parse read them there),
 * are written directly, and IPv4's header checksum updated here (RFC 1624).
 * Nonzero if a helper failed (the L4 sum may be half updated). */
static __always_inline int rewrite(struct __sk_buff *skb, int v6, const struct nl_fp_key *k,
                                   const struct nl_fp_flow *flow, __u32 csum_off,
                                   __u32 csum_flags, __u8 ttl)
{
    int in = flow->dir == NL_FP_IN;
    const __be32 *old_addr = in ? k->daddr : k->saddr;
    __be16 old_port = in ? k->dport : k->sport;
    __u32 port_flags = (csum_flags & BPF_F_MARK_MANGLED_0) | 2;
    __s64 diff = 0;

    if (v6) {
        /* The L4 sum takes the 128-bit change of its pseudo-header as one
         * difference. */
        diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)flow->addr, 16, 0);
        if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, csum_flags))
            return -1;
    } else if (bpf_l4_csum_replace(skb, csum_off, old_addr[3], flow->addr[3], csum_flags | 4)) {
        return -1;
    }
    if (bpf_l4_csum_replace(skb, csum_off, old_port, flow->port, port_flags))
        return -1;

    /* The helpers may have moved the packet: its headers again. */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __be16 *ports = data + ETH_HLEN + l3_len(v6);
    if ((void *)(ports + 2) > data_end)
        return -1;
    ports[in ? 1 : 0] = flow->port;
    if (v6) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        __be16 old_word = *(__be16 *)&ip6->nexthdr;
        __builtin_memcpy(in ? ip6->daddr.in6_u.u6_addr32 : ip6->saddr.in6_u.u6_addr32,
                         flow->addr, 16);
        ip6->hop_limit = ttl - 1;
        /* No header checksum: what a device summed (CHECKSUM_COMPLETE, which
         * covers the header here) takes the address's and hop limit's
         * change, as IPv4's header checksum does.  A no-op otherwise. */
        __u32 d = (__u32)diff, h = (__u16)~old_word + *(__u16 *)&ip6->nexthdr;
        d += h;
        bpf_csum_update(skb, d + (d < h));
        return 0;
    }
    struct iphdr *ip = data + ETH_HLEN;
    /* The address, and TTL (which shares a 16-bit word with the protocol). */
    __be16 old_word = *(__be16 *)&ip->ttl;
    if (in)
        ip->daddr = flow->addr[3];
    else
        ip->saddr = flow->addr[3];
    ip->ttl = ttl - 1;
    __be16 new_word = *(__be16 *)&ip->ttl;
    /* One's complement sums of the 16-bit words as they lie in memory: the
     * result does not depend on byte order. */
    __be32 o = old_addr[3], n = flow->addr[3];
    __u32 s = (__u16)~ip->check + (__u16)~(o & 0xffff) + (__u16)~(o >> 16) +
              (n & 0xffff) + (n >> 16) + (__u16)~old_word + new_word;
    ip->check = ~fold(s);
    return 0;
}

/* natlb's nl_addr_hash (csrc/internal.h), bit for bit, over the shared
 * nl_mix32: a flow's sh or maglev backend is the same whoever places its
 * first packet. */

static __always_inline __u32 addr_hash(int v6, const __be32 *a, __u32 seed)
{
    __u32 h = nl_mix32(a[3] ^ seed);
    if (!v6)
        return h;
    return nl_mix32(nl_mix32(nl_mix32(h ^ a[0]) ^ a[1]) ^ a[2]);
}

/* The table slot natlb's first_slot (csrc/scheduler.c) would take. */
static __always_inline __u32 first_slot(int v6, const struct nl_fp_key *k, struct nl_fp_svc *s,
                                        __u32 seed)
{
    __u32 len = s->table_len;
    if (s->scheduler == NL_FP_SCHED_SH)
        return addr_hash(v6, k->saddr, seed) % len;
    if (s->scheduler == NL_FP_SCHED_MAGLEV)
        return nl_mix32(addr_hash(v6, k->saddr, seed) ^ ((__u32)k->sport << 8) ^ k->proto) % len;
    /* A fetching add (BPF v3): two CPUs never take the same slot. */
    return __sync_fetch_and_add(&s->cursor, 1) % len;
}

/* A new flow's first packet (a client's SYN, a UDP datagram) that no entry
 * knows, to a service natlb published for the kernel to decide: placed
 * here as natlb would (its table, its hash), both entries installed as
 * learn installs them, and natlb told with a record that holds the packet
 * as it arrived (the SYN whole, which natlb keeps for re-steering) and the
 * backend.  The record is reserved first: whatever fails, the packet goes
 * on to natlb untouched and nothing is left behind that natlb will not
 * hear of.  The route lookup refuses an IPv6 source that is multicast,
 * link-local or loopback (never forwarded: queued, as no route); an IPv4
 * source the kernel's routing calls martian is refused alike (martian_v4). */
static __always_inline int decide(struct __sk_buff *skb, int v6, struct parsed *p,
                                  __u32 csum_off, __u32 csum_flags)
{
    struct nl_fp_key *k = &p->k;
    int syn = k->proto == IPPROTO_TCP;
    if (syn && !(p->syn && !p->ack && !p->rst && !p->fin))
        return TC_ACT_OK;
    struct nl_fp_svc_key sk = {.port = k->dport, .proto = k->proto, .family = k->family};
    __builtin_memcpy(sk.vip, k->daddr, sizeof sk.vip);
    struct nl_fp_svc *s = bpf_map_lookup_elem(&svcs, &sk);
    if (!s)
        return TC_ACT_OK;
    __u32 zero = 0;
    struct nl_fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!cfg || !cfg->decide || !s->table_len)
        return TC_ACT_OK;
    /* Placed here, a flow lives only if an observer applies its record: not
     * once natlb is gone (killed: its filters stay for a successor, which
     * brings new maps) or stuck.  The observer beats each round. */
    __u64 now = bpf_ktime_get_ns();
    if (cfg->heartbeat_ns && now - cfg->heartbeat_ns > cfg->stale_ns) {
        count_stat(NL_FP_STAT_DECIDE_STALE);
        return TC_ACT_OK;
    }
    if (cfg->observer_alive) {
        struct bpf_sock *sk = bpf_map_lookup_elem(&observer, &zero);
        if (!sk) {
            count_stat(NL_FP_STAT_DECIDE_STALE);   /* natlb is gone: at once */
            return TC_ACT_OK;
        }
        bpf_sk_release(sk);
    }
    /* 64-bit all along: the verifier then knows n <= 128. */
    __u64 n = skb->len;
    n = n > ETH_HLEN ? n - ETH_HLEN : 0;
    if (n > p->tot_len)
        n = p->tot_len;
    if (p->ttl <= 1 || (syn && n < p->tot_len) || (syn && p->tot_len > NL_FP_HEAD)) {
        count_stat(NL_FP_STAT_DECIDE_PACKET);
        return TC_ACT_OK;
    }
    if (!v6 && martian_v4(k->saddr[3])) {
        count_stat(NL_FP_STAT_DECIDE_ROUTE);
        return TC_ACT_OK;      /* the kernel's routing drops it, not a backend */
    }
    if (n > NL_FP_HEAD)
        n = NL_FP_HEAD;        /* UDP: natlb needs only the head */
    struct nl_fp_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
    if (!ev) {
        count_stat(NL_FP_STAT_DECIDE_RING);
        return TC_ACT_OK;
    }
    if (n < l3_len(v6) + sizeof(struct udphdr) ||
        bpf_skb_load_bytes(skb, ETH_HLEN, ev->head, n))
        goto packet;
    ev->ifindex = skb->ingress_ifindex;
    ev->len = n;
    ev->tot_len = p->tot_len > 0xffff ? 0xffff : p->tot_len;

    __u32 slot = s->table_off + first_slot(v6, k, s, cfg->sched_seed);
    __u32 pair = slot / 2;
    struct nl_fp_slots *two = bpf_map_lookup_elem(&tables, &pair);
    if (!two)
        goto packet;
    __u32 bid = two->id[slot & 1];
    struct nl_fp_backend *b = bpf_map_lookup_elem(&backends, &bid);
    /* A slot of a table being replaced may name a backend of another
     * service: only this service's are taken. */
    if (!b || b->proto != k->proto || b->family != k->family || b->vport != k->dport ||
        !same_addr(v6, b->vip, k->daddr))
        goto packet;

    struct bpf_fib_lookup fib = {.family = v6 ? 10 : 2, .l4_protocol = k->proto,
                                 .sport = k->sport, .dport = b->port,
                                 .ifindex = skb->ingress_ifindex};
    if (v6) {
        __builtin_memcpy(fib.ipv6_src, k->saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, b->addr, 16);
    } else {
        fib.ipv4_src = k->saddr[3];
        fib.ipv4_dst = b->addr[3];
    }
    int rc = bpf_fib_lookup(skb, &fib, sizeof fib, BPF_FIB_LOOKUP_SKIP_NEIGH);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
        count_stat(NL_FP_STAT_DECIDE_ROUTE);
        bpf_ringbuf_discard(ev, 0);
        return TC_ACT_OK;
    }
    __u32 out_ifindex = fib.ifindex, mtu_len = 0;
    if (bpf_check_mtu(skb, out_ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS) !=
        BPF_MTU_CHK_RET_SUCCESS) {
        count_stat(NL_FP_STAT_DECIDE_ROUTE);
        bpf_ringbuf_discard(ev, 0);
        return TC_ACT_OK;
    }

    /* The entries, as learn makes them from the packet it would have seen. */
    __u64 deadline = now + (syn ? cfg->syn_lifetime_ns : cfg->udp_lifetime_ns);
    struct nl_fp_flow fv = {.port = b->port, .dir = NL_FP_IN,
                            .flags = syn ? NL_FP_F_HANDSHAKE : 0, .backend_id = bid,
                            .out_ifindex = out_ifindex,
                            .in_ifindex = skb->ingress_ifindex, .deadline_ns = deadline};
    __builtin_memcpy(fv.addr, b->addr, sizeof fv.addr);
    struct nl_fp_key rk;
    nl_fp_other_side(k, &fv, &rk);
    struct nl_fp_flow rv = {.port = k->dport, .dir = NL_FP_OUT,
                            .flags = syn ? NL_FP_F_HANDSHAKE : NL_FP_F_UNREPLIED,
                            .backend_id = bid, .out_ifindex = skb->ingress_ifindex,
                            .in_ifindex = out_ifindex, .deadline_ns = deadline,
                            .synack_by_ns = syn ? now + cfg->synack_window_ns : 0,
                            .synack_ack = syn ? bpf_htonl(bpf_ntohl(p->seq) + 1) : 0};
    __builtin_memcpy(rv.addr, k->daddr, sizeof rv.addr);
    /* The client's side first, only if still unknown: a tuple another CPU
     * is placing (a SYN sent twice at once) is left to it. */
    if (bpf_map_update_elem(&flows, k, &fv, BPF_NOEXIST)) {
        count_stat(NL_FP_STAT_DECIDE_MAP);
        bpf_ringbuf_discard(ev, 0);
        return TC_ACT_OK;
    }
    if (bpf_map_update_elem(&flows, &rk, &rv, BPF_ANY)) {
        bpf_map_delete_elem(&flows, k);
        count_stat(NL_FP_STAT_DECIDE_MAP);
        bpf_ringbuf_discard(ev, 0);
        return TC_ACT_OK;
    }
    ev->new_backend = bid;
    if (rewrite(skb, v6, k, &fv, csum_off, csum_flags, p->ttl)) {
        /* Never sent: nothing of it may stay. */
        bpf_map_delete_elem(&flows, k);
        bpf_map_delete_elem(&flows, &rk);
        bpf_ringbuf_discard(ev, 0);
        return TC_ACT_SHOT;
    }
    /* What the kernel made of the checksum field (a CHECKSUM_PARTIAL
     * packet's stays a partial form): natlb believes a partial form only
     * if it is that of the header sent. */
    __u16 sent = 0;
    bpf_skb_load_bytes(skb, csum_off, &sent, sizeof sent);
    ev->sent_csum = sent;
    ev->pad = 0;
    ev->placed_ns = now;
    count_stat(NL_FP_STAT_DECIDED);
    __u64 wake = 0;
    if (cfg->observer_polling)
        wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > NL_FP_RING_BYTES / 4
               ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
    bpf_ringbuf_submit(ev, wake);
    return bpf_redirect_neigh(out_ifindex, 0, 0, 0);
packet:
    count_stat(NL_FP_STAT_DECIDE_PACKET);
    bpf_ringbuf_discard(ev, 0);
    return TC_ACT_OK;
}

static __always_inline int carry_ip(struct __sk_buff *skb, int v6)
{
    struct parsed p = {};
    if (parse(skb, v6, &p))
        return TC_ACT_OK;
    struct nl_fp_key *k = &p.k;
    int syn = p.syn, fin = p.fin, rst = p.rst;
    __u32 csum_off = ETH_HLEN + l3_len(v6);
    __u32 csum_flags = BPF_F_PSEUDO_HDR;
    if (k->proto == IPPROTO_TCP) {
        csum_off += offsetof(struct tcphdr, check);
    } else {
        csum_off += offsetof(struct udphdr, check);
        csum_flags |= BPF_F_MARK_MANGLED_0;   /* an IPv4 zero stays zero */
    }

    struct nl_fp_flow *f = bpf_map_lookup_elem(&flows, k);
    if (f && p.syn && !p.ack && f->dir == NL_FP_IN && (f->flags & NL_FP_F_CLOSING) &&
        f->in_ifindex == skb->ingress_ifindex) {
        /* The client reusing a closed connection's port (natlb makes a new
         * flow of that SYN too): the old entries go, and it is placed as
         * any first packet.  Only from where the client's packets arrive: a
         * spoofed one changes nothing (below). */
        struct nl_fp_key old;
        nl_fp_other_side(k, f, &old);
        bpf_map_delete_elem(&flows, &old);
        bpf_map_delete_elem(&flows, k);
        f = 0;
    }
    if (!f)
        return decide(skb, v6, &p, csum_off, csum_flags);
    /* Copies: the helpers below invalidate every packet pointer. */
    struct nl_fp_flow flow = *f;
    struct nl_fp_key rk;       /* the other side's, made where it is needed */
    if (flow.in_ifindex != skb->ingress_ifindex)
        return TC_ACT_OK;      /* spoofed: changes nothing here, SYN or not */
    __u64 now = bpf_ktime_get_ns();
    int handshake = flow.flags & NL_FP_F_HANDSHAKE;
    /* The backend's answer to the SYN natlb placed: carried (and told) only
     * if it is the SYN-ACK that SYN asks for, in time. */
    int synack = handshake && flow.dir == NL_FP_OUT && syn && p.ack && !rst && !fin &&
                 p.ack_seq == flow.synack_ack && now <= flow.synack_by_ns;
    if ((syn && !synack) || (handshake && flow.dir == NL_FP_OUT && rst)) {
        /* A new connection on an old tuple, a SYN again (natlb counts its
         * tries and may move the flow), or the backend refusing the SYN
         * (natlb re-steers it; the client must never see that RST): natlb
         * places it, and neither side is carried until it marks one again. */
        nl_fp_other_side(k, &flow, &rk);
        if (flow.dir == NL_FP_IN) {
            /* Both sides kept, dead: the backend's answer to the SYN it got
             * is then told (nl_fp_placed) from traffic straight to it. */
            struct nl_fp_flow *out = bpf_map_lookup_elem(&flows, &rk);
            if (out)
                bury(out);
            bury(f);
        } else {
            /* The backend's side stays too, dead: natlb, not holding the
             * flow yet, tells by it that this RST is a placed flow's answer
             * to hold (nl_fp_placed), not traffic straight to the backend. */
            struct nl_fp_flow *in = bpf_map_lookup_elem(&flows, &rk);
            if (in)
                bury(in);
            bury(f);
        }
        return TC_ACT_OK;
    }
    if (now > flow.deadline_ns) {
        /* natlb must see this one, and the flow's next packets until it
         * marks one fast again.  Both sides stay, dead, until natlb marks
         * the flow again or the LRU needs the room (the backend's side, dead
         * a moment ago, says the answer is a placed flow's: nl_fp_placed). */
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
        nl_fp_other_side(k, &flow, &rk);
        struct nl_fp_flow *r = bpf_map_lookup_elem(&flows, &rk);
        if (!r || (r->flags & NL_FP_F_HANDSHAKE))
            return TC_ACT_OK;
        record = 1;
        hs_ack = !rst;
    }
    int unreplied = flow.dir == NL_FP_OUT && (flow.flags & NL_FP_F_UNREPLIED);
    record |= unreplied;
    if (rst || fin)
        nl_fp_other_side(k, &flow, &rk);
    if (rst) {
        /* Carried or queued, natlb closes its flow on it: neither side may
         * be carried after it.  Both kept, dead from now: should this RST
         * (or an answer crossing it) reach natlb before the flow's record,
         * the backend's side says it is a placed flow's (nl_fp_placed). */
        bury(f);
        struct nl_fp_flow *other = bpf_map_lookup_elem(&flows, &rk);
        if (other)
            bury(other);
    } else if (fin) {
        cut_deadline(k);
        cut_deadline(&rk);
    }
    if (p.ttl <= 1)
        return TC_ACT_OK;      /* natlb's (the kernel's) ICMP to send */

    __u32 mtu_len = 0;
    /* A GSO packet (TSO, GRO) passes without BPF_MTU_CHK_SEGS whatever
     * its segments' size; with it, each segment must fit, as the kernel's
     * forwarding checks (ip_exceeds_mtu). */
    if (bpf_check_mtu(skb, flow.out_ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS) !=
        BPF_MTU_CHK_RET_SUCCESS)
        return TC_ACT_OK;      /* too big: natlb and the kernel do PMTU */

    struct nl_fp_event *ev = 0;
    if (record) {
        ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
        if (!ev) {
            count_stat(NL_FP_STAT_RING_FULL);
            return TC_ACT_OK;  /* no room to tell natlb: it sees the packet */
        }
        /* 64-bit all along: the verifier then knows n <= 128. */
        __u64 n = skb->len;
        n = n > ETH_HLEN ? n - ETH_HLEN : 0;
        if (n > p.tot_len)
            n = p.tot_len;     /* never the Ethernet padding */
        if (n > NL_FP_HEAD)
            n = NL_FP_HEAD;
        if (n < l3_len(v6) + sizeof(struct udphdr) ||
            bpf_skb_load_bytes(skb, ETH_HLEN, ev->head, n)) {
            bpf_ringbuf_discard(ev, 0);
            return TC_ACT_OK;
        }
        ev->ifindex = skb->ingress_ifindex;
        ev->len = n;
        ev->new_backend = NL_FP_CARRIED;
        ev->sent_csum = 0;
        ev->pad = 0;
        ev->placed_ns = 0;
        /* An IPv6 packet may be 65,575 bytes: longer than the head all the same. */
        ev->tot_len = p.tot_len > 0xffff ? 0xffff : p.tot_len;
    }

    if (rewrite(skb, v6, k, &flow, csum_off, csum_flags, p.ttl))
        goto shot;             /* a half-done sum: never send it on */

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
            c->bytes += p.tot_len;   /* IP length, as natlb counts: not a frame's padding */
        }
    }
    return bpf_redirect_neigh(flow.out_ifindex, 0, 0, 0);
shot:
    if (ev)
        bpf_ringbuf_discard(ev, 0);
    return TC_ACT_SHOT;
}

SEC("tc")
int carry(struct __sk_buff *skb)
{
    /* A tag the kernel took off on receive (hardware or veth offload) is
     * still the frame's: carried, it would leave tagged on the backend's
     * side, where the kernel drops a VLAN this interface has not, or strips
     * a VID 0 priority tag.  The kernel decides those; a VLAN device's own
     * hook sees its frames untagged and carries them. */
    if (skb->vlan_present)
        return TC_ACT_OK;
    __be16 proto = eth_proto(skb);
    if (proto == bpf_htons(ETH_P_IP))
        return carry_ip(skb, 0);
    if (proto == bpf_htons(ETH_P_IPV6))
        return carry_ip(skb, 1);
    return TC_ACT_OK;
}

struct forget_walk {
    __u64 now;
    __u32 all;                 /* every backend's flows, not the doomed ones */
    __u32 n;                   /* live entries made dead */
};

static long forget_one(void *map, struct nl_fp_key *k, struct nl_fp_flow *f,
                       struct forget_walk *w)
{
    if (!w->all) {
        __u32 word = f->backend_id / 64;
        __u64 *bits = bpf_map_lookup_elem(&doomed, &word);
        if (!bits || !(*bits & (1ull << (f->backend_id % 64))))
            return 0;
    }
    if (f->deadline_ns <= w->now)
        return 0;              /* dead already, and keeps its time of death */
    /* The client's side dead: the flow's next packet goes to natlb, which
     * keeps it where it is, not placed anew by the kernel (an rr UDP
     * session would move).  The backend's side dead from now: an answer of
     * a flow placed just before, whose record is still on its way, is held,
     * not taken for traffic straight to the backend (nl_fp_placed). */
    f->deadline_ns = f->dir == NL_FP_IN ? 0 : w->now - 1;
    /* carry writes deadlines in place too, but only over a live entry (a
     * FIN's cut, the handshake's end): one that read this entry alive in
     * the few instructions before this write can still undo it, for that
     * flow (the user-space walk, replacing entries, had the opposite race:
     * its stale copy undid the packet's write). */
    w->n++;
    return 0;
}

/* Never attached: natlb runs it once per flush (BPF_PROG_TEST_RUN, a dummy
 * frame; mark 1: every flow) to make a backend's flows dead in place, in
 * one pass of the kernel over the map.  From user space every changed
 * entry was a new LRU node written by a system call (1.5 us each).
 * Returns how many it made dead. */
SEC("tc")
int forget_flows(struct __sk_buff *skb)
{
    struct forget_walk w = {.now = bpf_ktime_get_ns(), .all = skb->mark == 1};
    bpf_for_each_map_elem(&flows, forget_one, &w, 0);
    return w.n;
}

char LICENSE[] SEC("license") = "GPL";
