/*
 * packet.c -- parse and rewrite IPv4 TCP/UDP headers in a byte buffer.
 *
 * Theory of operation: nl_parse validates every header it will later touch
 * against both the buffer length and the IP total length, so nl_rewrite can
 * write without further checks.  Checksums:
 *  - the IP header checksum is always complete: RFC 1624 incremental update;
 *  - the L4 checksum depends on what the kernel handed us (pkt_flags):
 *      complete       -> RFC 1624 incremental update (UDP 0 stays 0);
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

int nl_parse(uint8_t *buf, uint32_t len, struct nl_pkt *p, int head_only)
{
    if (len < 20 || nl_ip_version(buf) != 4)
        return (len >= 1 && nl_ip_version(buf) == 6) ? NL_R_UNSUPPORTED : NL_R_MALFORMED;
    uint32_t ihl = nl_ip_hlen(buf);
    uint32_t tot = nl_be16(buf + NL_OFF_IP_TOT_LEN);
    if (ihl < 20 || tot < ihl || (tot > len && !head_only) || ihl > len)
        return NL_R_MALFORMED;
    uint16_t frag = (uint16_t)nl_be16(buf + NL_OFF_IP_FRAG);
    if (frag & 0x1fff)                  /* a later fragment: no L4 header; */
        return NL_R_FRAGMENT;           /* it follows its first (fragtrack.c) */
    p->frag = (frag & 0x2000) != 0;     /* MF: the first of several */
    p->ip = buf;
    p->proto = buf[NL_OFF_IP_PROTO];
    p->saddr = ld32(buf + NL_OFF_IP_SADDR);
    p->daddr = ld32(buf + NL_OFF_IP_DADDR);
    p->l4 = buf + ihl;
    p->l4len = tot - ihl;
    p->caplen = tot < len ? tot : len;
    uint32_t l4cap = p->caplen - ihl;    /* what we may read of the L4 part */
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

/* RFC 1624 eqn. 3 for a complemented checksum: HC' = ~(~HC + ~m + m'),
 * with m a 32-bit quantity (two 16-bit words) in network order. */
static inline uint16_t csum_replace4(uint16_t check, uint32_t from, uint32_t to)
{
    uint32_t sum = (uint16_t)~check;
    sum = csum_add(sum, ~from);
    sum = csum_add(sum, to);
    return (uint16_t)~csum_fold(sum);
}

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

static uint32_t pseudo_sum(const struct nl_pkt *p)
{
    uint32_t sum = 0;
    sum = csum_add(sum, ld32(p->ip + NL_OFF_IP_SADDR));
    sum = csum_add(sum, ld32(p->ip + NL_OFF_IP_DADDR));
    uint8_t tail[4] = { 0, p->proto, (uint8_t)(p->l4len >> 8), (uint8_t)p->l4len };
    return csum_add(sum, ld32(tail));
}

/* Ones' complement sum of (pseudo-header, L4 segment of `len` bytes). */
static uint32_t l4_sum(const struct nl_pkt *p, uint32_t len)
{
    uint32_t sum = csum_add(ld32(p->ip + NL_OFF_IP_SADDR), ld32(p->ip + NL_OFF_IP_DADDR));
    uint8_t tail[4] = { 0, p->proto, (uint8_t)(len >> 8), (uint8_t)len };
    return csum_partial(p->l4, len, csum_add(sum, ld32(tail)));
}

static int ip_header_ok(const uint8_t *ip)
{
    return csum_fold(csum_partial(ip, nl_ip_hlen(ip), 0)) == 0xffff;
}

int nl_check_csum(const struct nl_pkt *p, uint32_t pkt_flags)
{
    /* The kernel vouches for the L4 sum, and its ip_rcv has verified every
     * IP header before prerouting: nothing left to check. */
    if (pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL))
        return NL_CSUM_OK;
    if (!ip_header_ok(p->ip))
        return NL_CSUM_BAD;
    /* A fragment's L4 checksum covers the whole datagram. */
    if (nl_pkt_len(p) > p->caplen || (ld16(p->ip + NL_OFF_IP_FRAG) & htons(0x3fff)))
        return NL_CSUM_UNKNOWN;
    uint32_t len = p->l4len;
    if (p->proto == NL_IPPROTO_UDP) {
        if (ld16(p->l4 + NL_OFF_UDP_CSUM) == 0)
            return NL_CSUM_OK;          /* IPv4 UDP may carry no checksum */
        len = nl_be16(p->l4 + NL_OFF_UDP_LEN);
    }
    return csum_fold(l4_sum(p, len)) == 0xffff ? NL_CSUM_OK : NL_CSUM_BAD;
}

int nl_check_icmp_csum(const uint8_t *buf, uint32_t len, uint32_t pkt_flags)
{
    if (pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL))
        return NL_CSUM_OK;
    if (len < 20 || nl_ip_hlen(buf) > len || !ip_header_ok(buf))
        return NL_CSUM_BAD;
    uint32_t ihl = nl_ip_hlen(buf);
    uint32_t tot = nl_be16(buf + NL_OFF_IP_TOT_LEN);
    if (tot < ihl)
        return NL_CSUM_BAD;
    if (tot > len)
        return NL_CSUM_UNKNOWN;
    return csum_fold(csum_partial(buf + ihl, tot - ihl, 0)) == 0xffff ? NL_CSUM_OK
                                                                         : NL_CSUM_BAD;
}

void nl_rewrite_addr(uint8_t *ip, int dst, uint32_t addr)
{
    uint8_t *field = ip + (dst ? NL_OFF_IP_DADDR : NL_OFF_IP_SADDR);
    uint32_t old = ld32(field);
    st32(field, addr);
    st16(ip + NL_OFF_IP_CSUM, csum_replace4(ld16(ip + NL_OFF_IP_CSUM), old, addr));
}

void nl_rewrite(struct nl_pkt *p, int dst, uint32_t addr, uint16_t port,
                uint32_t pkt_flags)
{
    uint8_t *ip_field = p->ip + (dst ? NL_OFF_IP_DADDR : NL_OFF_IP_SADDR);
    uint8_t *port_field = p->l4 + (dst ? NL_OFF_L4_DPORT : NL_OFF_L4_SPORT);
    uint32_t old_addr = ld32(ip_field);
    uint16_t old_port = ld16(port_field);
    uint8_t *csum_field = p->l4 + (p->proto == NL_IPPROTO_TCP ? NL_OFF_TCP_CSUM : NL_OFF_UDP_CSUM);
    uint16_t check = ld16(csum_field);

    st32(ip_field, addr);
    st16(port_field, port);
    st16(p->ip + NL_OFF_IP_CSUM, csum_replace4(ld16(p->ip + NL_OFF_IP_CSUM), old_addr, addr));
    if (dst) { p->daddr = addr; p->dport = port; }
    else { p->saddr = addr; p->sport = port; }

    if (!(pkt_flags & NL_PKT_CSUM_PARTIAL)) {
        if (p->proto == NL_IPPROTO_UDP && check == 0)
            return;                     /* UDP without checksum stays so */
        check = csum_replace4(check, old_addr, addr);
        check = csum_replace2(check, old_port, port);
        if (p->proto == NL_IPPROTO_UDP && check == 0)
            check = 0xffff;
    } else if (pkt_flags & NL_PKT_GSO) {
        check = csum_fold(pseudo_sum(p));
    } else {
        st16(csum_field, 0);
        check = (uint16_t)~csum_fold(csum_partial(p->l4, p->l4len, pseudo_sum(p)));
        if (p->proto == NL_IPPROTO_UDP && check == 0)
            check = 0xffff;
    }
    st16(csum_field, check);
}

void nl_build_tcp(uint8_t *buf, uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport,
                  uint32_t seq, uint32_t ack, uint8_t flags)
{
    memset(buf, 0, 40);
    buf[0] = 0x45;
    st16(buf + NL_OFF_IP_TOT_LEN, htons(40));
    buf[NL_OFF_IP_FRAG] = NL_IP_DF;
    buf[NL_OFF_IP_TTL] = 64;
    buf[NL_OFF_IP_PROTO] = NL_IPPROTO_TCP;
    st32(buf + NL_OFF_IP_SADDR, saddr);
    st32(buf + NL_OFF_IP_DADDR, daddr);
    st16(buf + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    uint8_t *tcp = buf + 20;
    st16(tcp + NL_OFF_L4_SPORT, sport);
    st16(tcp + NL_OFF_L4_DPORT, dport);
    st32(tcp + NL_OFF_TCP_SEQ, htonl(seq));
    st32(tcp + NL_OFF_TCP_ACK, htonl(ack));
    tcp[NL_OFF_TCP_DOFF] = 5 << 4;
    tcp[NL_OFF_TCP_FLAGS] = flags;
    if (flags & NL_TCP_ACK)
        tcp[NL_OFF_TCP_WIN] = 0x10;     /* a small window: this segment is a probe */
    struct nl_pkt p = { .ip = buf, .l4 = tcp, .l4len = 20, .proto = NL_IPPROTO_TCP };
    st16(tcp + NL_OFF_TCP_CSUM, (uint16_t)~csum_fold(csum_partial(tcp, 20, pseudo_sum(&p))));
}

void nl_build_rst(uint8_t *buf, uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport,
                  uint32_t seq)
{
    nl_build_tcp(buf, saddr, daddr, sport, dport, seq, 0, NL_TCP_RST);
}

int nl_parse_icmp_unreach(const uint8_t *buf, uint32_t len, struct nl_icmp *out,
                          int head_only)
{
    struct nl_pkt *inner = &out->inner;
    if (len < 20 || nl_ip_version(buf) != 4 || buf[NL_OFF_IP_PROTO] != NL_IPPROTO_ICMP)
        return NL_R_UNSUPPORTED;
    uint32_t ihl = nl_ip_hlen(buf);
    uint32_t tot = nl_be16(buf + NL_OFF_IP_TOT_LEN);
    if (ihl < 20 || tot < ihl || (tot > len && !head_only) || ihl > len)
        return NL_R_MALFORMED;
    const uint8_t *icmp = buf + ihl;
    uint32_t left = (tot < len ? tot : len) - ihl;   /* what we have of it */
    if (left < 8)
        return NL_R_MALFORMED;
    if (icmp[NL_OFF_ICMP_TYPE] != NL_ICMP_DEST_UNREACH)
        return NL_R_UNSUPPORTED;
    const uint8_t *in = icmp + NL_OFF_ICMP_QUOTE;
    left -= NL_OFF_ICMP_QUOTE;
    if (left < 20 || nl_ip_version(in) != 4)
        return NL_R_MALFORMED;
    uint32_t in_ihl = nl_ip_hlen(in);
    if (in_ihl < 20 || left < in_ihl + 8)    /* RFC 792: header + 8 bytes */
        return NL_R_MALFORMED;
    if (in[NL_OFF_IP_PROTO] != NL_IPPROTO_TCP && in[NL_OFF_IP_PROTO] != NL_IPPROTO_UDP)
        return NL_R_UNSUPPORTED;
    memset(out, 0, sizeof(*out));
    out->frag_needed = icmp[NL_OFF_ICMP_CODE] == NL_ICMP_FRAG_NEEDED;
    out->mtu = ld16(icmp + NL_OFF_ICMP_MTU);
    out->outer_saddr = ld32(buf + NL_OFF_IP_SADDR);
    out->quoted = in;
    out->quoted_len = in_ihl + 8;
    inner->proto = in[NL_OFF_IP_PROTO];
    inner->saddr = ld32(in + NL_OFF_IP_SADDR);
    inner->daddr = ld32(in + NL_OFF_IP_DADDR);
    inner->sport = ld16(in + in_ihl + NL_OFF_L4_SPORT);
    inner->dport = ld16(in + in_ihl + NL_OFF_L4_DPORT);
    out->quoted_seq = nl_be32(in + in_ihl + NL_OFF_TCP_SEQ);
    return -1;
}

uint32_t nl_build_frag_needed(uint8_t *buf, uint32_t src, uint32_t dst, uint16_t mtu,
                              const uint8_t *quoted, uint32_t quoted_len, uint32_t saddr,
                              uint16_t sport)
{
    uint32_t len = 20 + 8 + quoted_len;
    memset(buf, 0, 28);
    buf[0] = 0x45;
    st16(buf + NL_OFF_IP_TOT_LEN, htons((uint16_t)len));
    buf[NL_OFF_IP_TTL] = 64;
    buf[NL_OFF_IP_PROTO] = NL_IPPROTO_ICMP;
    st32(buf + NL_OFF_IP_SADDR, src);
    st32(buf + NL_OFF_IP_DADDR, dst);
    st16(buf + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    uint8_t *icmp = buf + 20;
    icmp[NL_OFF_ICMP_TYPE] = NL_ICMP_DEST_UNREACH;
    icmp[NL_OFF_ICMP_CODE] = NL_ICMP_FRAG_NEEDED;
    st16(icmp + NL_OFF_ICMP_MTU, mtu);
    uint8_t *in = icmp + NL_OFF_ICMP_QUOTE;
    memcpy(in, quoted, quoted_len);
    uint32_t in_ihl = nl_ip_hlen(in);
    st32(in + NL_OFF_IP_SADDR, saddr);
    st16(in + in_ihl + NL_OFF_L4_SPORT, sport);
    st16(in + NL_OFF_IP_CSUM, 0);
    st16(in + NL_OFF_IP_CSUM, (uint16_t)~csum_fold(csum_partial(in, in_ihl, 0)));
    /* Only 8 bytes of the quoted L4 header: its checksum is not among them. */
    st16(icmp + NL_OFF_ICMP_CSUM,
         (uint16_t)~csum_fold(csum_partial(icmp, NL_OFF_ICMP_QUOTE + quoted_len, 0)));
    return len;
}
