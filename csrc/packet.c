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
    if (len < 20 || (buf[0] >> 4) != 4)
        return (len >= 1 && (buf[0] >> 4) == 6) ? NL_R_UNSUPPORTED : NL_R_MALFORMED;
    uint32_t ihl = (uint32_t)(buf[0] & 0x0f) * 4;
    uint32_t tot = ((uint32_t)buf[2] << 8) | buf[3];
    if (ihl < 20 || tot < ihl || (tot > len && !head_only) || ihl > len)
        return NL_R_MALFORMED;
    uint16_t frag = (uint16_t)(((uint32_t)buf[6] << 8) | buf[7]);
    if (frag & 0x1fff)                  /* a later fragment: no L4 header; */
        return NL_R_FRAGMENT;           /* it follows its first (fragtrack.c) */
    p->frag = (frag & 0x2000) != 0;     /* MF: the first of several */
    p->ip = buf;
    p->proto = buf[9];
    p->saddr = ld32(buf + 12);
    p->daddr = ld32(buf + 16);
    p->l4 = buf + ihl;
    p->l4len = tot - ihl;
    p->caplen = tot < len ? tot : len;
    uint32_t l4cap = p->caplen - ihl;    /* what we may read of the L4 part */
    p->tcp_flags = 0;
    if (p->proto == 6) {
        if (p->l4len < 20 || l4cap < 20)
            return NL_R_MALFORMED;
        uint32_t doff = (uint32_t)(p->l4[12] >> 4) * 4;
        if (doff < 20 || doff > p->l4len || doff > l4cap)
            return NL_R_MALFORMED;
        p->tcp_flags = p->l4[13];
        p->seq = ((uint32_t)p->l4[4] << 24) | ((uint32_t)p->l4[5] << 16) |
                 ((uint32_t)p->l4[6] << 8) | p->l4[7];
        p->ack = ((uint32_t)p->l4[8] << 24) | ((uint32_t)p->l4[9] << 16) |
                 ((uint32_t)p->l4[10] << 8) | p->l4[11];
        p->seq_len = p->l4len - doff + !!(p->tcp_flags & NL_TCP_SYN) +
                     !!(p->tcp_flags & NL_TCP_FIN);
    } else if (p->proto == 17) {
        if (p->l4len < 8 || l4cap < 8)
            return NL_R_MALFORMED;
        uint32_t ulen = ((uint32_t)p->l4[4] << 8) | p->l4[5];
        /* GSO UDP super-packets may carry a per-segment length, and a
         * first fragment the whole datagram's; anything shorter than a
         * header is simply wrong. */
        if (ulen < 8 || (ulen > p->l4len && !p->frag))
            return NL_R_MALFORMED;
    } else {
        return NL_R_UNSUPPORTED;
    }
    p->sport = ld16(p->l4);
    p->dport = ld16(p->l4 + 2);
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
    sum = csum_add(sum, ld32(p->ip + 12));
    sum = csum_add(sum, ld32(p->ip + 16));
    uint8_t tail[4] = { 0, p->proto, (uint8_t)(p->l4len >> 8), (uint8_t)p->l4len };
    return csum_add(sum, ld32(tail));
}

/* Ones' complement sum of (pseudo-header, L4 segment of `len` bytes). */
static uint32_t l4_sum(const struct nl_pkt *p, uint32_t len)
{
    uint32_t sum = csum_add(ld32(p->ip + 12), ld32(p->ip + 16));
    uint8_t tail[4] = { 0, p->proto, (uint8_t)(len >> 8), (uint8_t)len };
    return csum_partial(p->l4, len, csum_add(sum, ld32(tail)));
}

static int ip_header_ok(const uint8_t *ip)
{
    return csum_fold(csum_partial(ip, (uint32_t)(ip[0] & 0x0f) * 4, 0)) == 0xffff;
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
    if (nl_pkt_len(p) > p->caplen || (ld16(p->ip + 6) & htons(0x3fff)))
        return NL_CSUM_UNKNOWN;
    uint32_t len = p->l4len;
    if (p->proto == 17) {
        if (ld16(p->l4 + 6) == 0)
            return NL_CSUM_OK;          /* IPv4 UDP may carry no checksum */
        len = ((uint32_t)p->l4[4] << 8) | p->l4[5];
    }
    return csum_fold(l4_sum(p, len)) == 0xffff ? NL_CSUM_OK : NL_CSUM_BAD;
}

int nl_check_icmp_csum(const uint8_t *buf, uint32_t len, uint32_t pkt_flags)
{
    if (pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL))
        return NL_CSUM_OK;
    if (len < 20 || (uint32_t)(buf[0] & 0x0f) * 4 > len || !ip_header_ok(buf))
        return NL_CSUM_BAD;
    uint32_t ihl = (uint32_t)(buf[0] & 0x0f) * 4;
    uint32_t tot = ((uint32_t)buf[2] << 8) | buf[3];
    if (tot < ihl)
        return NL_CSUM_BAD;
    if (tot > len)
        return NL_CSUM_UNKNOWN;
    return csum_fold(csum_partial(buf + ihl, tot - ihl, 0)) == 0xffff ? NL_CSUM_OK
                                                                         : NL_CSUM_BAD;
}

void nl_rewrite_addr(uint8_t *ip, int dst, uint32_t addr)
{
    uint8_t *field = ip + (dst ? 16 : 12);
    uint32_t old = ld32(field);
    st32(field, addr);
    st16(ip + 10, csum_replace4(ld16(ip + 10), old, addr));
}

void nl_rewrite(struct nl_pkt *p, int dst, uint32_t addr, uint16_t port,
                uint32_t pkt_flags)
{
    uint8_t *ip_field = p->ip + (dst ? 16 : 12);
    uint8_t *port_field = p->l4 + (dst ? 2 : 0);
    uint32_t old_addr = ld32(ip_field);
    uint16_t old_port = ld16(port_field);
    uint8_t *csum_field = p->l4 + (p->proto == 6 ? 16 : 6);
    uint16_t check = ld16(csum_field);

    st32(ip_field, addr);
    st16(port_field, port);
    st16(p->ip + 10, csum_replace4(ld16(p->ip + 10), old_addr, addr));
    if (dst) { p->daddr = addr; p->dport = port; }
    else { p->saddr = addr; p->sport = port; }

    if (!(pkt_flags & NL_PKT_CSUM_PARTIAL)) {
        if (p->proto == 17 && check == 0)
            return;                     /* UDP without checksum stays so */
        check = csum_replace4(check, old_addr, addr);
        check = csum_replace2(check, old_port, port);
        if (p->proto == 17 && check == 0)
            check = 0xffff;
    } else if (pkt_flags & NL_PKT_GSO) {
        check = csum_fold(pseudo_sum(p));
    } else {
        st16(csum_field, 0);
        check = (uint16_t)~csum_fold(csum_partial(p->l4, p->l4len, pseudo_sum(p)));
        if (p->proto == 17 && check == 0)
            check = 0xffff;
    }
    st16(csum_field, check);
}

void nl_build_tcp(uint8_t *buf, uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport,
                  uint32_t seq, uint32_t ack, uint8_t flags)
{
    memset(buf, 0, 40);
    buf[0] = 0x45;
    buf[3] = 40;
    buf[6] = 0x40;                      /* DF */
    buf[8] = 64;                        /* TTL */
    buf[9] = 6;
    st32(buf + 12, saddr);
    st32(buf + 16, daddr);
    st16(buf + 10, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    uint8_t *tcp = buf + 20;
    st16(tcp, sport);
    st16(tcp + 2, dport);
    for (int i = 0; i < 4; i++) {
        tcp[4 + i] = (uint8_t)(seq >> (24 - 8 * i));
        tcp[8 + i] = (uint8_t)(ack >> (24 - 8 * i));
    }
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    if (flags & NL_TCP_ACK) {
        tcp[14] = 0x10;                 /* a small window: this segment is a probe */
    }
    struct nl_pkt p = { .ip = buf, .l4 = tcp, .l4len = 20, .proto = 6 };
    st16(tcp + 16, (uint16_t)~csum_fold(csum_partial(tcp, 20, pseudo_sum(&p))));
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
    if (len < 20 || (buf[0] >> 4) != 4 || buf[9] != 1)
        return NL_R_UNSUPPORTED;
    uint32_t ihl = (uint32_t)(buf[0] & 0x0f) * 4;
    uint32_t tot = ((uint32_t)buf[2] << 8) | buf[3];
    if (ihl < 20 || tot < ihl || (tot > len && !head_only) || ihl > len)
        return NL_R_MALFORMED;
    const uint8_t *icmp = buf + ihl;
    uint32_t left = (tot < len ? tot : len) - ihl;   /* what we have of it */
    if (left < 8)
        return NL_R_MALFORMED;
    if (icmp[0] != 3)
        return NL_R_UNSUPPORTED;
    const uint8_t *in = icmp + 8;
    left -= 8;
    if (left < 20 || (in[0] >> 4) != 4)
        return NL_R_MALFORMED;
    uint32_t in_ihl = (uint32_t)(in[0] & 0x0f) * 4;
    if (in_ihl < 20 || left < in_ihl + 8)    /* RFC 792: header + 8 bytes */
        return NL_R_MALFORMED;
    if (in[9] != 6 && in[9] != 17)
        return NL_R_UNSUPPORTED;
    memset(out, 0, sizeof(*out));
    out->frag_needed = icmp[1] == 4;
    out->mtu = ld16(icmp + 6);
    out->outer_saddr = ld32(buf + 12);
    out->quoted = in;
    out->quoted_len = in_ihl + 8;
    inner->proto = in[9];
    inner->saddr = ld32(in + 12);
    inner->daddr = ld32(in + 16);
    inner->sport = ld16(in + in_ihl);
    inner->dport = ld16(in + in_ihl + 2);
    const uint8_t *q = in + in_ihl + 4;
    out->quoted_seq = ((uint32_t)q[0] << 24) | ((uint32_t)q[1] << 16) |
                      ((uint32_t)q[2] << 8) | q[3];
    return -1;
}

uint32_t nl_build_frag_needed(uint8_t *buf, uint32_t src, uint32_t dst, uint16_t mtu,
                              const uint8_t *quoted, uint32_t quoted_len, uint32_t saddr,
                              uint16_t sport)
{
    uint32_t len = 20 + 8 + quoted_len;
    memset(buf, 0, 28);
    buf[0] = 0x45;
    buf[2] = (uint8_t)(len >> 8);
    buf[3] = (uint8_t)len;
    buf[8] = 64;
    buf[9] = 1;
    st32(buf + 12, src);
    st32(buf + 16, dst);
    st16(buf + 10, (uint16_t)~csum_fold(csum_partial(buf, 20, 0)));
    uint8_t *icmp = buf + 20;
    icmp[0] = 3;
    icmp[1] = 4;
    st16(icmp + 6, mtu);
    uint8_t *in = icmp + 8;
    memcpy(in, quoted, quoted_len);
    uint32_t in_ihl = (uint32_t)(in[0] & 0x0f) * 4;
    st32(in + 12, saddr);
    st16(in + in_ihl, sport);
    st16(in + 10, 0);
    st16(in + 10, (uint16_t)~csum_fold(csum_partial(in, in_ihl, 0)));
    /* Only 8 bytes of the quoted L4 header: its checksum is not among them. */
    st16(icmp + 2, (uint16_t)~csum_fold(csum_partial(icmp, 8 + quoted_len, 0)));
    return len;
}
