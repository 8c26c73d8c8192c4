/*
 * fastpath.h -- the maps the tc fast path (fastpath.bpf.c) shares with its
 * loader (csrc/tcfast.c).  The one place their layout is written; both
 * sides include it.  Addresses and ports in NETWORK order, as in the packet.
 */
#ifndef NATLB_BPF_FASTPATH_H
#define NATLB_BPF_FASTPATH_H

#include <linux/types.h>

/* Direction of a carried packet: the counter slot is backend id * 2 + it. */
#define NL_FP_IN 0                 /* client -> VIP, rewritten to the backend */
#define NL_FP_OUT 1                /* backend -> client, rewritten to the VIP */

/* The mark natlb's C core gives a packet to install (natlb.h NL_MARK_*):
 * NL_MARK_FORWARD | NL_MARK_FAST | backend id. */
#define NL_FP_MARK_BASE 0x6e000000
/* A cluster service's reply natlb marked fast (natlb.h): NL_MARK_REPLY |
 * NL_MARK_FAST | backend id.  Its node may never see the client's side. */
#define NL_FP_MARK_REPLY 0x6e100000
#define NL_FP_MARK_KIND 0xff700000 /* the bits that say "forward mark" (all
                                      above the id but the fast bit)         */
#define NL_FP_MARK_FAST 0x00800000
#define NL_FP_MARK_ID 0x000fffff

/* Addresses of either family are held as natlb's C core holds them (natlb.h
 * struct nl_addr): 16 bytes in network order, an IPv4 address mapped
 * (::ffff:a.b.c.d), so one map and one program serve both families. */

/* backends map (array, index = backend id): what natlb published. */
struct nl_fp_backend {
    __be32 vip[4];                 /* the service's VIP                       */
    __be32 addr[4];                /* the backend's address (same family)     */
    __be16 vport;                  /* the service's port                      */
    __be16 port;                   /* the backend's port                      */
    __u8 proto;                    /* IPPROTO_TCP or IPPROTO_UDP; 0: no backend */
    __u8 family;                   /* 4 or 6                                  */
    __u8 pad[2];                   /* zero                                    */
};

/* flows map key: a packet's 5-tuple as it arrives on ingress. */
struct nl_fp_key {
    __be32 saddr[4];               /* source address                          */
    __be32 daddr[4];               /* destination address                     */
    __be16 sport;                  /* source port                             */
    __be16 dport;                  /* destination port                        */
    __u8 proto;                    /* IPPROTO_TCP or IPPROTO_UDP              */
    __u8 family;                   /* 4 or 6: an IPv6 packet quoting mapped
                                      addresses never finds an IPv4 flow     */
    __u8 pad[2];                   /* zero: hashed with the rest              */
};

/* nl_fp_flow.flags: what natlb has not seen yet of a flow it placed with
 * its first packet (the client's SYN, a UDP flow's first datagram). */
#define NL_FP_F_HANDSHAKE 1        /* TCP, learned from the SYN: OUT carries
                                      only a SYN-ACK answering it, IN only
                                      once that was carried; each of the two
                                      with a record (natlb's SYN_RECV, then
                                      ESTABLISHED), which clears the flag    */
#define NL_FP_F_UNREPLIED 2        /* UDP, OUT: the backend's first answer
                                      goes with a record (natlb's REPLIED)  */
#define NL_FP_F_CLOSING 4          /* a FIN was carried: natlb's flow is
                                      closing, and a client's SYN on the
                                      tuple is a new connection (decide)    */

/* flows map value: how to carry a packet with that key. */
struct nl_fp_flow {
    __be32 addr[4];                /* new daddr (IN) or new saddr (OUT)       */
    __be16 port;                   /* new dport (IN) or new sport (OUT)       */
    __u8 dir;                      /* NL_FP_IN or NL_FP_OUT                   */
    __u8 flags;                    /* NL_FP_F_*                               */
    __u32 backend_id;              /* counter slot, and what a flush is about */
    __u32 out_ifindex;             /* bpf_redirect_neigh to this device       */
    __u32 in_ifindex;              /* only packets arriving here are carried
                                      (the anti-spoof check of `replies`)     */
    __u64 deadline_ns;             /* bpf_ktime_get_ns() after which the entry
                                      is dead: natlb renews its flow first    */
    __u64 synack_by_ns;            /* OUT in handshake: a SYN-ACK after this is
                                      natlb's (its held-SYN timer may move the
                                      flow: late_synack drops it)             */
    __be32 synack_ack;             /* OUT in handshake: the ack a SYN-ACK must
                                      carry (the SYN's seq + 1)               */
    __u32 pad;                     /* zero                                    */
};

/* counters map (per-CPU array, index = backend id * 2 + direction). */
struct nl_fp_count {
    __u64 packets;                 /* packets carried                         */
    __u64 bytes;                   /* their length as they arrived (skb->len) */
};

/* config map (array, one entry), set by the loader. */
struct nl_fp_config {
    __u64 tcp_lifetime_ns;         /* a learned TCP entry's fixed lifetime    */
    __u64 udp_lifetime_ns;         /* the same for UDP                        */
    __u64 tcp_closing_ns;          /* natlb's timeout after a FIN (tcp_fin): a
                                      carried FIN cuts both entries to it     */
    __u32 observer_polling;        /* 1: natlb's observer reads the ring on a
                                      timer, no wakeup needed per record      */
    __u32 pad;                     /* zero                                    */
    __u64 syn_lifetime_ns;         /* entries learned from a SYN, until the
                                      handshake's last ACK is carried (then
                                      tcp_lifetime_ns)                        */
    __u64 synack_window_ns;        /* a SYN-ACK is carried only this long
                                      after its SYN (before natlb's held-SYN
                                      timer fires)                            */
    __u32 decide;                  /* 1: a new flow's first packet to a
                                      service in the svcs map is placed here
                                      (0: queued to natlb, as in a handover) */
    __u32 sched_seed;              /* natlb's lb->sched_seed (sh, maglev)     */
    __u64 heartbeat_ns;            /* CLOCK_MONOTONIC (bpf_ktime_get_ns) of the
                                      observer's last round; 0: none yet      */
    __u64 stale_ns;                /* decide queues first packets instead once
                                      the heartbeat is this old: no natlb
                                      would hear of them (killed, stuck)      */
    __u32 observer_alive;          /* 1: decide only while the observer's
                                      socket is in the observer map (closed
                                      with natlb's process, SIGKILL too)      */
    __u32 pad2;                    /* zero                                    */
};

/* tables map value: two slots (an array's values are 8-byte aligned: the
 * loader's mapping of it is then one dense array of backend ids). */
struct nl_fp_slots {
    __u32 id[2];                   /* backend ids                             */
};

/* svcs map key: a service natlb lets the kernel place new flows of. */
struct nl_fp_svc_key {
    __be32 vip[4];                 /* as nl_fp_key's addresses                */
    __be16 port;
    __u8 proto;
    __u8 family;                   /* 4 or 6                                  */
};

/* svcs map value: where its scheduler table lies in the tables map.  A
 * publish writes a service's new table where no entry points, then swaps
 * this value (one map update): the program never reads half a table. */
struct nl_fp_svc {
    __u32 table_off;               /* first slot in the tables map            */
    __u32 table_len;               /* > 0                                     */
    __u32 cursor;                  /* rr, wrr: advanced atomically            */
    __u16 service_id;
    __u8 scheduler;                /* NL_SCHED_RR, _WRR, _SH, _MAGLEV         */
    __u8 pad;
};

/* stats map (per-CPU array): what the programs did that nothing else counts. */
#define NL_FP_STAT_RING_FULL 0     /* packets queued (not carried) because the
                                      ring had no room for their record       */
#define NL_FP_STAT_DECIDED 1       /* first packets placed by the kernel      */
#define NL_FP_STAT_DECIDE_RING 2   /* ... queued instead: no room in the ring */
#define NL_FP_STAT_DECIDE_MAP 3    /* ... the flows map refused an entry, or
                                      the tuple was being placed meanwhile    */
#define NL_FP_STAT_DECIDE_ROUTE 4  /* ... no route to the backend (fib), a
                                      martian IPv4 source, or
                                      the packet too big for its device       */
#define NL_FP_STAT_DECIDE_PACKET 5 /* ... TTL <= 1, a SYN longer than a record,
                                      a table slot naming another service's
                                      backend (a publish in between)          */
#define NL_FP_STAT_DECIDE_STALE 6  /* ... the observer's heartbeat is stale
                                      (natlb killed or stuck)                 */
#define NL_FP_STAT_MAX 7

/* The schedulers the kernel decides (natlb.h NL_SCHED_*). */
#define NL_FP_SCHED_RR 0
#define NL_FP_SCHED_WRR 1
#define NL_FP_SCHED_SH 3
#define NL_FP_SCHED_MAGLEV 4

/* events ring buffer: one record per packet carried that moves natlb's
 * flow (FIN, RST, the handshake's SYN-ACK and last ACK, a UDP flow's first
 * answer), so natlb applies it to its own flow (csrc/tcfast.c's observer). */
#define NL_FP_HEAD 128             /* IP + TCP header (<= 80 over IPv4, <= 100
                                      over IPv6) and some data               */
#define NL_FP_RING_BYTES (256 * 1024)
struct nl_fp_event {
    __u32 ifindex;                 /* where it arrived                        */
    __u16 len;                     /* bytes of head[] that hold the packet    */
    __u16 tot_len;                 /* the IP packet's length (len < tot_len:
                                      head[] is only its head; at most 65535) */
    __u8 head[NL_FP_HEAD];         /* the IP packet as it arrived, before the
                                      rewrite                                 */
    __u32 new_backend;             /* NL_FP_CARRIED; or a new flow's first
                                      packet the kernel placed on this
                                      backend (its whole head for TCP: the
                                      SYN natlb holds for re-steering)        */
    __u16 sent_csum;               /* a placed packet: its L4 checksum field as
                                      sent on (rewritten): natlb tells a
                                      CHECKSUM_PARTIAL packet's field from a
                                      wrong sum (lb.c nl_observed_new)        */
    __u16 pad;                     /* zero                                    */
    __u64 placed_ns;               /* a placed packet: when (bpf_ktime_get_ns,
                                      CLOCK_MONOTONIC); 0 for others          */
};
#define NL_FP_CARRIED 0xffffffffu

/* The key of the other direction of a flow whose entry f was found under
 * k: for the programs and for the observer that forgets a flow. */
static inline __attribute__((always_inline)) void
nl_fp_other_side(const struct nl_fp_key *k, const struct nl_fp_flow *f, struct nl_fp_key *r)
{
    *r = (struct nl_fp_key){.proto = k->proto, .family = k->family};
    if (f->dir == NL_FP_IN) {
        __builtin_memcpy(r->saddr, f->addr, sizeof r->saddr);
        __builtin_memcpy(r->daddr, k->saddr, sizeof r->daddr);
        r->sport = f->port;
        r->dport = k->sport;
    } else {
        __builtin_memcpy(r->saddr, k->daddr, sizeof r->saddr);
        __builtin_memcpy(r->daddr, f->addr, sizeof r->daddr);
        r->sport = k->dport;
        r->dport = f->port;
    }
}

#endif
