/*
 * fixture.c -- see fixture.h.  Oracles, beyond "no sanitizer report":
 *  - nl_ct_check after every step (chains, free list, counts, gauges);
 *  - verdicts: copy mode never marks, mark mode never rewrites and leaves
 *    the bytes alone; marks name a published backend or service;
 *  - a rewritten packet that arrived with valid sums leaves with valid sums
 *    (or, for GSO, the pseudo-header sum the kernel expects);
 *  - what natlb sends itself (outbox) is a well-formed IPv4 or IPv6 packet
 *    with valid checksums; events name a published service and backend;
 *  - at the end of an input, with every flow expired and swept, the table
 *    is empty and every gauge is back to zero; so is the fragment table
 *    (fragments are tracked; nothing is held: nl_process has no packet id).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include "internal.h"
#include "natlb_test.h"
#include "fixture.h"

#define N_BACKENDS 19
#define MAX_TABLE 16

struct svc_def {
    uint8_t vip, proto, sched;
    uint16_t port;
    uint8_t n;                       /* backends: ids first .. first+n-1 */
    uint8_t first;
    uint16_t table_len;
    uint8_t v6;                      /* IPv6 VIP and backends             */
    uint8_t cluster;
};

/* VIPs are 192.0.2.x, backends 203.0.113.(10 + id % 6): services share
 * backend addresses on other ports, as real configs do.  IPv6: VIPs
 * 2001:db8::x, backends 2001:db8:113::(10 + id % 6) (hex). */
static const struct svc_def SVCS[] = {
    { 100, 6, NL_SCHED_RR, 80, 3, 0, 3, 0, 0 },
    { 100, 17, NL_SCHED_LC, 53, 2, 3, 0, 0, 0 },
    { 101, 6, NL_SCHED_MAGLEV, 443, 3, 5, 13, 0, 0 },
    { 101, 6, NL_SCHED_SH, 25, 2, 8, 8, 0, 0 },
    { 102, 17, NL_SCHED_WRR, 5353, 2, 10, 3, 0, 0 },
    { 103, 6, NL_SCHED_RR, 80, 0, 0, 0, 0, 0 },
    { 103, 6, NL_SCHED_LC, 8080, 2, 12, 0, 0, 0 },
    { 100, 6, NL_SCHED_RR, 80, 2, 14, 2, 1, 0 },
    { 100, 17, NL_SCHED_MAGLEV, 53, 2, 16, 7, 1, 0 },
    { 101, 6, NL_SCHED_MAGLEV, 443, 1, 18, 5, 1, 1 },
};
#define N_SVCS (sizeof(SVCS) / sizeof(SVCS[0]))

static struct nl_lb *lb;
static uint64_t now;
static int all_fixed;                /* every packet of this input had valid sums */
static uint32_t be_flags[N_BACKENDS];

void fx_fail(const char *what, long detail)
{
    fprintf(stderr, "natlb fuzz oracle: %s (%ld)\n", what, detail);
    abort();
}

static uint32_t ip4(uint8_t a, uint8_t b, uint8_t c, uint8_t d)
{
    return htonl((uint32_t)a << 24 | (uint32_t)b << 16 | (uint32_t)c << 8 | d);
}

/* 2001:db8:<mid>::<low> */
static struct nl_addr ip6(uint16_t mid, uint8_t low)
{
    uint8_t b[16] = { 0x20, 0x01, 0x0d, 0xb8, (uint8_t)(mid >> 8), (uint8_t)mid };
    b[15] = low;
    struct nl_addr a;
    memcpy(&a, b, 16);
    return a;
}

static struct nl_addr vip_of(const struct svc_def *s)
{
    return s->v6 ? ip6(0, s->vip) : nl_addr_v4(ip4(192, 0, 2, s->vip));
}

static struct nl_addr backend_addr(const struct svc_def *s, uint32_t id)
{
    return s->v6 ? ip6(0x113, (uint8_t)(0x10 + id % 6))
                 : nl_addr_v4(ip4(203, 0, 113, (uint8_t)(10 + id % 6)));
}

static uint16_t backend_port(const struct svc_def *s)
{
    return s->port == 80 ? 8080 : s->port;
}

static void publish(void)
{
    struct nl_snapshot *snap = nl_snapshot_new(N_SVCS);
    if (!snap)
        fx_fail("nl_snapshot_new", 0);
    for (uint32_t i = 0; i < N_SVCS; i++) {
        const struct svc_def *s = &SVCS[i];
        struct nl_service_spec spec = { vip_of(s), htons(s->port), s->proto, s->sched, i,
                                        s->cluster ? NL_SVC_CLUSTER : 0 };
        struct nl_backend_spec be[4];
        uint16_t table[MAX_TABLE];
        for (uint32_t j = 0; j < s->n; j++) {
            uint32_t id = s->first + j;
            be[j] = (struct nl_backend_spec){ backend_addr(s, id),
                                              htons(backend_port(s)), (uint16_t)(j * 2),
                                              id, be_flags[id] };
        }
        for (uint32_t t = 0; t < s->table_len; t++)
            table[t] = (uint16_t)((t * 7 + t / 3) % s->n);
        if (nl_snapshot_set_service(snap, i, &spec, be, s->n, table, s->table_len) < 0)
            fx_fail("nl_snapshot_set_service", i);
    }
    if (nl_publish(lb, snap) < 0)
        fx_fail("nl_publish", 0);
}

static void create(void)
{
    struct nl_config cfg = {
        .max_flows = 64,
        .n_workers = 1,
        /* syn, established, fin, close, udp: short, so that the 16-bit time
         * steps of an input reach every expiry */
        .timeout_ms = { 3000, 20000, 2000, 1000, 5000 },
        .syn_timeout_ms = 50,
        .resteer_tries = 3,
        .max_services = N_SVCS,
        .max_backends = N_BACKENDS,
        /* Fragments are tracked: later ones follow their first (nl_process
         * gives no packet id, so none is held). */
        .max_fragments = 16,
        .fragment_timeout_ms = 1000,
    };
    lb = nl_create(&cfg);
    if (!lb)
        fx_fail("nl_create", 0);
    /* Fixed seeds, so an input hashes and schedules the same way in every
     * run (set while the table is empty: chains depend on the seed). */
    lb->ct.seed = 0x6e61746cu;
    lb->sched_seed = 0x62616c61u;
}

/* ---- checksums (a reference implementation, independent of packet.c) ---- */

static uint32_t sum16(const uint8_t *d, uint32_t n, uint32_t s)
{
    for (uint32_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)d[i] << 8 | d[i + 1];
    if (n & 1)
        s += (uint32_t)d[n - 1] << 8;
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

static uint32_t ihl_of(const uint8_t *ip) { return (uint32_t)(ip[0] & 0x0f) * 4; }
static uint32_t tot_of(const uint8_t *ip) { return (uint32_t)ip[2] << 8 | ip[3]; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static int is6(const uint8_t *ip) { return (ip[0] >> 4) == 6; }

/* The upper layer of an IPv6 packet of len bytes: its offset (0 if the
 * extension headers do not end inside, or a later fragment) and protocol;
 * *frag is set for a fragment of several.  Independent of packet.c's walk. */
static uint32_t l4_off6(const uint8_t *ip, uint32_t len, uint8_t *proto, int *frag)
{
    uint32_t off = 40;
    uint8_t nh = ip[6];
    *frag = 0;
    for (int n = 0; n < 16; n++) {
        if (nh != 0 && nh != 43 && nh != 60 && nh != 44)
            break;
        if (off + 8 > len)
            return 0;
        if (nh == 44) {
            if (get16(ip + off + 2) & 0xfff8)
                return 0;
            *frag |= get16(ip + off + 2) & 1;
            nh = ip[off];
            off += 8;
            continue;
        }
        nh = ip[off];
        off += ((uint32_t)ip[off + 1] + 1) * 8;
    }
    if (off > len)
        return 0;
    *proto = nh;
    return off;
}

/* An IPv4 or IPv6 packet's L4 view: offset, protocol, L4 length. */
static int l4_view(const uint8_t *ip, uint32_t len, uint32_t *off, uint8_t *proto,
                   uint32_t *l4len, int *frag)
{
    *frag = 0;
    if (is6(ip)) {
        if (len < 40 || 40u + get16(ip + 4) != len || !(*off = l4_off6(ip, len, proto, frag)))
            return 0;
    } else {
        if (len < 20 || ihl_of(ip) < 20 || ihl_of(ip) > len)
            return 0;
        *off = ihl_of(ip);
        *proto = ip[9];
    }
    *l4len = len - *off;
    return 1;
}

static uint32_t pseudo(const uint8_t *ip, uint8_t proto, uint32_t l4len)
{
    if (is6(ip))
        return sum16(ip + 8, 32, 0) + proto + l4len;
    return sum16(ip + 12, 8, 0) + proto + l4len;
}

static int ip_sum_ok(const uint8_t *ip)
{
    return is6(ip) || fold(sum16(ip, ihl_of(ip), 0)) == 0xffff;
}

/* Offset of the L4 checksum field, or 0 if the protocol has none we track. */
static uint32_t l4_csum_off(uint8_t proto)
{
    return proto == 6 ? 16 : proto == 17 ? 6 : (proto == 1 || proto == 58) ? 2 : 0;
}

/* Whether ip (len bytes, all of it) is a plain IPv4 or IPv6 packet whose
 * L4 header we can checksum: no fragment, lengths consistent. */
static int summable(const uint8_t *ip, uint32_t len)
{
    uint32_t off, l4len;
    uint8_t proto;
    int frag;
    if (len < 1 || ((ip[0] >> 4) != 4 && !is6(ip)) ||
        !l4_view(ip, len, &off, &proto, &l4len, &frag) || frag)
        return 0;
    if (!is6(ip) && (tot_of(ip) != len || (get16(ip + 6) & 0x3fff)))
        return 0;
    uint32_t c = l4_csum_off(proto);
    return c && (proto != 1 || !is6(ip)) && (proto != 58 || is6(ip)) && l4len >= c + 2;
}

static int l4_sum_ok(const uint8_t *ip, uint32_t len)
{
    uint32_t off, l4len;
    uint8_t proto;
    int frag;
    if (!l4_view(ip, len, &off, &proto, &l4len, &frag))
        return 0;
    const uint8_t *l4 = ip + off;
    if (proto == 17 && get16(l4 + 6) == 0)
        return !is6(ip);              /* IPv4 UDP without a checksum; never IPv6 */
    uint32_t s = sum16(l4, l4len, proto == 1 ? 0 : pseudo(ip, proto, l4len));
    return fold(s) == 0xffff;
}

/* Makes the packet what a correct sender would send: total (payload)
 * length, IP and L4 checksums; with partial, the L4 field holds the
 * pseudo-header sum, as the kernel leaves it for CHECKSUM_PARTIAL. */
static void fix(uint8_t *ip, uint32_t len, int partial)
{
    if (len >= 40 && is6(ip)) {
        put16(ip + 4, (uint16_t)(len - 40));
    } else {
        if (len < 20 || (ip[0] >> 4) != 4 || ihl_of(ip) < 20 || ihl_of(ip) > len)
            return;
        put16(ip + 2, (uint16_t)len);
    }
    uint32_t off, l4len;
    uint8_t proto;
    int frag;
    if (l4_view(ip, len, &off, &proto, &l4len, &frag) && !frag &&
        (is6(ip) || !(get16(ip + 6) & 0x3fff))) {
        uint32_t c = l4_csum_off(proto);
        uint8_t *l4 = ip + off;
        if (c && l4len >= c + 2) {
            if (proto == 17 && l4len >= 8)
                put16(l4 + 4, (uint16_t)l4len);
            put16(l4 + c, 0);
            if (partial && proto != 1 && proto != 58) {
                put16(l4 + c, fold(pseudo(ip, proto, l4len)));
            } else {
                uint16_t v = (uint16_t)~fold(sum16(l4, l4len,
                                                   proto == 1 ? 0 : pseudo(ip, proto, l4len)));
                put16(l4 + c, (proto == 17 && v == 0) ? 0xffff : v);
            }
        }
    }
    if (!is6(ip)) {
        put16(ip + 10, 0);
        put16(ip + 10, (uint16_t)~fold(sum16(ip, ihl_of(ip), 0)));
    }
}

/* ---- oracles ----------------------------------------------------------- */

static int published_backend(uint32_t id)
{
    return id < N_BACKENDS;
}

static void check_table(void)
{
    int r = nl_ct_check(lb);
    if (r != NL_CHECK_OK)
        fx_fail("nl_ct_check", r);
}

/* A rewrite changes one side only, to a published backend (forward) or
 * service (reply), and nothing else but the checksums. */
static void check_rewrite_shape(const uint8_t *before, const uint8_t *after, uint32_t len)
{
    int v6 = is6(before);
    uint32_t alen = v6 ? 16 : 4, saddr = v6 ? 8 : 12, daddr = v6 ? 24 : 16;
    uint32_t l4 = ihl_of(before);
    uint8_t proto = before[9];
    int frag;
    if (!v6 && (get16(before + 6) & 0x1fff))
        l4 = len;                     /* a later fragment: only the address */
    if (v6) {
        uint32_t lim = 40u + get16(before + 4) < len ? 40u + get16(before + 4) : len;
        if (!(l4 = l4_off6(before, lim, &proto, &frag)))
            l4 = len;                 /* a later fragment: only the address */
    }
    uint32_t csum = l4 + l4_csum_off(proto);
    int fwd = memcmp(before + daddr, after + daddr, alen) != 0;
    uint32_t a0 = fwd ? daddr : saddr;
    for (uint32_t i = 0; i < len; i++) {
        int addr = i >= a0 && i < a0 + alen;
        int port = i >= l4 + (fwd ? 2u : 0u) && i < l4 + (fwd ? 4u : 2u);
        int sums = (!v6 && (i == 10 || i == 11)) || i == csum || i == csum + 1;
        if (!addr && !port && !sums && before[i] != after[i])
            fx_fail("rewrite changed a byte it should not", (long)i);
    }
    struct nl_addr a;
    if (v6) {
        memcpy(&a, after + a0, 16);
    } else {
        uint32_t w;
        memcpy(&w, after + a0, 4);
        a = nl_addr_v4(w);
    }
    /* A later fragment carries no port: its address must still be one. */
    int ported = l4 + 4 <= len;
    uint16_t port = ported ? get16(after + l4 + (fwd ? 2 : 0)) : 0;
    for (uint32_t i = 0; i < N_SVCS; i++) {
        const struct svc_def *sv = &SVCS[i];
        struct nl_addr va = vip_of(sv);
        if (!fwd && nl_addr_eq(&a, &va) && (!ported || port == sv->port))
            return;
        for (uint32_t j = 0; fwd && j < sv->n; j++) {
            struct nl_addr ba = backend_addr(sv, sv->first + j);
            if (nl_addr_eq(&a, &ba) && (!ported || port == backend_port(sv)))
                return;
        }
    }
    fx_fail(fwd ? "forward rewrite to no published backend" : "reply rewrite from no service",
            port);
}

static void check_rewrite(const uint8_t *ip, uint32_t len, uint32_t flags)
{
    if (!ip_sum_ok(ip))
        fx_fail("rewritten IP header checksum", len);
    uint32_t off, l4len;
    uint8_t proto;
    int frag;
    if (!l4_view(ip, len, &off, &proto, &l4len, &frag))
        fx_fail("rewritten packet lost its shape", len);
    if (proto != 6 && proto != 17)
        fx_fail("rewrote a packet that is not TCP/UDP", proto);
    const uint8_t *l4 = ip + off;
    if ((flags & NL_PKT_CSUM_PARTIAL) && (flags & NL_PKT_GSO)) {
        if (get16(l4 + l4_csum_off(proto)) != fold(pseudo(ip, proto, l4len)))
            fx_fail("GSO pseudo-header sum after rewrite", len);
    } else if (!l4_sum_ok(ip, len)) {
        fx_fail("rewritten L4 checksum", (long)flags);
    }
}

static void drain(void)
{
    uint8_t out[256];
    uint32_t n;
    while ((n = nl_outbox_take(lb, out, sizeof(out))) != 0) {
        if (is6(out) ? (n < 48 || 40u + get16(out + 4) != n)
                     : (n < 28 || (out[0] >> 4) != 4 || tot_of(out) != n || ihl_of(out) > n))
            fx_fail("outbox packet framing", n);
        if (!summable(out, n) || !l4_sum_ok(out, n))
            fx_fail("outbox L4 checksum", out[9]);
        /* A re-sent SYN keeps the client's IP header, sums included. */
        if (all_fixed && !ip_sum_ok(out))
            fx_fail("outbox IP checksum", out[9]);
    }
    struct nl_event ev[64];
    while ((n = nl_read_events(lb, ev, 64)) != 0) {
        for (uint32_t i = 0; i < n; i++)
            if (ev[i].kind < NL_EV_SYN_RST || ev[i].kind > NL_EV_ICMP ||
                ev[i].service_id >= N_SVCS || !published_backend(ev[i].backend_id))
                fx_fail("event names no published service/backend", ev[i].kind);
    }
}

struct nl_lb *fx_lb(void)
{
    return lb;
}

/* ---- steps ------------------------------------------------------------- */

void fx_begin(uint64_t now_ms)
{
    if (!lb)
        create();
    for (uint32_t id = 0; id < N_BACKENDS; id++)
        be_flags[id] = NL_BE_ELIGIBLE | NL_BE_ALIVE;
    be_flags[13] = NL_BE_ALIVE;      /* draining: alive, takes no new flows */
    publish();
    lb->ct.sweep_cursor = 0;
    now = now_ms;
    all_fixed = 1;
}

void fx_packet(uint8_t *buf, uint32_t len, uint32_t flags)
{
    uint32_t pkt_flags = flags & (NL_PKT_CSUM_PARTIAL | NL_PKT_GSO | NL_PKT_HEAD_ONLY |
                                  NL_PKT_CSUM_VERIFIED);
    int fixed = 0;
    if (flags & FX_FIX) {
        fix(buf, len, (pkt_flags & NL_PKT_CSUM_PARTIAL) != 0);
        fixed = summable(buf, len);
        /* Mark mode's partial copy: the head of a longer packet. */
        if ((pkt_flags & NL_PKT_HEAD_ONLY) && len > 40)
            len = 40 + (len - 40) / 2;
    }
    if (!fixed)
        all_fixed = 0;
    /* The core sees exactly len bytes on the heap, even after a cut. */
    uint8_t *caller = buf;
    buf = malloc(len ? len : 1);
    memcpy(buf, caller, len);
    uint8_t *orig = malloc(len ? len : 1);
    memcpy(orig, buf, len);
    int v;
    if (flags & FX_MARK_MODE) {
        uint32_t mark = 0xdeadbeef;
        v = nl_decide(lb, 0, buf, len, pkt_flags, now, &mark);
        if (v == NL_VERDICT_REWRITE || memcmp(orig, buf, len) != 0)
            fx_fail("nl_decide changed the packet", v);
        if (v == NL_VERDICT_MARK) {
            uint32_t kind = mark & 0xfff00000u, id = mark & 0xfffffu;
            if (!(kind == NL_MARK_FORWARD && published_backend(id)) &&
                !(kind == NL_MARK_REPLY && id < N_SVCS))
                fx_fail("mark names no published backend or service", (long)mark);
        } else if (mark != 0) {
            fx_fail("mark set without NL_VERDICT_MARK", (long)mark);
        }
    } else {
        v = nl_process(lb, 0, buf, len, pkt_flags, now);
        if (v == NL_VERDICT_MARK)
            fx_fail("nl_process returned MARK", v);
        if (v != NL_VERDICT_REWRITE && memcmp(orig, buf, len) != 0)
            fx_fail("packet changed without NL_VERDICT_REWRITE", v);
        if (v == NL_VERDICT_REWRITE)
            check_rewrite_shape(orig, buf, len);
        if (v == NL_VERDICT_REWRITE && fixed && !(pkt_flags & NL_PKT_HEAD_ONLY))
            check_rewrite(buf, len, pkt_flags);
    }
    if (v < NL_VERDICT_ACCEPT || v > NL_VERDICT_MARK)
        fx_fail("verdict out of range", v);
    memcpy(caller, buf, len);
    free(orig);
    free(buf);
    drain();
    check_table();
}

void fx_advance(uint32_t ms)
{
    now += ms;
    nl_failover_tick(lb, now);
    /* The worker's sweep share: all buckets per second of elapsed time. */
    uint64_t nb = (uint64_t)lb->ct.n_buckets * ms / 1000 + 1;
    nl_ct_sweep(lb, now, nb > lb->ct.n_buckets ? lb->ct.n_buckets : (uint32_t)nb);
    drain();
    check_table();
}

void fx_control(uint8_t op)
{
    uint32_t id = (op & 0x3f) % N_BACKENDS;
    switch (op >> 6) {
    case 0:     /* health: dies or comes back (a dead backend takes no new flows) */
        be_flags[id] = (be_flags[id] & NL_BE_ALIVE) ? 0 : NL_BE_ALIVE | NL_BE_ELIGIBLE;
        publish();
        break;
    case 1:     /* drain / undrain */
        be_flags[id] ^= NL_BE_ELIGIBLE;
        publish();
        break;
    case 2:     /* on_backend_down = reset */
        nl_reset_backend(lb, id);
        break;
    default:    /* a reload that changes nothing */
        publish();
        break;
    }
    drain();
    check_table();
}

void fx_end(void)
{
    /* Far enough for every timeout and held SYN, near enough not to wrap. */
    now += 1u << 30;
    nl_failover_tick(lb, now);
    nl_ct_sweep(lb, now, lb->ct.n_buckets);
    drain();
    check_table();
    if (nl_ct_count(lb) != 0)
        fx_fail("flows left after everything expired", nl_ct_count(lb));
    /* The fragment table too, so the next input starts from nothing. */
    nl_frag_tick(lb, now);
    if (nl_frag_count(lb) != 0 || nl_frag_held(lb) != 0)
        fx_fail("fragments left after everything expired", nl_frag_count(lb));
}
