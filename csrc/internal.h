/* internal.h -- structures private to the C core (not part of the cffi API). */
#ifndef NATLB_INTERNAL_H
#define NATLB_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <time.h>
#include "natlb.h"
#include "mix32.h"

#define NL_LIKELY(x) __builtin_expect(!!(x), 1)
#define NL_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define NL_NIL 0xffffffffu
#define NL_HELD_NONE 0xffff          /* nl_flow.held: no SYN held          */

/* CLOCK_MONOTONIC in milliseconds: the clock of every flow deadline.  The
 * I/O layer reads it and hands the core its `now`. */
static inline uint64_t nl_monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}


/* ---- header fields (RFC 791, 793, 768, 792) ----------------------------- */
/* Named once here; every C file reads and writes headers through these. */
#define NL_IPPROTO_ICMP 1
#define NL_IPPROTO_TCP 6
#define NL_IPPROTO_UDP 17
/* Byte offsets of the fields natlb touches, from the start of each header. */
#define NL_OFF_IP_TOT_LEN 2
#define NL_OFF_IP_ID 4           /* identification: one datagram's fragments */
#define NL_OFF_IP_FRAG 6         /* flags (DF, MF) and fragment offset     */
#define NL_OFF_IP_TTL 8
#define NL_OFF_IP_PROTO 9
#define NL_OFF_IP_CSUM 10
#define NL_OFF_IP_SADDR 12
#define NL_OFF_IP_DADDR 16
#define NL_OFF_L4_SPORT 0        /* TCP and UDP alike                       */
#define NL_OFF_L4_DPORT 2
#define NL_OFF_TCP_SEQ 4
#define NL_OFF_TCP_ACK 8
#define NL_OFF_TCP_DOFF 12       /* data offset, in the high nibble         */
#define NL_OFF_TCP_FLAGS 13
#define NL_OFF_TCP_WIN 14
#define NL_OFF_TCP_CSUM 16
#define NL_OFF_UDP_LEN 4
#define NL_OFF_UDP_CSUM 6
#define NL_OFF_ICMP_TYPE 0
#define NL_OFF_ICMP_CODE 1
#define NL_OFF_ICMP_CSUM 2
#define NL_OFF_ICMP_MTU 6        /* next-hop MTU of "fragmentation needed"  */
#define NL_OFF_ICMP_QUOTE 8      /* the quoted IP header                    */
#define NL_ICMP_DEST_UNREACH 3
#define NL_ICMP_FRAG_NEEDED 4    /* code of DEST_UNREACH                    */
#define NL_IP_DF 0x40            /* in the first byte at NL_OFF_IP_FRAG     */
/* IPv6 (RFC 8200, 4443) */
#define NL_IPPROTO_HOPOPTS 0
#define NL_IPPROTO_ROUTING 43
#define NL_IPPROTO_FRAGMENT 44
#define NL_IPPROTO_ESP 50
#define NL_IPPROTO_AH 51
#define NL_IPPROTO_ICMPV6 58
#define NL_IPPROTO_NONE 59
#define NL_IPPROTO_DSTOPTS 60
#define NL_IP6_HLEN 40
#define NL_OFF_IP6_PLEN 4        /* payload length (after the fixed header) */
#define NL_OFF_IP6_NEXT 6        /* next header                             */
#define NL_OFF_IP6_HOPS 7
#define NL_OFF_IP6_SADDR 8
#define NL_OFF_IP6_DADDR 24
#define NL_OFF_FRAG6_OFF 2       /* offset (13 bits, in 8-byte units) << 3 | M */
#define NL_OFF_FRAG6_ID 4
#define NL_OFF_RT_SEGLEFT 3      /* routing header: segments left           */
#define NL_IP6_MAX_EXT 8         /* extension headers walked at most        */
#define NL_ICMP6_DEST_UNREACH 1
#define NL_ICMP6_PKT_TOO_BIG 2
#define NL_OFF_ICMP6_MTU 4       /* packet too big: 32-bit MTU              */

/* Big-endian (network order) fields as host-order numbers. */
static inline uint32_t nl_be16(const uint8_t *p)
{
    return ((uint32_t)p[0] << 8) | p[1];
}

static inline uint32_t nl_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- addresses (struct nl_addr, natlb.h) ------------------------------- */
/* The third word of an IPv4-mapped address, as it sits in memory. */
static inline uint32_t nl_mapped_word(void)
{
    const uint8_t b[4] = { 0, 0, 0xff, 0xff };
    uint32_t w;
    __builtin_memcpy(&w, b, 4);
    return w;
}

/* The two 64-bit halves of an address (memcpy: one unaligned load each). */
static inline uint64_t nl_addr_hi(const struct nl_addr *a)
{
    uint64_t v;
    __builtin_memcpy(&v, &a->w[0], 8);
    return v;
}

static inline uint64_t nl_addr_lo(const struct nl_addr *a)
{
    uint64_t v;
    __builtin_memcpy(&v, &a->w[2], 8);
    return v;
}

static inline int nl_addr_is_v4(const struct nl_addr *a)
{
    return nl_addr_hi(a) == 0 && a->w[2] == nl_mapped_word();
}

/* Written as two 64-bit halves, as nl_addr_hi/lo read it: a 64-bit load
 * of a half written by two 32-bit stores cannot be forwarded from them and
 * waits until they reach the cache (every packet's hash and compares read
 * the addresses its parse just wrote). */
static inline struct nl_addr nl_addr_v4(uint32_t v4)
{
    const uint32_t low[2] = { nl_mapped_word(), v4 };
    uint64_t hi = 0, lo;
    __builtin_memcpy(&lo, low, 8);
    struct nl_addr a;
    __builtin_memcpy(&a.w[0], &hi, 8);
    __builtin_memcpy(&a.w[2], &lo, 8);
    return a;
}

static inline int nl_addr_eq(const struct nl_addr *a, const struct nl_addr *b)
{
    return ((nl_addr_hi(a) ^ nl_addr_hi(b)) | (nl_addr_lo(a) ^ nl_addr_lo(b))) == 0;
}

/* A seeded hash of an address.  IPv4 costs one mix, as it did before IPv6
 * (so cluster nodes of either build hash an IPv4 client alike); IPv6 mixes
 * every word in turn, so choosing the low 64 bits (a client's own /64)
 * cannot aim at one bucket without knowing the seed. */
static inline uint32_t nl_addr_hash(const struct nl_addr *a, uint32_t seed)
{
    uint32_t h = nl_mix32(a->w[3] ^ seed);
    if (NL_LIKELY(nl_addr_is_v4(a)))
        return h;
    return nl_mix32(nl_mix32(nl_mix32(h ^ a->w[0]) ^ a->w[1]) ^ a->w[2]);
}

/* The IP version and header length, from the header's first byte. */
static inline uint32_t nl_ip_version(const uint8_t *ip)
{
    return ip[0] >> 4;
}

static inline uint32_t nl_ip_hlen(const uint8_t *ip)
{
    return (uint32_t)(ip[0] & 0x0f) * 4;
}

/* ---- packet view (packet.c) -------------------------------------------- */
/* A parsed IPv4 or IPv6 TCP/UDP packet.  Pointers point into the caller's
 * buffer; every offset was bounds-checked by nl_parse. */
struct nl_pkt {
    uint8_t *ip;
    uint8_t *l4;
    uint32_t l4len;          /* from the IP (payload) length, not the buffer */
    uint8_t family;          /* 4 or 6                                    */
    uint8_t proto;           /* the L4 protocol (after IPv6 ext. headers) */
    uint8_t tcp_flags;
    struct nl_addr saddr, daddr;
    uint16_t sport, dport;   /* network order */
    uint32_t caplen;         /* bytes of the packet actually in the buffer */
    uint32_t seq;            /* TCP, host order                            */
    uint32_t ack;            /* TCP, host order                            */
    uint32_t seq_len;        /* TCP: payload + SYN + FIN, what seq advances */
    uint8_t frag;            /* the first fragment of a fragmented datagram:
                                l4len covers this fragment only           */
    /* Fragments (set when frag, or when nl_parse returns NL_R_FRAGMENT). */
    uint8_t frag_nh;         /* IPv4: the protocol; IPv6: the fragment
                                header's next header (the same in every
                                fragment of the datagram)                 */
    uint8_t frag_last;       /* no more fragments follow (M/MF clear)      */
    uint32_t frag_id;        /* IP identification, host order             */
    uint32_t frag_off;       /* byte offset of this fragment's data        */
    uint32_t frag_data;      /* bytes of fragment data in this packet      */
    /* What forward()/reply() did, for the datagram's later fragments (set
     * only for a first fragment, frag). */
    struct nl_addr nat_addr; /* address written (backend, or VIP)         */
    uint16_t nat_service, nat_backend;
};

#define NL_TCP_FIN 0x01
#define NL_TCP_SYN 0x02
#define NL_TCP_RST 0x04
#define NL_TCP_ACK 0x10

/* The packet's length per its IP header (the buffer may hold less). */
static inline uint32_t nl_pkt_len(const struct nl_pkt *p)
{
    return p->l4len + (uint32_t)(p->l4 - p->ip);
}

/* Returns -1 if the packet is usable, otherwise an NL_R_* reason.  With
 * head_only, the buffer may stop after the L4 header. */
int nl_parse(uint8_t *buf, uint32_t len, struct nl_pkt *p, int head_only);
/* What a packet's checksums say (nl_check_csum). */
#define NL_CSUM_BAD 0            /* one is wrong: drop the packet            */
#define NL_CSUM_OK 1             /* verified here, or by the kernel (flags)  */
#define NL_CSUM_UNKNOWN 2        /* only the packet's head is in the buffer  */
/* Checks the IPv4 header checksum, and the TCP/UDP one when the whole
 * packet is in the buffer and the kernel has not vouched for it
 * (pkt_flags).  An IPv6 UDP datagram without a checksum is always BAD. */
int nl_check_csum_bytes(const struct nl_pkt *p, uint32_t pkt_flags);
static inline int nl_check_csum(const struct nl_pkt *p, uint32_t pkt_flags)
{
    /* The usual case, inline: the kernel vouches for an IPv4 packet's sums
     * (an IPv6 UDP datagram may still lack one: packet.c). */
    if ((pkt_flags & (NL_PKT_CSUM_VERIFIED | NL_PKT_CSUM_PARTIAL)) && p->family == 4)
        return NL_CSUM_OK;
    return nl_check_csum_bytes(p, pkt_flags);
}
/* 1 if the L4 checksum field holds only the pseudo-header's sum, as a
 * packet does whose sum a device is still to finish (CHECKSUM_PARTIAL),
 * and its IPv4 header's sum is right. */
int nl_csum_partial_form(const struct nl_pkt *p);
/* Whether `field` (a checksum field as the kernel sent it on, after
 * rewriting p's destination to daddr) is the partial form of that
 * rewritten header: the kernel held the packet as CHECKSUM_PARTIAL and
 * finishes the sum; otherwise p's partial form was a wrong sum on a wire. */
int nl_csum_partial_form_to(const struct nl_pkt *p, const struct nl_addr *daddr,
                            uint16_t field);
/* The same for an ICMP or ICMPv6 message (outer: nl_parse's view, with l4
 * at the message). */
int nl_check_icmp_csum(const struct nl_pkt *outer, uint32_t pkt_flags);
/* Replace only the source (or destination) address (and the IPv4 header
 * checksum): a later fragment, whose L4 checksum lives in the first. */
void nl_rewrite_addr(uint8_t *ip, int dst, const struct nl_addr *addr);
/* A packet natlb sends on through its raw socket as the kernel would have
 * forwarded it (a held answer a flow took, rewritten): the hop counted
 * (IPv4 TTL and its header checksum; IPv6 hop limit).  0 (nothing
 * changed): its hops ran out. */
int nl_forward_hop(uint8_t *ip, uint32_t len);
/* Replace the source (or destination) address and port, fixing the IPv4
 * checksum and the L4 checksum according to pkt_flags (NL_PKT_*).  The
 * address is of the packet's family.  The bytes change; p keeps describing
 * the packet as it arrived (its addresses and ports). */
void nl_rewrite(struct nl_pkt *p, int dst, const struct nl_addr *addr, uint16_t port,
                uint32_t pkt_flags);
/* An ICMP destination-unreachable or ICMPv6 destination-unreachable /
 * packet-too-big, read far enough to find its flow. */
struct nl_icmp {
    struct nl_pkt inner;     /* family, proto, addresses and ports of the
                                quoted packet (ip/l4 unset)              */
    int frag_needed;         /* ICMP code 4 / ICMPv6 packet too big: path
                                MTU discovery, not a failure             */
    uint32_t mtu;            /* the MTU it reports, host order           */
    struct nl_addr outer_saddr;   /* who reported it                      */
    const uint8_t *quoted;   /* the quoted packet: its headers + 8 bytes of
                                L4 at least                              */
    uint32_t quoted_len;     /* IPv4: header + 8; IPv6: all that is here  */
    uint32_t quoted_l4off;   /* where its TCP/UDP header starts          */
    uint32_t quoted_seq;     /* TCP: the quoted packet's seq, host order  */
};
/* Returns -1 if the ICMP(v6) message nl_parse found (outer->l4, proto
 * ICMP or ICMPv6) is an error natlb reads, quoting a TCP/UDP packet; or
 * an NL_R_* reason. */
int nl_parse_icmp(const struct nl_pkt *outer, struct nl_icmp *out);
/* Writes the "fragmentation needed" (IPv4) or "packet too big" (IPv6) a
 * backend should get: from the original reporter to dst, quoting the
 * packet with its source set to (dst, sport), within cap bytes.  Returns
 * the length, or 0 if it does not fit. */
uint32_t nl_build_pmtu(uint8_t *buf, uint32_t cap, const struct nl_icmp *icmp,
                       const struct nl_addr *dst, uint16_t sport);
/* Bytes of the largest packet natlb sends itself (outbox slots, held SYNs). */
#define NL_PKT_OUT_MAX 128
/* Bytes of the largest TCP segment natlb builds itself (IPv6 + TCP). */
#define NL_TCP_PKT_MAX 60
/* Writes a TCP RST of the addresses' family (addresses, ports network
 * order; seq host order) with its checksums; returns its length (40 or 60). */
uint32_t nl_build_rst(uint8_t *buf, const struct nl_addr *saddr, const struct nl_addr *daddr,
                      uint16_t sport, uint16_t dport, uint32_t seq);
/* The same with any flags and an ack number (host order). */
uint32_t nl_build_tcp(uint8_t *buf, const struct nl_addr *saddr, const struct nl_addr *daddr,
                      uint16_t sport, uint16_t dport, uint32_t seq, uint32_t ack,
                      uint8_t flags);

/* ---- conntrack (conntrack.c) ------------------------------------------- */
enum nl_flow_state {
    NL_FS_FREE = 0,
    NL_FS_SYN_SENT,          /* client SYN seen                            */
    NL_FS_SYN_RECV,          /* server SYN-ACK seen                        */
    NL_FS_ESTABLISHED,
    NL_FS_FIN,               /* FIN seen                                   */
    NL_FS_CLOSE,             /* RST seen                                   */
    NL_FS_UDP,
};

/* One tracked flow: client <-> VIP on one side, client <-> backend on the
 * other.  Both directions hash on (client addr, client port, proto), so one
 * chain and one lock stripe hold both.  84 bytes (see the static assert):
 * three 128-bit addresses (IPv4 mapped, natlb.h) and 36 bytes of ports,
 * state and sequence numbers.  The table outlives the process (ctstore.c):
 * a change here must list new fields in nl_ct_layout() and bump
 * NL_CT_LAYOUT_VERSION, so that a table written by another build is
 * refused instead of misread. */
struct nl_flow {
    /* What a chain walk reads of an entry that is not the one it looks
     * for comes first, in 24 bytes: it rarely needs a second cache line. */
    struct nl_addr client_addr;
    uint16_t client_port;
    uint8_t proto;
    uint8_t state;           /* enum nl_flow_state                         */
    uint32_t next;           /* chain (or free list) link, NL_NIL ends it  */
    uint32_t expires_ms;     /* wrapping monotonic ms                      */
    uint16_t vip_port;
    uint16_t backend_port;
    struct nl_addr vip_addr;
    struct nl_addr backend_addr;
    uint16_t service_id;
    uint16_t backend_id;
    uint32_t syn_seq;           /* TCP: seq of the client's SYN (host order);
                                   RSTs and ICMP errors about it must match */
    uint32_t client_seq_next;   /* TCP: next seq expected from each side,   */
    uint32_t server_seq_next;   /* host order; the RSTs of a reset use them */
    uint16_t held;              /* slot of the held SYN (see failover.c)    */
    uint8_t tries;              /* backends this flow's SYN has been sent to */
    uint8_t flags;              /* NL_FL_*                                   */
};
#define NL_FL_FIN_CLIENT 1      /* FIN seen from the client                  */
#define NL_FL_FIN_SERVER 2      /* FIN seen from the backend                 */
#define NL_FL_REPLIED 4         /* a reply was seen (UDP; TCP uses state)    */
#define NL_FL_SYN_CHECKED 8     /* the client's SYN was whole and its checksum
                                   good: signals about it may be believed   */
#define NL_FL_PROBE_CLIENT 16   /* reset with the fast path on: the client's */
#define NL_FL_PROBE_SERVER 32   /* / backend's answer to a probe gives the
                                   exact sequence number for its RST         */
#define NL_FL_FAST 64           /* marked fast from its first packet: the
                                   kernel may carry its handshake, so moving
                                   it must make the kernel forget it
                                   (nl_fp_forget_flow)                       */
_Static_assert(sizeof(struct nl_flow) == 84, "conntrack entry: 84 bytes, as documented");
_Static_assert(sizeof(struct nl_flow) <= 128, "conntrack entry: at most 128 bytes (issue 14)");

/* Embryonic: a TCP flow whose handshake the client has not completed, or a
 * UDP flow nobody answered.  Only these are evicted when the table is full
 * (what Linux conntrack calls "not assured"). */
static inline int nl_flow_embryonic(const struct nl_flow *f)
{
    if (f->proto == NL_IPPROTO_TCP)
        return f->state <= NL_FS_SYN_RECV;
    return !(f->flags & NL_FL_REPLIED);
}

#define NL_CT_STRIPES 1024

struct nl_ct {
    struct nl_flow *flows;           /* max_flows entries                  */
    uint32_t *buckets;               /* head index per bucket              */
    uint32_t n_buckets;              /* power of two                       */
    uint32_t max_flows;
    uint32_t seed;
    uint32_t free_head;
    uint32_t count;                  /* entries in use (under free_lock)   */
    pthread_spinlock_t free_lock;
    pthread_spinlock_t stripes[NL_CT_STRIPES];
    uint32_t sweep_cursor;           /* next bucket the sweeper visits     */
    uint32_t evict_cursor;           /* next bucket eviction looks at      */
    uint32_t timeout_ms[NL_T_MAX];
    uint64_t counters[NL_C_MAX];     /* atomic; rare events                */
    void *store;                     /* file mapping holding the arrays (ctstore.c) */
    size_t store_len;
    /* Called for every flow freed, before it is unlinked, so its owner can
     * release what it keeps about it (gauges, a held SYN): the table itself
     * knows nothing of them. */
    void (*on_free)(void *ctx, struct nl_flow *f);
    void *on_free_ctx;
};

/* Direction-neutral key: for a forward packet (src = client), for a reply
 * (dst = client). */
struct nl_ct_key {
    const struct nl_addr *client_addr;
    uint16_t client_port;
    uint8_t proto;
    uint8_t reply;           /* 0: match vip side, 1: match backend side  */
    const struct nl_addr *other_addr;   /* vip (forward) or backend (reply) */
    uint16_t other_port;
};

int nl_ct_init(struct nl_ct *ct, uint32_t max_flows, const uint32_t *timeouts);
void nl_ct_fini(struct nl_ct *ct);
/* Unmaps a table nl_ct_store put in a file; the file stays (ctstore.c).
 * After nl_ct_fini, which leaves such a table alone. */
void nl_ct_store_unmap(struct nl_ct *ct);
/* Inline: every packet computes one, a few packets before its turn (lb.c). */
static inline uint32_t nl_ct_bucket(const struct nl_ct *ct, const struct nl_ct_key *k)
{
    uint32_t h = nl_addr_hash(k->client_addr, ct->seed);
    h = nl_mix32(h ^ ((uint32_t)k->client_port << 8) ^ k->proto);
    return h & (ct->n_buckets - 1);
}
/* Caller holds the stripe lock of the key's bucket for these three. */
struct nl_flow *nl_ct_find(struct nl_ct *ct, uint32_t bucket,
                           const struct nl_ct_key *k, uint32_t now);
struct nl_flow *nl_ct_insert(struct nl_ct *ct, uint32_t bucket);
/* Frees the flow *link points to (telling the table's owner first, see
 * on_free) and advances *link past it. */
void nl_ct_free(struct nl_ct *ct, uint32_t *link);
/* Frees flow f of `bucket`. */
void nl_ct_remove(struct nl_ct *ct, uint32_t bucket, struct nl_flow *f);
/* The link that points to flow index `idx` in `bucket`'s chain, or NULL:
 * proves, under the stripe lock, that the entry belongs to that bucket. */
uint32_t *nl_ct_link_of(struct nl_ct *ct, uint32_t bucket, uint32_t idx);
/* The table is full: frees expired entries of `bucket` and near the
 * eviction cursor, else the least recently active embryonic flow found
 * there.  The caller holds `bucket`'s stripe.  Returns 1 if room was made. */
int nl_ct_make_room(struct nl_ct *ct, uint32_t bucket, uint32_t now);
/* Frees expired flows in up to `max_buckets` buckets from the sweep cursor;
 * returns how many. */
uint32_t nl_ct_expire(struct nl_ct *ct, uint32_t now, uint32_t max_buckets);
/* The bucket of a flow's own chain. */
uint32_t nl_ct_flow_bucket(const struct nl_ct *ct, const struct nl_flow *f);
static inline pthread_spinlock_t *nl_ct_stripe(struct nl_ct *ct, uint32_t bucket)
{
    return &ct->stripes[bucket & (NL_CT_STRIPES - 1)];
}
/* How long a TCP flow in state s lives without a packet. */
static inline uint32_t nl_ct_tcp_timeout(const struct nl_ct *ct, uint8_t s)
{
    switch (s) {
    case NL_FS_ESTABLISHED: return ct->timeout_ms[NL_T_TCP_ESTABLISHED];
    case NL_FS_FIN: return ct->timeout_ms[NL_T_TCP_FIN];
    case NL_FS_CLOSE: return ct->timeout_ms[NL_T_TCP_CLOSE];
    default: return ct->timeout_ms[NL_T_TCP_SYN];
    }
}
/* Apply the TCP state machine for one packet; updates the expiry. */
void nl_ct_tcp_update(struct nl_ct *ct, struct nl_flow *f, int reply,
                      uint8_t tcp_flags, uint32_t now);
/* Open flows count as active (lc balances on them); FIN/RST ones as inactive. */
static inline int nl_flow_closing(uint8_t state)
{
    return state == NL_FS_FIN || state == NL_FS_CLOSE;
}

static inline int nl_time_before(uint32_t a, uint32_t b)
{
    return (int32_t)(a - b) < 0;
}

/* ---- published tables (lb.c, scheduler.c) ------------------------------ */
struct nl_service {
    struct nl_service_spec spec;
    struct nl_backend_spec *backends;
    uint32_t n_backends;
    uint16_t *table;
    uint32_t table_len;
    uint32_t rr_cursor;              /* atomically advanced by rr/wrr      */
    uint8_t filled;
};

struct nl_snapshot {
    uint32_t n_services;
    struct nl_service *services;
    uint32_t *index;                 /* open addressing: service no. + 1   */
    uint32_t index_mask;
    struct nl_service **by_id;       /* by service id: max_services of them */
    uint8_t *alive;                  /* NL_BE_ALIVE by backend id (max_backends) */
    struct nl_cluster_index *cluster;   /* backends of cluster services    */
};

/* The service of (vip, port, proto) in a snapshot's index, or NULL. */
static inline uint32_t nl_svc_hash(const struct nl_addr *vip, uint16_t port, uint8_t proto)
{
    uint64_t x64 = nl_addr_hi(vip) ^ nl_addr_lo(vip);
    uint32_t x = (uint32_t)x64 ^ (uint32_t)(x64 >> 32);
    uint32_t h = x * 0x9e3779b1u ^ ((uint32_t)port << 8 | proto) * 0x85ebca6bu;
    return h ^ (h >> 15);
}

static inline const struct nl_service *nl_find_service(const struct nl_snapshot *s,
                                                      const struct nl_addr *vip,
                                                      uint16_t port, uint8_t proto)
{
    if (!s)
        return NULL;
    for (uint32_t h = nl_svc_hash(vip, port, proto);; h++) {
        uint32_t slot = s->index[h & s->index_mask];
        if (slot == 0)
            return NULL;
        const struct nl_service *svc = &s->services[slot - 1];
        if (nl_addr_eq(&svc->spec.vip, vip) && svc->spec.port == port &&
            svc->spec.proto == proto)
            return svc;
    }
}

/* Counters private to one worker; summed when read, so no cache line is
 * shared between workers on the hot path. */
struct nl_worker_counters {
    uint64_t reasons[NL_R_MAX];
    uint64_t io_packets;
    uint64_t io_batches;
    struct nl_counters *services;    /* cfg.max_services, by id             */
    struct nl_counters *backends;    /* cfg.max_backends, by id             */
};

struct nl_io;
struct nl_failover;
struct nl_reclaim;

struct nl_lb {
    struct nl_config cfg;
    struct nl_ct ct;
    struct nl_snapshot *snap;        /* read with __atomic acquire         */
    struct nl_worker_counters *counters;   /* n_workers + 1 blocks          */
    struct nl_counters *counter_slots;     /* their services and backends   */
    int64_t *active;                 /* per backend id, atomic: open flows */
    int64_t *inactive;               /* per backend id, atomic: closing    */
    uint32_t sched_seed;
    struct nl_reclaim *reclaim;      /* snapshot.c: epochs, retired tables */
    struct nl_failover *fo;          /* failover.c                         */
    struct nl_io *io;                /* nfqueue.c: workers, sockets, eventfd */
    struct nl_fragtrack *ft;         /* fragtrack.c                        */
};

/* The counter block of `worker`; callers outside the workers share the last. */
static inline struct nl_worker_counters *nl_counters_of(struct nl_lb *lb, uint32_t worker)
{
    return &lb->counters[worker > lb->cfg.n_workers ? lb->cfg.n_workers : worker];
}

/* Per-packet traffic counters of the packet's service and backend. */
static inline void nl_count_packet(struct nl_worker_counters *wc, uint16_t sid, uint16_t bid,
                                   uint32_t bytes, int is_reply)
{
    struct nl_counters *s = &wc->services[sid], *b = &wc->backends[bid];
    if (is_reply) {
        s->packets_out++;
        s->bytes_out += bytes;
        b->packets_out++;
        b->bytes_out += bytes;
    } else {
        s->packets_in++;
        s->bytes_in += bytes;
        b->packets_in++;
        b->bytes_in += bytes;
    }
}

/* The same for a packet that passed a service outside lb.c (fragtrack.c). */
static inline void nl_count_traffic(struct nl_lb *lb, uint32_t worker, uint16_t sid,
                                    uint16_t bid, uint32_t bytes, int is_reply)
{
    nl_count_packet(nl_counters_of(lb, worker), sid, bid, bytes, is_reply);
}

/* Moves a flow between the active/inactive gauges of its backend. */
static inline void nl_flow_gauge(struct nl_lb *lb, const struct nl_flow *f, uint8_t state,
                                 int delta)
{
    int64_t *g = nl_flow_closing(state) ? lb->inactive : lb->active;
    __atomic_fetch_add(&g[f->backend_id], delta, __ATOMIC_RELAXED);
}

/* Choose a backend index within svc for a new flow, or -1. */
int nl_schedule(struct nl_lb *lb, const struct nl_service *svc,
                const struct nl_pkt *p);
/* The same, but never backend id `exclude` nor one that is not alive. */
int nl_schedule_other(struct nl_lb *lb, const struct nl_service *svc,
                      const struct nl_pkt *p, uint32_t exclude, const uint8_t *alive);

/* ---- several nodes, one VIP (cluster.c) --------------------------------- */
/* The hash seed of cluster services: the same on every node, every run. */
#define NL_CLUSTER_SEED 0x6e61746cu
static inline int nl_svc_cluster(const struct nl_service *svc)
{
    return svc && (svc->spec.flags & NL_SVC_CLUSTER);
}
/* Indexes the backends of cluster services by (address, port, protocol);
 * -1 if one belongs to two of them or memory ran out. */
int nl_cluster_index_build(struct nl_snapshot *s);
void nl_cluster_index_free(struct nl_snapshot *s);
/* A new flow of a cluster service: a packet other than a plain SYN starts
 * it ESTABLISHED (its SYN went through another node). */
void nl_cluster_flow_start(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p);
/* A reply that matched no flow: if it comes from a backend of a cluster
 * service, creates its flow and returns it with its stripe locked in *lock;
 * otherwise NULL, nothing locked, and *full set if it was one but the
 * conntrack is full (the reply must then not pass unchanged). */
struct nl_flow *nl_cluster_adopt_reply(struct nl_lb *lb, const struct nl_snapshot *snap,
                                       const struct nl_pkt *p, uint32_t now,
                                       pthread_spinlock_t **lock, int *full);
/* Before the TCP state machine: moves a handshake on when this node sees
 * only one direction of it (caller holds the stripe). */
void nl_cluster_track(struct nl_flow *f, int is_reply, uint8_t tcp_flags);

/* ---- failover (failover.c) --------------------------------------------- */
int nl_failover_init(struct nl_lb *lb);
void nl_failover_fini(struct nl_lb *lb);
/* Keeps a copy of a new flow's SYN (caller holds the flow's stripe). */
void nl_hold_syn(struct nl_lb *lb, struct nl_flow *f, const uint8_t *pkt, uint32_t len,
                 uint32_t now);
/* Moves a SYN_SENT flow to another backend and sends its held SYN there
 * (caller holds the stripe).  Returns 0, or -1 if it could not. */
int nl_resteer_held(struct nl_lb *lb, struct nl_flow *f, uint32_t now);
/* Moves a flow to another alive backend, for its current packet. */
int nl_move_flow(struct nl_lb *lb, const struct nl_snapshot *snap, struct nl_flow *f,
                 const struct nl_pkt *p);
void nl_emit(struct nl_lb *lb, uint32_t kind, uint32_t service_id, uint32_t backend_id,
             const struct nl_addr *client_addr, uint64_t now);
uint32_t nl_syn_deadline_next(struct nl_lb *lb, uint32_t now);
void nl_count_failover(struct nl_lb *lb, int which, uint64_t n);
/* Queues a packet natlb sends itself; 0 if the outbox is full. */
uint32_t nl_outbox_push(struct nl_lb *lb, const uint8_t *pkt, uint32_t len);
/* A packet of a flow reset while probing (NL_FL_PROBE_*): sends the RSTs its
 * sequence numbers make exact.  Caller holds the flow's stripe. */
void nl_reset_probed(struct nl_lb *lb, struct nl_flow *f, const struct nl_pkt *p, int reply);

/* A flow marked fast from its first packet (NL_FL_FAST) that natlb moves:
 * queues its kernel entries to be forgotten and clears the flag (caller
 * holds its stripe; nothing for another flow). */
void nl_fp_forget_flow(struct nl_lb *lb, struct nl_flow *f);
/* 1 if keys or a sync request were queued since the last call (then the
 * I/O layer wakes the fast path's observer), else 0. */
int nl_fp_unsignalled(struct nl_lb *lb);
/* Whether the kernel places (or has placed) new flows' first packets for
 * this lb (lb.fastpath_decide on; a pause leaves it set): a published
 * backend's answer that finds no flow may then belong to a flow natlb
 * hears of late. */
void nl_fp_deciding(struct nl_lb *lb, int on);
int nl_fp_is_deciding(struct nl_lb *lb);
/* Whether the kernel placed the flow whose backend side is this tuple (the
 * packet as the backend sent it: its entry in the fast path's flows map,
 * alive or dead): 1 yes, or not known (an error, no fast path), 0 no.
 * The fast path (tcfast.c) gives the core its map, the way to ask it and
 * the way to let it go (with the core, or when another replaces it). */
typedef int (*nl_placed_fn)(int fd, const struct nl_addr *saddr, const struct nl_addr *daddr,
                            uint16_t sport, uint16_t dport, uint8_t proto);
typedef void (*nl_placed_release_fn)(int fd);
void nl_fp_placed_source(struct nl_lb *lb, nl_placed_fn fn, nl_placed_release_fn release,
                         int fd);
int nl_fp_placed(struct nl_lb *lb, const struct nl_addr *saddr, const struct nl_addr *daddr,
                 uint16_t sport, uint16_t dport, uint8_t proto);
/* A published backend's answer (or an ICMP error about what went to one)
 * that finds no flow while the kernel decides: kept (1) to be tried again
 * by nl_deferred_retry once the observer has applied what the kernel
 * placed; 0 if not (no observer, no room, too long: the caller drops it).
 * Caller: a worker, or the observer in its epoch. */
#define NL_PKT_DEFERRED (1u << 30)   /* pkt_flags: tried again, never kept */
int nl_defer_packet(struct nl_lb *lb, const uint8_t *pkt, uint32_t len, uint32_t pkt_flags);
/* A first packet the kernel placed that natlb refused (nl_observed_new):
 * noted for 3 s (64 at most), since it reached its backend all the same.
 * Its backend's answer, which finds no flow and which the kernel no longer
 * has an entry for, is then held and dropped, never sent on with the
 * backend's address; a SYN-ACK gets the client's RST (late_synack).
 * _find: whether one from client:port (proto) was noted, and with ack
 * (TCP) whether its SYN is the one a SYN-ACK acking *ack answers. */
void nl_refused_note(struct nl_lb *lb, const struct nl_addr *client, uint16_t port,
                     uint8_t proto, uint32_t isn, uint32_t now_ms);
int nl_refused_find(struct nl_lb *lb, const struct nl_addr *client, uint16_t port,
                    uint8_t proto, const uint32_t *ack, uint32_t now_ms);
/* One kept packet into buf (its length; 0: none). */
uint32_t nl_deferred_take(struct nl_lb *lb, uint8_t *buf, uint32_t cap, uint32_t *pkt_flags);
/* The kept packets, each through the per-packet path again (lb.c). */
uint32_t nl_deferred_retry(struct nl_lb *lb, uint64_t now_ms);

/* ---- IP fragments (fragtrack.c) ---------------------------------------- */
/* One datagram's identity, the same in all its fragments: IPv4 (16-bit
 * ids) and IPv6 (32-bit ids) share the table. */
struct nl_frag_key {
    struct nl_addr saddr, daddr;
    uint32_t id;                     /* IP id (host order)                 */
    uint8_t family;                  /* 4 or 6                             */
    uint8_t proto;                   /* IPv4: protocol; IPv6: the fragment
                                        header's next header               */
    uint8_t _pad[2];
};

/* The verdict a datagram's first fragment got, applied to the others. */
struct nl_frag_verdict {
    int verdict;                     /* NL_VERDICT_*                       */
    uint32_t mark;                   /* NL_VERDICT_MARK                    */
    struct nl_addr addr;             /* REWRITE: the address to write      */
    uint8_t dst;                     /* write the destination (forward)    */
    uint16_t service_id, backend_id; /* counters (when rewritten)          */
};

struct nl_fragtrack;
int nl_frag_init(struct nl_lb *lb);
void nl_frag_fini(struct nl_lb *lb);
/* The first fragment of a datagram got verdict `v`: remember it, and
 * release any fragments held for it. */
void nl_frag_first(struct nl_lb *lb, const struct nl_frag_key *k,
                   const struct nl_frag_verdict *v, uint32_t payload_len, uint64_t now);
/* A later fragment (offset > 0) at pkt, as nl_parse found it (p: family,
 * addresses, frag_*): gives it its first fragment's verdict and applies it
 * (copy: rewrites the address in place; mark_mode: *mark), or holds it
 * (NL_VERDICT_HOLD), or drops it. */
int nl_frag_follow(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                   const struct nl_pkt *p, int mark_mode, uint64_t now, uint32_t packet_id,
                   uint32_t *mark);

/* ---- snapshots (snapshot.c) -------------------------------------------- */
int nl_snapshots_init(struct nl_lb *lb);
/* Frees the published snapshot and every retired one. */
void nl_snapshots_fini(struct nl_lb *lb);
/* A worker brackets each batch with these two (see snapshot.c). */
void nl_worker_enter(struct nl_lb *lb, uint32_t worker);
void nl_worker_quiescent(struct nl_lb *lb, uint32_t worker);
/* Callers outside the workers bracket each call with these: they take the
 * extra epoch slot (one caller at a time).  balancer.c then signals the
 * events the call queued (nl_event_signal). */
void nl_ext_enter(struct nl_lb *lb);
void nl_ext_exit(struct nl_lb *lb);
/* The per-packet path for worker threads, inside their epoch (no locking
 * of their own); mark NULL: copy mode. */
/* nl_observe's work, for a caller already inside an epoch (lb.c). */
int nl_observed(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                uint32_t pkt_flags, uint64_t now_ms);
int nl_observed_new(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                    uint32_t pkt_flags, uint32_t backend_id, uint32_t sent_csum,
                    uint64_t placed_ms, uint64_t now_ms);
int nl_packet(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark);
/* One packet of a batch for nl_packets: what nl_packet takes, and what it
 * returned (verdict) and set (mark). */
struct nl_batch_pkt {
    uint8_t *pkt;
    uint32_t len;
    uint32_t pkt_flags;
    uint32_t packet_id;
    uint32_t mark;
    int verdict;
};
/* nl_packet over n packets in turn (mark_mode: each gets its mark), with
 * the flow table's memory fetched a few packets ahead. */
void nl_packets(struct nl_lb *lb, uint32_t worker, struct nl_batch_pkt *b, uint32_t n,
                uint64_t now_ms, int mark_mode);
/* nl_failover_tick for worker threads, inside their epoch. */
void nl_failover_due(struct nl_lb *lb, uint64_t now_ms);
/* Drops f's held SYN, if it still has one (caller holds f's stripe). */
void nl_drop_held(struct nl_lb *lb, struct nl_flow *f);
/* 1 if events were pushed since the last call (then the I/O layer signals
 * them), else 0. */
int nl_events_unsignalled(struct nl_lb *lb);
/* Takes up to `max` events, oldest first; *left says whether more wait. */
uint32_t nl_events_take(struct nl_lb *lb, struct nl_event *out, uint32_t max, int *left);
/* The reset of nl_reset_backend over buckets [first, first + n): queues
 * the RSTs, frees the flows, returns how many. */
uint32_t nl_reset_buckets(struct nl_lb *lb, uint32_t backend_id, uint32_t first, uint32_t n);

/* ---- I/O (nfqueue.c) ----------------------------------------------------- */
/* The eventfd, and the raw socket and workers once started. */
int nl_io_init(struct nl_lb *lb);
void nl_io_fini(struct nl_lb *lb);
/* Wakes the control plane if events were pushed since the last call.  Called
 * outside every lock: a syscall must not run under a spinlock. */
void nl_event_signal(struct nl_lb *lb);
/* Sends what is in the outbox now, if the workers' raw socket is open. */
uint32_t nl_io_flush(struct nl_lb *lb);
/* 1 if workers run and read their queues (not paused for a handover). */
int nl_io_reading(struct nl_lb *lb);
/* Readable when the fast path's observer has work from the core (keys to
 * forget, a sync request); it reads it to clear it (tcfast.c). */
int nl_fp_wake_fd(struct nl_lb *lb);

#endif
