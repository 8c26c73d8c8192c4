/*
 * packet.c -- parse and rewrite IPv4 and IPv6 TCP/UDP headers in a byte
 * buffer.
 *
 * Theory of operation: nl_parse validates every header it will later touch
 * against both the buffer length and the IP total (IPv6: payload) length,
 * so nl_rewrite can write without further checks.  IPv6 extension headers
 * (hop-by-hop, routing, destination options, fragment) are walked, at most
 * NL_IP6_MAX_EXT of them, never past the buffer.  Checksums:
 *  - the IPv4 header checksum is always complete: RFC 1624 incremental
 *    update (IPv6 has none);
 *  - the L4 checksum depends on what the kernel handed us (pkt_flags):
 *      complete       -> RFC 1624 incremental update over the pseudo-
 *                        header's address (IPv4 UDP 0 stays 0; IPv6 UDP
 *                        never carries 0, and never gets it: 0 -> 0xffff);
 *      partial, GSO   -> the field holds only the pseudo-header sum and the
 *                        kernel finishes it when segmenting: recompute that;
 *      partial, plain -> the kernel marks the packet CHECKSUM_NONE after we
 *                        return it, so nobody will finish the sum: compute
 *                        the full checksum over the segment.
 * Verification (nl_check_csum): a packet with a wrong checksum is dropped,
 * never forwarded.  Its receiver would drop it silently, so forwarding it
 * would let a client make natlb see a backend "not answering".  Unless the
 * kernel vouches for the packet (NL_PKT_CSUM_VERIFIED: checked by the NIC
 * or kernel, or made on this host; NL_PKT_CSUM_PARTIAL: made on this host,
 * sum not finished), the IP header checksum is checked, and the L4 one
 * when the whole packet is in the buffer.
 */
#include <string.h>
#include <arpa/inet.h>
#include "internal.h"

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* The TCP/UDP header at p->l4, of which l4cap bytes are in the buffer. */
static inline __attribute__((always_inline)) int parse_l4(struct nl_pkt *p, uint32_t l4cap)
{
    p->tcp_flags = 0;
    if (p->proto == NL_IPPROTO_TCP) {
        if (p->l4len < 20 || l4cap < 20)
            return NL_R_MALFORMED;
        uint32_t doff = (uint32_t)(p->l4[NL_OFF_TCP_DOFF] >> 4) * 4;
        if (doff < 20 || doff > p->l4len || doff > l4cap)
            return NL_R_MALFORMED;
        p->tcp_flags = p->l4[NL_OFF_TCP_FLAGS];
        p->seq = nl_be32(p->l4 + NL_OFF_TCP_SEQ);
        p->ack = nl_be32(p->l4 + NL_OFF_TCP_ACK);
        p->seq_len = p->l4len - doff + !!(p->tcp_flags & NL_TCP_SYN) +
                     !!(p->tcp_flags & NL_TCP_FIN);
    } else if (p->proto == NL_IPPROTO_UDP) {
        if (p->l4len < 8 || l4cap < 8)
            return NL_R_MALFORMED;
        uint32_t ulen = nl_be16(p->l4 + NL_OFF_UDP_LEN);
        /* GSO UDP super-packets may carry a per-segment length, and a
         * first fragment the whole datagram's; anything shorter than a
         * header is simply wrong. */
        if (ulen < 8 || (ulen > p->l4len && !p->frag))
            return NL_R_MALFORMED;
    } else {
        return NL_R_UNSUPPORTED;
    }
    p->sport = ld16(p->l4 + NL_OFF_L4_SPORT);
    p->dport = ld16(p->l4 + NL_OFF_L4_DPORT);
    return -1;
}

static int parse4(uint8_t *buf, uint32_t len, struct nl_pkt *p, int head_only)
{
    if (len < 20)
        return NL_R_MALFORMED;
    uint32_t ihl = nl_ip_hlen(buf);
    uint32_t tot = nl_be16(buf + NL_OFF_IP_TOT_LEN);
    if (ihl < 20 || tot < ihl || (tot > len && !head_only) || ihl > len)
        return NL_R_MALFORMED;
    p->family = 4;
    p->ip = buf;
    p->saddr = nl_addr_v4(ld32(buf + NL_OFF_IP_SADDR));
    p->daddr = nl_addr_v4(ld32(buf + NL_OFF_IP_DADDR));
    uint16_t frag = (uint16_t)nl_be16(buf + NL_OFF_IP_FRAG);
    p->frag = (frag & 0x2000) && !(frag & 0x1fff);   /* MF: the first of several */
    if (NL_UNLIKELY(frag & 0x3fff)) {
        p->frag_nh = buf[NL_OFF_IP_PROTO];
        p->frag_id = nl_be16(buf + NL_OFF_IP_ID);
        p->frag_off = (uint32_t)(frag & 0x1fff) * 8;
        p->frag_last = !(frag & 0x2000);
        p->frag_data = tot - ihl;
        if (frag & 0x1fff)              /* a later fragment: no L4 header; */
            return NL_R_FRAGMENT;       /* it follows its first (fragtrack.c) */
    }
    p->proto = buf[NL_OFF_IP_PROTO];
    p->l4 = buf + ihl;
    p->l4len = tot - ihl;
    p->caplen = tot < len ? tot : len;
    return parse_l4(p, p->caplen - ihl);    /* what we may read of the L4 part */
}

/* What walk6 found between the IPv6 fixed header and the upper layer. */
struct ext6 {
    uint32_t off;            /* offset of the upper-layer header          */
    uint8_t nh;              /* its protocol                              */
    uint8_t has_frag;
    uint8_t frag_nh, frag_m;
    uint32_t frag_off;       /* bytes                                     */
    uint32_t frag_id;
    uint32_t frag_end;       /* offset of the fragment data               */
};

/* Walks the extension headers of the IPv6 packet at ip, of which `avail`
 * bytes may be read: hop-by-hop (first only), routing, destination
 * options, one fragment header; at most NL_IP6_MAX_EXT of them.  Stops at
 * any other header (the upper layer, or AH/ESP/no-next-header for the
 * caller to refuse), or after a fragment header whose offset is not 0
 * (what follows is the middle of a datagram).  -1, or NL_R_MALFORMED, or
 * NL_R_UNSUPPORTED for a routing header with segments left: the packet is
 * not for its destination address yet, and its L4 checksum covers another. */
static int walk6(const uint8_t *ip, uint32_t avail, struct ext6 *w)
{
    uint32_t off = NL_IP6_HLEN;
    uint8_t nh = ip[NL_OFF_IP6_NEXT];
    w->has_frag = 0;
    for (int n = 0;; n++) {
        if (nh != NL_IPPROTO_HOPOPTS && nh != NL_IPPROTO_ROUTING &&
            nh != NL_IPPROTO_DSTOPTS && nh != NL_IPPROTO_FRAGMENT)
            break;
        if (n == NL_IP6_MAX_EXT || (nh == NL_IPPROTO_HOPOPTS && n > 0) || off + 8 > avail)
            return NL_R_MALFORMED;
        const uint8_t *h = ip + off;
        uint32_t hlen = 8;
        if (nh == NL_IPPROTO_FRAGMENT) {
            if (w->has_frag)
                return NL_R_MALFORMED;
            uint32_t fo = nl_be16(h + NL_OFF_FRAG6_OFF);
            w->has_frag = 1;
            w->frag_nh = h[0];
            w->frag_m = fo & 1;
            w->frag_off = fo & 0xfff8;
            w->frag_id = nl_be32(h + NL_OFF_FRAG6_ID);
            w->frag_end = off + 8;
            if (w->frag_off) {
                w->off = off + 8;
                w->nh = h[0];
                return -1;
            }
        } else {
            hlen = ((uint32_t)h[1] + 1) * 8;
            if (off + hlen > avail)
                return NL_R_MALFORMED;
            if (nh == NL_IPPROTO_ROUTING && h[NL_OFF_RT_SEGLEFT] != 0)
                return NL_R_UNSUPPORTED;
        }
        nh = h[0];
        off += hlen;
    }
    w->off = off;
    w->nh = nh;
    return -1;
}

static int parse6(uint8_t *buf, uint32_t len, struct nl_pkt *p, int head_only)
{
    if (len < NL_IP6_HLEN)
        return NL_R_MALFORMED;
    uint32_t tot = NL_IP6_HLEN + nl_be16(buf + NL_OFF_IP6_PLEN);
    if (tot > len && !head_only)
        return NL_R_MALFORMED;
    p->family = 6;
    p->ip = buf;
    memcpy(&p->saddr, buf + NL_OFF_IP6_SADDR, 16);
    memcpy(&p->daddr, buf + NL_OFF_IP6_DADDR, 16);
    /* Never on the wire (RFC 4291 2.5.5.2); natlb's IPv4 addresses. */
    if (nl_addr_is_v4(&p->saddr) || nl_addr_is_v4(&p->daddr))
        return NL_R_MALFORMED;
    p->caplen = tot < len ? tot : len;
    struct ext6 w;
    int r = walk6(buf, p->caplen, &w);
    if (r >= 0)
        return r;
    p->frag = 0;
    if (NL_UNLIKELY(w.has_frag)) {
        p->frag_nh = w.frag_nh;
        p->frag_id = w.frag_id;
        p->frag_off = w.frag_off;
        p->frag_last = !w.frag_m;
        p->frag_data = tot - w.frag_end;
        if (w.frag_off)
            return NL_R_FRAGMENT;
        p->frag = w.frag_m;     /* offset 0 and no M: an atomic fragment, whole */
    }
    p->proto = w.nh;
    p->l4 = buf + w.off;
    p->l4len = tot - w.off;
    return parse_l4(p, p->caplen - w.off);
}

int nl_parse(uint8_t *buf, uint32_t len, struct nl_pkt *p, int head_only)
{
    p->family = 0;
    p->proto = 0;
    if (len >= 1 && nl_ip_version(buf) == 4)
        return parse4(buf, len, p, head_only);
    if (len >= 1 && nl_ip_version(buf) == 6)
        return parse6(buf, len, p, head_only);
    return NL_R_MALFORMED;
}

/* Ones' complement helpers over 32-bit accumulators. */
static inline uint32_t csum_add(uint32_t sum, uint32_t v)
{
    sum += v;
    return sum + (sum < v);
}

static inline uint16_t csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* RFC 1624 eqn. 3 for a complemented checksum, HC' = ~(~HC + ~m + m'), with m a
 * 16-bit field in network order. */
static inline uint16_t csum_replace2(uint16_t check, uint16_t from, uint16_t to)
{
    uint32_t sum = (uint16_t)~check;
    sum = csum_add(sum, (uint16_t)~from);
    sum = csum_add(sum, to);
    return (uint16_t)~csum_fold(sum);
}

/* Sum of a buffer as 16-bit network-order words, as stored (no swapping:
 * the ones' complement sum is byte-order independent). */
static uint32_t csum_partial(const uint8_t *data, uint32_t len, uint32_t sum)
{
    uint64_t acc = sum;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, data, 8);
        acc += (v & 0xffffffffu) + (v >> 32);
        data += 8;
        len -= 8;
    }
    while (len >= 2) {
        acc += ld16(data);
        data += 2;
        len -= 2;
    }
    if (len) {
        uint16_t last = 0;
        memcpy(&last, data, 1);
        acc += last;
    }
    while (acc >> 32)
        acc = (acc & 0xffffffffu) + (acc >> 32);
    return (uint32_t)acc;
}

/* RFC 1624 for an address of `words` 32-bit words (1: IPv4, 4: IPv6). */
static inline uint16_t csum_replace_addr(uint16_t check, const uint32_t *from,
                                         const uint32_t *to, int words)
{
    uint32_t sum = (uint16_t)~check;
    for (int i = 0; i < words; i++) {
        sum = csum_add(sum, ~from[i]);
        sum = csum_add(sum, to[i]);
    }
    return (uint16_t)~csum_fold(sum);
}

/* Sum of the pseudo-header of an IPv4 or IPv6 packet at ip, for an upper
 * layer of `proto` and `len` bytes (RFC 768/793, RFC 8200 8.1).  The
 * 16-bit words of the IPv6 form sum alike: length, then zero and proto. */
static uint32_t pseudo_sum_of(const uint8_t *ip, uint8_t proto, uint32_t len)
{
    uint8_t tail[4] = { 0, proto, (uint8_t)(len >> 8), (uint8_t)len };
    if (nl_ip_version(ip) == 6)
        return csum_partial(ip + NL_OFF_IP6_SADDR, 32, ld32(tail));
    uint32_t sum = csum_add(ld32(ip + NL_OFF_IP_SADDR), ld32(ip + NL_OFF_IP_DADDR));
    return csum_add(sum, ld32(tail));
}

static uint32_t pseudo_sum(const struct nl_pkt *p)
{
    return pseudo_sum_of(p->ip, p->proto, p->l4len);
}

/* Ones' complement sum of (pseudo-header, L4 segment of `len` bytes). */
static uint32_t l4_sum(const struct nl_pkt *p, uint32_t len)
{
    return csum_partial(p->l4, len, pseudo_sum_of(p->ip, p->proto, len));
}

static int ip_header_ok(const uint8_t *ip)
{
    return csum_fold(csum_partial(ip, nl_ip_hlen(ip), 0)) == 0xffff;
}

/* RFC 8200 8.1: over IPv6 a UDP checksum of zero is no checksum, and its
 * receiver discards the datagram; natlb does so first. */
static inline int udp6_without_sum(const struct nl_pkt *p, uint32_t pkt_flags)
{
    return p->family == 6 && p->proto == NL_IPPROTO_UDP && !(pkt_flags & NL_PKT_CSUM_PARTIAL) &&
           ld16(p->l4 + NL_OFF_UDP_CSUM) == 0;
}

int nl_check_csum_bytes(const struct nl_pkt *p, uint32_t pkt_flags)
{
    /* The kernel vouches for the L4 sum, and its ip_rcv has verified every
     * IP header before prerouting: nothing left to check. */
    if (pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL))
        return udp6_without_sum(p, pkt_flags) ? NL_CSUM_BAD : NL_CSUM_OK;
    if (udp6_without_sum(p, pkt_flags))
        return NL_CSUM_BAD;
    if (p->family == 4 && !ip_header_ok(p->ip))
        return NL_CSUM_BAD;
    /* A fragment's L4 checksum covers the whole datagram. */
    if (nl_pkt_len(p) > p->caplen || p->frag ||
        (p->family == 4 && (ld16(p->ip + NL_OFF_IP_FRAG) & htons(0x3fff))))
        return NL_CSUM_UNKNOWN;
    uint32_t len = p->l4len;
    if (p->proto == NL_IPPROTO_UDP) {
        if (ld16(p->l4 + NL_OFF_UDP_CSUM) == 0)
            return NL_CSUM_OK;          /* IPv4 UDP may carry no checksum */
        len = nl_be16(p->l4 + NL_OFF_UDP_LEN);
    }
    return csum_fold(l4_sum(p, len)) == 0xffff ? NL_CSUM_OK : NL_CSUM_BAD;
}

int nl_csum_partial_form(const struct nl_pkt *p)
{
    uint32_t off = p->proto == NL_IPPROTO_TCP ? NL_OFF_TCP_CSUM : NL_OFF_UDP_CSUM;
    return (p->family != 4 || ip_header_ok(p->ip)) &&
           ld16(p->l4 + off) == csum_fold(pseudo_sum(p));
}

int nl_csum_partial_form_to(const struct nl_pkt *p, const struct nl_addr *daddr,
                            uint16_t field)
{
    uint8_t ip[40];
    uint32_t hlen = p->family == 6 ? 40 : 20;
    memcpy(ip, p->ip, hlen);
    if (p->family == 6)
        memcpy(ip + NL_OFF_IP6_DADDR, daddr->w, 16);
    else
        memcpy(ip + NL_OFF_IP_DADDR, &daddr->w[3], 4);
    uint16_t want = csum_fold(pseudo_sum_of(ip, p->proto, p->l4len));
    /* 0 and 0xffff are the same ones' complement number. */
    return field == want || ((field == 0 || field == 0xffff) && (want == 0 || want == 0xffff));
}

int nl_check_icmp_csum(const struct nl_pkt *outer, uint32_t pkt_flags)
{
    if (pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL))
        return NL_CSUM_OK;
    if (outer->family == 4 && !ip_header_ok(outer->ip))
        return NL_CSUM_BAD;
    if (nl_pkt_len(outer) > outer->caplen || outer->frag)
        return NL_CSUM_UNKNOWN;
    /* ICMPv6 sums a pseudo-header too (RFC 4443 2.3); ICMP does not. */
    uint32_t sum = outer->family == 6
                 ? pseudo_sum_of(outer->ip, NL_IPPROTO_ICMPV6, outer->l4len) : 0;
    return csum_fold(csum_partial(outer->l4, outer->l4len, sum)) == 0xffff ? NL_CSUM_OK
                                                                           : NL_CSUM_BAD;
}

/* Writes `addr` into the source or destination field of the IPv4 or IPv6
 * header at ip (the IPv4 header checksum follows; IPv6 has none), and puts
 * the old address in old[] (1 word for IPv4, 4 for IPv6).  Returns the
 * number of words. */
/* ~fold of a 64-bit ones' complement sum (at most 2^48: a few 32-bit terms). */
static inline uint16_t csum_fold64_not(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    return (uint16_t)~csum_fold((uint32_t)sum);
}

/* Writes the source (or destination) address, and the IPv4 header checksum;
 * returns the change as a ones' complement sum of ~old + new over the
 * address's words (RFC 1624 eqn. 3), for the L4 checksum to reuse. */
static inline uint64_t write_addr(uint8_t *ip, int dst, const struct nl_addr *addr)
{
    if (nl_ip_version(ip) == 6) {
        uint8_t *field = ip + (dst ? NL_OFF_IP6_DADDR : NL_OFF_IP6_SADDR);
        uint64_t delta = 0;
        for (int i = 0; i < 4; i++)
            delta += (uint64_t)(uint32_t)~ld32(field + 4 * i) + addr->w[i];
        memcpy(field, addr->w, 16);
        return delta;
    }
    uint8_t *field = ip + (dst ? NL_OFF_IP_DADDR : NL_OFF_IP_SADDR);
    uint64_t delta = (uint64_t)(uint32_t)~ld32(field) + addr->w[3];
    st32(field, addr->w[3]);
    st16(ip + NL_OFF_IP_CSUM, csum_fold64_not(delta + (uint16_t)~ld16(ip + NL_OFF_IP_CSUM)));
    return delta;
}

void nl_rewrite_addr(uint8_t *ip, int dst, const struct nl_addr *addr)
{
    write_addr(ip, dst, addr);
}

void nl_rewrite(struct nl_pkt *p, int dst, const struct nl_addr *addr, uint16_t port,
                uint32_t pkt_flags)
{
    uint8_t *port_field = p->l4 + (dst ? NL_OFF_L4_DPORT : NL_OFF_L4_SPORT);
    uint16_t old_port = ld16(port_field);
    uint8_t *csum_field = p->l4 + (p->proto == NL_IPPROTO_TCP ? NL_OFF_TCP_CSUM : NL_OFF_UDP_CSUM);
    uint16_t check = ld16(csum_field);
    int udp = p->proto == NL_IPPROTO_UDP;
    uint64_t delta = write_addr(p->ip, dst, addr);
    st16(port_field, port);

    if (NL_LIKELY(!(pkt_flags & NL_PKT_CSUM_PARTIAL) && !(udp && check == 0))) {
        /* The usual case: the address's change, summed once, serves the IP
         * and the L4 checksum, each folded once. */
        check = csum_fold64_not(delta + (uint16_t)~check + (uint16_t)~old_port + port);
        if (udp && check == 0)
            check = 0xffff;
    } else if (!(pkt_flags & NL_PKT_CSUM_PARTIAL)) {
        if (p->family == 4)
            return;                     /* IPv4 UDP without checksum stays so */
        /* IPv6 never carries one (such datagrams are dropped before): give
         * it a whole one if it is all here. */
        if (nl_pkt_len(p) > p->caplen || p->frag)
            return;
        st16(csum_field, 0);
        check = (uint16_t)~csum_fold(csum_partial(p->l4, p->l4len, pseudo_sum(p)));
        if (check == 0)
            check = 0xffff;
    } else if (pkt_flags & NL_PKT_GSO) {
        check = csum_fold(pseudo_sum(p));
    } else {
        st16(csum_field, 0);
        check = (uint16_t)~csum_fold(csum_partial(p->l4, p->l4len, pseudo_sum(p)));
        if (udp && check == 0)
            check = 0xffff;
    }
    st16(csum_field, check);
}

int nl_forward_hop(uint8_t *ip, uint32_t len)
{
    int v6 = len >= 1 && nl_ip_version(ip) == 6;
    if (len < (v6 ? 40u : 20u))
        return 0;
    uint8_t *hops = ip + (v6 ? NL_OFF_IP6_HOPS : NL_OFF_IP_TTL);
    if (*hops <= 1)
        return 0;               /* the kernel would have answered it, not sent it */
    /* The TTL is the high byte of its 16-bit word (IPv6 has no header sum). */
    uint16_t word = ld16(ip + NL_OFF_IP_TTL);
    (*hops)--;
    if (!v6)
        st16(ip + NL_OFF_IP_CSUM,
             csum_replace2(ld16(ip + NL_OFF_IP_CSUM), word, ld16(ip + NL_OFF_IP_TTL)));
    return 1;
}

uint32_t nl_build_tcp(uint8_t *buf, const struct nl_addr *saddr, const struct nl_addr *daddr,
                      uint16_t sport, uint16_t dport, uint32_t seq, uint32_t ack, uint8_t flags)
{
    uint32_t hlen = nl_addr_is_v4(saddr) ? 20 : NL_IP6_HLEN;
    memset(buf, 0, hlen + 20);
    if (hlen == 20) {
        buf[0] = 0x45;
        st16(buf + NL_OFF_IP_TOT_LEN, htons(40));
        buf[NL_OFF_IP_FRAG] = NL_IP_DF;
        buf[NL_OFF_IP_TTL] = 64;
        buf[NL_OFF_IP_PROTO] = NL_IPPROTO_TCP;
        st32(buf + NL_OFF_IP_SADDR, saddr->w[3]);
        st32(buf + NL_OFF_IP_DADDR, daddr->w[3]);
        st16(buf + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    } else {
        buf[0] = 0x60;
        st16(buf + NL_OFF_IP6_PLEN, htons(20));
        buf[NL_OFF_IP6_NEXT] = NL_IPPROTO_TCP;
        buf[NL_OFF_IP6_HOPS] = 64;
        memcpy(buf + NL_OFF_IP6_SADDR, saddr, 16);
        memcpy(buf + NL_OFF_IP6_DADDR, daddr, 16);
    }
    uint8_t *tcp = buf + hlen;
    st16(tcp + NL_OFF_L4_SPORT, sport);
    st16(tcp + NL_OFF_L4_DPORT, dport);
    st32(tcp + NL_OFF_TCP_SEQ, htonl(seq));
    st32(tcp + NL_OFF_TCP_ACK, htonl(ack));
    tcp[NL_OFF_TCP_DOFF] = 5 << 4;
    tcp[NL_OFF_TCP_FLAGS] = flags;
    if (flags & NL_TCP_ACK)
        tcp[NL_OFF_TCP_WIN] = 0x10;     /* a small window: this segment is a probe */
    st16(tcp + NL_OFF_TCP_CSUM, (uint16_t)~csum_fold(csum_partial(
                                    tcp, 20, pseudo_sum_of(buf, NL_IPPROTO_TCP, 20))));
    return hlen + 20;
}

uint32_t nl_build_rst(uint8_t *buf, const struct nl_addr *saddr, const struct nl_addr *daddr,
                      uint16_t sport, uint16_t dport, uint32_t seq)
{
    return nl_build_tcp(buf, saddr, daddr, sport, dport, seq, 0, NL_TCP_RST);
}

/* The ICMPv4 part of nl_parse_icmp: a destination unreachable quoting an
 * IPv4 header and the first 8 bytes of TCP/UDP (RFC 792). */
static int parse_icmp4(const uint8_t *icmp, uint32_t left, struct nl_icmp *out)
{
    if (icmp[NL_OFF_ICMP_TYPE] != NL_ICMP_DEST_UNREACH)
        return NL_R_UNSUPPORTED;
    const uint8_t *in = icmp + NL_OFF_ICMP_QUOTE;
    left -= NL_OFF_ICMP_QUOTE;
    if (left < 20 || nl_ip_version(in) != 4)
        return NL_R_MALFORMED;
    uint32_t in_ihl = nl_ip_hlen(in);
    if (in_ihl < 20 || left < in_ihl + 8)
        return NL_R_MALFORMED;
    if (in[NL_OFF_IP_PROTO] != NL_IPPROTO_TCP && in[NL_OFF_IP_PROTO] != NL_IPPROTO_UDP)
        return NL_R_UNSUPPORTED;
    out->frag_needed = icmp[NL_OFF_ICMP_CODE] == NL_ICMP_FRAG_NEEDED;
    out->mtu = nl_be16(icmp + NL_OFF_ICMP_MTU);
    out->quoted_len = in_ihl + 8;
    out->quoted_l4off = in_ihl;
    out->inner.family = 4;
    out->inner.proto = in[NL_OFF_IP_PROTO];
    out->inner.saddr = nl_addr_v4(ld32(in + NL_OFF_IP_SADDR));
    out->inner.daddr = nl_addr_v4(ld32(in + NL_OFF_IP_DADDR));
    return -1;
}

/* The ICMPv6 part: destination unreachable or packet too big, quoting as
 * much of an IPv6 packet as fits (RFC 4443), at least its headers and the
 * first 8 bytes of TCP/UDP. */
static int parse_icmp6(const uint8_t *icmp, uint32_t left, struct nl_icmp *out)
{
    uint8_t type = icmp[NL_OFF_ICMP_TYPE];
    if (type != NL_ICMP6_DEST_UNREACH && type != NL_ICMP6_PKT_TOO_BIG)
        return NL_R_UNSUPPORTED;
    const uint8_t *in = icmp + NL_OFF_ICMP_QUOTE;
    left -= NL_OFF_ICMP_QUOTE;
    if (left < NL_IP6_HLEN || nl_ip_version(in) != 6)
        return NL_R_MALFORMED;
    struct ext6 w;
    int r = walk6(in, left, &w);
    if (r >= 0)
        return r;
    if ((w.has_frag && w.frag_off) ||
        (w.nh != NL_IPPROTO_TCP && w.nh != NL_IPPROTO_UDP))
        return NL_R_UNSUPPORTED;        /* no ports to find a flow by */
    if (left < w.off + 8)
        return NL_R_MALFORMED;
    out->frag_needed = type == NL_ICMP6_PKT_TOO_BIG;
    out->mtu = nl_be32(icmp + NL_OFF_ICMP6_MTU);
    out->quoted_len = left;
    out->quoted_l4off = w.off;
    out->inner.family = 6;
    out->inner.proto = w.nh;
    memcpy(&out->inner.saddr, in + NL_OFF_IP6_SADDR, 16);
    memcpy(&out->inner.daddr, in + NL_OFF_IP6_DADDR, 16);
    if (nl_addr_is_v4(&out->inner.saddr) || nl_addr_is_v4(&out->inner.daddr))
        return NL_R_MALFORMED;
    return -1;
}

int nl_parse_icmp(const struct nl_pkt *outer, struct nl_icmp *out)
{
    const uint8_t *icmp = outer->l4;
    uint32_t l4off = (uint32_t)(outer->l4 - outer->ip);
    uint32_t left = outer->caplen - l4off;      /* what we have of it */
    memset(out, 0, sizeof(*out));
    if (left < 8)
        return NL_R_MALFORMED;
    int r = outer->family == 6 ? parse_icmp6(icmp, left, out) : parse_icmp4(icmp, left, out);
    if (r >= 0)
        return r;
    const uint8_t *in = icmp + NL_OFF_ICMP_QUOTE;
    out->outer_saddr = outer->saddr;
    out->quoted = in;
    out->inner.sport = ld16(in + out->quoted_l4off + NL_OFF_L4_SPORT);
    out->inner.dport = ld16(in + out->quoted_l4off + NL_OFF_L4_DPORT);
    out->quoted_seq = nl_be32(in + out->quoted_l4off + NL_OFF_TCP_SEQ);
    return -1;
}

/* ICMPv4 "fragmentation needed" quoting the IPv4 header + 8 bytes. */
static uint32_t build_frag_needed(uint8_t *buf, const struct nl_icmp *icmp,
                                  const struct nl_addr *dst, uint16_t sport)
{
    uint32_t quoted_len = icmp->quoted_len;
    uint32_t len = 20 + 8 + quoted_len;
    memset(buf, 0, 28);
    buf[0] = 0x45;
    st16(buf + NL_OFF_IP_TOT_LEN, htons((uint16_t)len));
    buf[NL_OFF_IP_TTL] = 64;
    buf[NL_OFF_IP_PROTO] = NL_IPPROTO_ICMP;
    st32(buf + NL_OFF_IP_SADDR, icmp->outer_saddr.w[3]);
    st32(buf + NL_OFF_IP_DADDR, dst->w[3]);
    st16(buf + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    uint8_t *msg = buf + 20;
    msg[NL_OFF_ICMP_TYPE] = NL_ICMP_DEST_UNREACH;
    msg[NL_OFF_ICMP_CODE] = NL_ICMP_FRAG_NEEDED;
    st16(msg + NL_OFF_ICMP_MTU, htons((uint16_t)icmp->mtu));
    uint8_t *in = msg + NL_OFF_ICMP_QUOTE;
    memcpy(in, icmp->quoted, quoted_len);
    uint32_t in_ihl = nl_ip_hlen(in);
    st32(in + NL_OFF_IP_SADDR, dst->w[3]);
    st16(in + in_ihl + NL_OFF_L4_SPORT, sport);
    st16(in + NL_OFF_IP_CSUM, 0);
    st16(in + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(in, in_ihl, 0)));
    /* Only 8 bytes of the quoted L4 header: its checksum is not among them. */
    st16(msg + NL_OFF_ICMP_CSUM,
         (uint16_t)~csum_fold(csum_partial(msg, NL_OFF_ICMP_QUOTE + quoted_len, 0)));
    return len;
}

/* ICMPv6 "packet too big" quoting as much of the packet as fits in cap:
 * the quote's source becomes (dst, sport), and its L4 checksum, if quoted,
 * follows, so the backend reads its own packet exactly as it sent it. */
static uint32_t build_too_big(uint8_t *buf, uint32_t cap, const struct nl_icmp *icmp,
                              const struct nl_addr *dst, uint16_t sport)
{
    uint32_t quoted_len = icmp->quoted_len;
    if (NL_IP6_HLEN + 8 + quoted_len > cap)
        quoted_len = cap - NL_IP6_HLEN - 8;
    uint32_t l4off = icmp->quoted_l4off;
    if (cap < NL_IP6_HLEN + 8 || quoted_len < l4off + 8)
        return 0;                       /* its headers do not fit */
    uint32_t plen = 8 + quoted_len;
    memset(buf, 0, NL_IP6_HLEN + 8);
    buf[0] = 0x60;
    st16(buf + NL_OFF_IP6_PLEN, htons((uint16_t)plen));
    buf[NL_OFF_IP6_NEXT] = NL_IPPROTO_ICMPV6;
    buf[NL_OFF_IP6_HOPS] = 64;
    memcpy(buf + NL_OFF_IP6_SADDR, &icmp->outer_saddr, 16);
    memcpy(buf + NL_OFF_IP6_DADDR, dst, 16);
    uint8_t *msg = buf + NL_IP6_HLEN;
    msg[NL_OFF_ICMP_TYPE] = NL_ICMP6_PKT_TOO_BIG;
    st32(msg + NL_OFF_ICMP6_MTU, htonl(icmp->mtu));
    uint8_t *in = msg + NL_OFF_ICMP_QUOTE;
    memcpy(in, icmp->quoted, quoted_len);
    uint32_t old[4];
    memcpy(old, in + NL_OFF_IP6_SADDR, 16);
    memcpy(in + NL_OFF_IP6_SADDR, dst, 16);
    uint8_t *l4 = in + l4off;
    uint16_t old_port = ld16(l4 + NL_OFF_L4_SPORT);
    st16(l4 + NL_OFF_L4_SPORT, sport);
    uint32_t csum_off = icmp->inner.proto == NL_IPPROTO_TCP ? NL_OFF_TCP_CSUM : NL_OFF_UDP_CSUM;
    if (quoted_len >= l4off + csum_off + 2) {
        uint16_t check = ld16(l4 + csum_off);
        check = csum_replace_addr(check, old, dst->w, 4);
        check = csum_replace2(check, old_port, sport);
        if (icmp->inner.proto == NL_IPPROTO_UDP && check == 0)
            check = 0xffff;
        st16(l4 + csum_off, check);
    }
    st16(msg + NL_OFF_ICMP_CSUM, (uint16_t)~csum_fold(csum_partial(
                                     msg, plen, pseudo_sum_of(buf, NL_IPPROTO_ICMPV6, plen))));
    return NL_IP6_HLEN + plen;
}

uint32_t nl_build_pmtu(uint8_t *buf, uint32_t cap, const struct nl_icmp *icmp,
                       const struct nl_addr *dst, uint16_t sport)
{
    if (icmp->inner.family == 6)
        return build_too_big(buf, cap, icmp, dst, sport);
    if (20 + 8 + icmp->quoted_len > cap)
        return 0;
    return build_frag_needed(buf, icmp, dst, sport);
}
