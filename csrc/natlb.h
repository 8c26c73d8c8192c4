/*
 * natlb.h -- the whole C/Python boundary of natlb.
 *
 * This file is read twice: by the C compiler (through internal.h, which
 * includes <stdint.h> first) and by natlb/_build.py as the cffi cdef.  It
 * must therefore stay "cdef-clean": integer #defines, plain structs and
 * prototypes only, no #include, no #if, no macros with arguments.
 *
 * Byte order: every address and port in these structs is in NETWORK order,
 * exactly as it sits in the packet, so the data path never swaps bytes.
 *
 * Addresses (struct nl_addr) are 128 bits for both families: an IPv4
 * address is held IPv4-mapped (::ffff:a.b.c.d, RFC 4291 2.5.5.2), so the
 * family is the address's own.  Mapped addresses never appear on the wire
 * (an IPv6 packet carrying one is dropped as malformed), so an IPv4 and an
 * IPv6 flow can never be taken for each other.
 *
 * Threading: nl_process() and the NFQUEUE workers run without the GIL and
 * may run concurrently.  The control plane publishes a whole new snapshot
 * (nl_publish) instead of editing the live one, so a packet sees either the
 * old or the new table, never a half-written one.
 */

/* ---- limits ------------------------------------------------------------ */
/* Ceilings of nl_config.max_services and max_backends: a flow stores its ids
 * in 16 bits, and the marks carry them below bit 20 (NL_MARK_*). */
#define NL_MAX_SERVICES 65536    /* service ids are 0..max_services-1       */
#define NL_MAX_BACKENDS 65536    /* backend ids are 0..max_backends-1       */
#define NL_MAX_WORKERS 16

/* ---- verdicts returned by nl_process ---------------------------------- */
#define NL_VERDICT_ACCEPT 0      /* let the packet through unchanged       */
#define NL_VERDICT_REWRITE 1     /* packet bytes were rewritten in place   */
#define NL_VERDICT_DROP 2
#define NL_VERDICT_MARK 3        /* accept with *mark: nft rewrites it      */
#define NL_VERDICT_HOLD 4        /* kept for later: an IP fragment that came
                                    before its first; its verdict is given
                                    by nl_frag_take (send none now)        */

/* packet_id when the caller cannot give a verdict later (no holding). */
#define NL_NO_PACKET_ID 4294967295

/* ---- per-packet flags given to nl_process (from NFQA_SKB_INFO) -------- */
#define NL_PKT_CSUM_PARTIAL 1    /* L4 checksum field holds only the
                                    pseudo-header sum (CHECKSUM_PARTIAL)  */
#define NL_PKT_GSO 2             /* a GSO super-packet, segmented later   */
#define NL_PKT_HEAD_ONLY 4       /* the buffer holds only the packet's head */
#define NL_PKT_CSUM_VERIFIED 8   /* the kernel verified the L4 checksum or made
                                    the packet itself (NFQA_SKB_INFO without
                                    CSUM_NOTVERIFIED): not checked again   */

/* ---- marks that ask the nftables rewrite chain to rewrite a packet ----- */
#define NL_MARK_FORWARD 1845493760   /* 0x6e000000 | backend id: dst = backend */
#define NL_MARK_REPLY 1846542336     /* 0x6e100000 | service id: src = VIP     */
/* Or'ed into a forward mark (config fastpath) when the kernel may carry the
 * packet's flow (lb.c: a new flow's first packet, an established TCP flow's
 * packet that changes no state, a UDP flow's once its backend answered), in
 * either family: the tc fast path then installs the flow.  A cluster
 * service's reply that may be carried alike is marked NL_MARK_REPLY |
 * NL_MARK_FAST | backend id (not service id): the tc program installs the
 * flow from it, the rewrite chain maps it to the VIP. */
#define NL_MARK_FAST 8388608         /* 0x00800000                             */

/* ---- schedulers -------------------------------------------------------- */
#define NL_SCHED_RR 0            /* table = eligible backends, cycled      */
#define NL_SCHED_WRR 1           /* table = weighted sequence, cycled      */
#define NL_SCHED_LC 2            /* no table: fewest active flows / weight */
#define NL_SCHED_SH 3            /* table indexed by hash(client address)  */
#define NL_SCHED_MAGLEV 4        /* maglev lookup table, hash(client tuple)*/

/* ---- service flags ----------------------------------------------------- */
#define NL_SVC_CLUSTER 1         /* several nodes carry it (see cluster.c):
                                    mid-flow packets and replies that match
                                    no flow are adopted; the hash seed is
                                    fixed, so every node picks alike      */

/* ---- backend flags ----------------------------------------------------- */
#define NL_BE_ELIGIBLE 1         /* may be chosen for new flows (lc)       */
#define NL_BE_ALIVE 2            /* healthy: its flows stay on it; flows of
                                    a backend without it are re-steered   */

/* ---- conntrack timeouts (index into nl_config.timeout_ms) ------------- */
#define NL_T_TCP_SYN 0           /* SYN seen, handshake not complete       */
#define NL_T_TCP_ESTABLISHED 1
#define NL_T_TCP_FIN 2           /* FIN seen in either direction           */
#define NL_T_TCP_CLOSE 3         /* RST seen                               */
#define NL_T_UDP 4
#define NL_T_MAX 5

/* ---- why a packet was dropped or passed (global counters) ------------- */
#define NL_R_MALFORMED 0         /* bad IPv4/IPv6/TCP/UDP header (IPv6: also
                                    too many extension headers, a mapped
                                    address, a jumbogram): dropped         */
#define NL_R_FRAGMENT 1          /* IP fragment dropped (see NL_FR_*)      */
#define NL_R_NO_FLOW 2           /* TCP non-SYN with no flow: dropped      */
#define NL_R_NO_BACKEND 3        /* no eligible backend: dropped           */
#define NL_R_TABLE_FULL 4        /* conntrack full, new flow dropped       */
#define NL_R_NOT_OURS 5          /* matched no service or flow: passed     */
#define NL_R_TRUNCATED 6         /* NFQUEUE gave a partial copy: dropped   */
#define NL_R_UNSUPPORTED 7       /* not TCP/UDP (nor an ICMP error natlb
                                    reads), or IPv6 with a routing header
                                    that has segments left, AH or ESP: passed */
#define NL_R_VERDICT_ERROR 8     /* verdict could not be sent              */
#define NL_R_BAD_CHECKSUM 9      /* IP, TCP, UDP or ICMP checksum wrong, or an
                                    IPv6 UDP datagram without one: dropped */
#define NL_R_UNMATCHED 10        /* RST or ICMP error about a flow that does not
                                    match what natlb sent, or that could not
                                    be verified: dropped, not believed     */
#define NL_R_ANSWER_DROPPED 11   /* a backend's answer (or an ICMP error) to a
                                    flow the kernel placed, before natlb held
                                    that flow: no room to keep it for the
                                    observer's next round, or still no flow
                                    after it: dropped                       */
#define NL_R_MAX 12

/* One IPv4 (mapped) or IPv6 address. */
struct nl_addr {
    uint32_t w[4];                  /* the 16 address bytes as 4 words in
                                       network order; IPv4: 0, 0,
                                       htonl(0xffff), the IPv4 address   */
};

/* Sizes the conntrack and sets its timeouts; fixed for the lb's lifetime. */
struct nl_config {
    uint32_t max_flows;             /* hard bound on conntrack entries     */
    uint32_t n_workers;             /* NFQUEUE worker threads (<= 16)      */
    uint32_t timeout_ms[5];         /* indexed by NL_T_*                   */
    uint32_t poll_us;               /* busy-poll this long before sleeping */
    uint32_t syn_timeout_ms;        /* no SYN-ACK this long: re-steer (0 off) */
    uint32_t resteer_tries;         /* backends a SYN may try in all        */
    uint32_t max_fragments;         /* fragmented datagrams tracked at once
                                       (0: fragments are dropped)          */
    uint32_t fragment_timeout_ms;   /* a datagram's fragments must all pass
                                       within this; held ones are dropped  */
    uint32_t fastpath;              /* 1: mark flows NL_MARK_FAST (see there) */
    uint32_t max_services;          /* id bound, 1..NL_MAX_SERVICES: sizes the
                                       counters (per worker) and id tables */
    uint32_t max_backends;          /* id bound, 1..NL_MAX_BACKENDS         */
};

/* One real server of a service, as published by the control plane. */
struct nl_backend_spec {
    struct nl_addr addr;            /* same family as its service's VIP    */
    uint16_t port;                  /* network order                       */
    uint16_t weight;                /* relative weight, used by lc         */
    uint32_t id;                    /* stable counter slot < max_backends  */
    uint32_t flags;                 /* NL_BE_*                             */
};

/* One virtual service (VIP, port, protocol). */
struct nl_service_spec {
    struct nl_addr vip;             /* IPv4 (mapped) or IPv6               */
    uint16_t port;                  /* network order                       */
    uint8_t proto;                  /* 6 = TCP, 17 = UDP                   */
    uint8_t scheduler;              /* NL_SCHED_*                          */
    uint32_t id;                    /* stable counter slot < max_services  */
    uint32_t flags;                 /* NL_SVC_*                            */
};

/* Traffic counters of one service or one backend, summed over workers. */
struct nl_counters {
    uint64_t packets_in;            /* client -> server direction          */
    uint64_t bytes_in;
    uint64_t packets_out;           /* server -> client direction          */
    uint64_t bytes_out;
    uint64_t new_flows;
    int64_t active_flows;           /* backends: flows not yet closing     */
    int64_t inactive_flows;         /* backends: FIN/RST seen, timing out  */
};

struct nl_lb;
struct nl_snapshot;

/* ---- lifetime ---------------------------------------------------------- */
/* NULL on bad config (a zero or over 2^30 timeout, syn_timeout_ms over
 * 2^30, resteer_tries not 1..255, ...) or out of memory. */
struct nl_lb *nl_create(const struct nl_config *cfg);
/* Stops the workers if running, then frees everything. */
void nl_destroy(struct nl_lb *lb);

/* ---- publishing backend tables ---------------------------------------- */
struct nl_snapshot *nl_snapshot_new(uint32_t n_services);
/* Fills service slot `index`.  `table` holds indices into `backends`
 * (ignored by lc).  Copies everything.  0, or -1 on bad arguments. */
int nl_snapshot_set_service(struct nl_snapshot *snap, uint32_t index,
                            const struct nl_service_spec *svc,
                            const struct nl_backend_spec *backends,
                            uint32_t n_backends,
                            const uint16_t *table, uint32_t table_len);
/* Frees a snapshot that was never published. */
void nl_snapshot_free(struct nl_snapshot *snap);
/* Swaps the snapshot in and takes ownership; the previous one is freed
 * once every running worker has finished the batch that might use it.
 * 0, or -1 (snapshot incomplete, duplicate service, or an id at or over the
 * lb's max_services/max_backends; not taken). */
int nl_publish(struct nl_lb *lb, struct nl_snapshot *snap);

/* ---- the sans-IO data path -------------------------------------------- */
/* Processes one IPv4 or IPv6 packet in place.  `worker` picks the counter block
 * (0..n_workers; n_workers is reserved for callers outside the workers).
 * `now_ms` is a monotonic clock in milliseconds.  Returns NL_VERDICT_*.
 * Safe to call from any thread while the workers run: calls from outside
 * the workers are serialized and hold the snapshot they read. */
int nl_process(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
               uint32_t pkt_flags, uint64_t now_ms);

/* nl_process for a packet the caller can give a verdict for later:
 * `packet_id` names it (the NFQUEUE packet id).  May return
 * NL_VERDICT_HOLD: send no verdict now; nl_frag_take gives it later. */
int nl_process_id(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                  uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id);

/* Like nl_process, but decides without rewriting: where nl_process would
 * rewrite, it returns NL_VERDICT_MARK with *mark set (NL_MARK_FORWARD |
 * backend id, or NL_MARK_REPLY | service id) and leaves the bytes alone.
 * The packet may be just its head (NL_PKT_HEAD_ONLY). */
int nl_decide(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
              uint32_t pkt_flags, uint64_t now_ms, uint32_t *mark);
/* nl_decide with a packet id, as nl_process_id. */
int nl_decide_id(struct nl_lb *lb, uint32_t worker, uint8_t *pkt, uint32_t len,
                 uint32_t pkt_flags, uint64_t now_ms, uint32_t packet_id, uint32_t *mark);

uint32_t nl_ct_count(struct nl_lb *lb);
/* Conntrack counters (out[NL_C_MAX]).  A new flow that finds the table full
 * first frees expired entries near it, then evicts the least recently
 * active embryonic flow it finds (TCP before the handshake's last ACK, UDP
 * with no reply); established flows are never evicted. */
#define NL_C_RECLAIMED 0         /* expired flows freed early for a new one   */
#define NL_C_EVICTED_TCP 1       /* embryonic TCP flows evicted: table full   */
#define NL_C_EVICTED_UDP 2       /* unanswered UDP flows evicted: table full  */
#define NL_C_MAX 3
void nl_read_conntrack(struct nl_lb *lb, uint64_t *out);
/* Bytes of one conntrack entry and of the whole preallocated table. */
uint32_t nl_ct_entry_size(void);
uint64_t nl_ct_memory(struct nl_lb *lb);

/* ---- counters ---------------------------------------------------------- */
/* Fill out[0..n) for ids 0..n-1. */
void nl_read_services(struct nl_lb *lb, struct nl_counters *out, uint32_t n);
void nl_read_backends(struct nl_lb *lb, struct nl_counters *out, uint32_t n);
/* out[NL_R_MAX]: packets dropped or passed, by reason. */
void nl_read_reasons(struct nl_lb *lb, uint64_t *out);
/* Adds c's traffic counters (not the gauges) to service `id`, or backend
 * `id` if `backend`: a successor continues its predecessor's counts. */
void nl_seed_counters(struct nl_lb *lb, uint32_t backend, uint32_t id,
                      const struct nl_counters *c);
/* Packets seen by the NFQUEUE workers and netlink receive batches. */
void nl_read_io(struct nl_lb *lb, uint64_t *packets, uint64_t *batches);

/* ---- failover: events, re-steering, packets natlb sends itself ----------- */
#define NL_EV_SYN_RST 1          /* a backend answered a SYN with RST       */
#define NL_EV_SYN_TIMEOUT 2      /* no SYN-ACK within syn_timeout_ms        */
#define NL_EV_ICMP 3             /* ICMP(v6) unreachable about a flow's packet */

/* A passive failure seen by the data path, for the control plane to judge. */
struct nl_event {
    uint32_t kind;                  /* NL_EV_*                             */
    uint32_t service_id;
    uint32_t backend_id;
    struct nl_addr client_addr;     /* the flow's client (either family), so
                                       the control plane can count distinct
                                       clients before it believes a failure */
    uint64_t time_ms;               /* the now_ms of the packet or tick    */
};

#define NL_F_RESTEERED 0         /* flows moved to another backend          */
#define NL_F_SYN_RESENT 1        /* held SYNs natlb sent again itself       */
#define NL_F_RESETS_SENT 2       /* RSTs sent for flows of a dead backend   */
#define NL_F_OUTBOX_FULL 3       /* packets natlb could not queue to send   */
#define NL_F_EVENTS_LOST 4       /* oldest events dropped: ring full         */
#define NL_F_SEND_ERRORS 5       /* raw socket send failures                */
#define NL_F_PMTU_RELAYED 6      /* "fragmentation needed" / ICMPv6 "packet too
                                    big" passed to backends                */
#define NL_F_HELD_LOST 7         /* held SYNs overwritten before their deadline:
                                    ring full, those flows are not re-steered */
#define NL_F_ADOPTED 8           /* cluster: flows taken up mid-way (no SYN) */
#define NL_F_REPLY_ADOPTED 9     /* cluster: replies mapped back statelessly */
#define NL_F_LATE_SYNACKS 10     /* SYN-ACKs from a backend a re-steered SYN had
                                    left: dropped, that backend sent an RST */
#define NL_F_ANSWERS_HELD 11     /* such answers kept for the observer's next
                                    round (then rewritten, or dropped as
                                    answer_dropped)                        */
#define NL_F_MAX 12

/* Readable when events are waiting (an eventfd); never blocks the workers.
 * The ring keeps the newest events: when full, the oldest is dropped and
 * counted (NL_F_EVENTS_LOST). */
int nl_event_fd(struct nl_lb *lb);
/* Takes up to `max` events, oldest first; returns how many.  If more are
 * left, the eventfd stays readable. */
uint32_t nl_read_events(struct nl_lb *lb, struct nl_event *out, uint32_t max);
/* Sends an RST to the client (and the backend) of every TCP flow on the
 * backend and forgets its flows; returns the number of flows reset.  The
 * RSTs wait in an outbox the workers send through their raw socket. */
uint32_t nl_reset_backend(struct nl_lb *lb, uint32_t backend_id);
/* out[NL_F_MAX] */
void nl_read_failover(struct nl_lb *lb, uint64_t *out);

/* ---- IP fragments (fragtrack.c) ------------------------------------------ */
/* Fragments follow the verdict of their datagram's first fragment (the one
 * with the ports), found by (source, destination, protocol, IP id); those
 * that come before it are held (NL_VERDICT_HOLD) until it comes or the
 * datagram times out.  See fragtrack.c for the bounds and eviction policy. */
#define NL_FR_DATAGRAMS 0        /* fragmented datagrams tracked            */
#define NL_FR_FOLLOWED 1         /* later fragments given their first's verdict */
#define NL_FR_HELD 2             /* fragments that came before their first  */
#define NL_FR_RELEASED 3         /* held fragments released by their first  */
#define NL_FR_TIMEOUTS 4         /* held fragments dropped: no first in time */
#define NL_FR_INCOMPLETE 5       /* datagrams timed out before all fragments */
#define NL_FR_OVERFLOW 6         /* table full: oldest evicted, or not tracked */
#define NL_FR_HOLD_FULL 7        /* not held: buffer or the source's share full,
                                    or no packet id to answer later         */
#define NL_FR_UNTRACKED 8        /* later fragments of no tracked datagram,
                                    dropped (tracking off or first lost)   */
#define NL_FR_MAX 9

/* out[NL_FR_MAX] */
void nl_read_fragments(struct nl_lb *lb, uint64_t *out);
/* Datagrams tracked now, and held fragments not yet answered (held for
 * their first, or released and not yet taken). */
uint32_t nl_frag_count(struct nl_lb *lb);
uint32_t nl_frag_held(struct nl_lb *lb);
/* Bytes of one tracking entry; memory of the table and hold slots (the
 * bytes of fragments held in copy mode come on top, bounded, see README). */
uint32_t nl_frag_entry_size(void);
uint64_t nl_frag_memory(struct nl_lb *lb);

/* ---- NFQUEUE workers --------------------------------------------------- */
/* Mark on packets natlb sends itself, so the nft table can untrack them. */
#define NL_RAW_MARK 1851810401
#define NL_START_GSO 1           /* ask for GSO super-packets (fast bulk)   */
#define NL_START_MARK 2          /* copy heads only; verdicts carry marks   */
/* Mark mode: how much of each packet NFQUEUE copies.  Every header natlb
 * reads fits (IP and TCP with options: 120 bytes; an ICMP error with IP
 * options outside and in its quote: 136; IPv6 and TCP with options: 100,
 * leaving 156 bytes for extension headers), and so do whole SYNs, RSTs and
 * the ICMP errors about them, whose checksums can then be checked.  An
 * IPv6 packet whose headers do not fit is dropped as malformed. */
#define NL_HEAD_COPY 256
#define NL_START_PAUSED 4        /* bind the queues, read nothing until nl_resume */
/* Binds one netlink socket per queue number and starts one thread each.
 * On failure nothing is left running and `err` holds a one-line reason. */
int nl_start(struct nl_lb *lb, const uint16_t *queues, uint32_t n_queues,
             uint32_t flags, char *err, uint32_t errlen);
/* Stops and joins the workers (returns within about 100 ms). */
void nl_stop(struct nl_lb *lb);
/* The watchdog: out[i] is the monotonic ms at which worker i last went
 * round its loop (at least every 100 ms, idle or not; also while paused or
 * forwarding).  Returns how many workers run (0: none), at most max. */
uint32_t nl_worker_beats(struct nl_lb *lb, uint64_t *out, uint32_t max);
/* Workers started with NL_START_PAUSED begin reading their queues. */
void nl_resume(struct nl_lb *lb);
/* Handover: from their next batch on, the workers pass every packet on to
 * `queues` (an NF_QUEUE verdict) without deciding anything, and leave the
 * flow table alone.  Returns 0 once every worker has started such a batch,
 * or -1 if that took longer than wait_ms.  n = 0 switches it off. */
int nl_forward(struct nl_lb *lb, const uint16_t *queues, uint32_t n, uint32_t wait_ms);

/* ---- a flow table that outlives the process (ctstore.c) ---------------- */
#define NL_STORE_CREATED 0       /* no table at path: a new one            */
#define NL_STORE_ADOPTED 1       /* the table at path taken over in place  */
#define NL_STORE_COPIED 2        /* its flows copied into a table of our size */
#define NL_STORE_REFUSED 3       /* unusable (reason): replaced by a new one */

struct nl_store_report {
    uint32_t result;                /* NL_STORE_*                          */
    uint32_t adopted;               /* flows taken over                    */
    uint32_t dropped;               /* expired, or service/backend gone    */
    uint32_t old_max_flows;         /* NL_STORE_COPIED: the old size       */
    char reason[160];               /* refusal reason, or the error        */
};
/* Moves the flow table into the file at `path`, adopting the table a
 * previous process left there if its layout, boot and links check out.
 * Call after the first nl_publish (adopted flows are given the published
 * ids) and before nl_start, or while the workers are paused.  0, or -1
 * with out->reason (nothing changed). */
int nl_ct_store(struct nl_lb *lb, const char *path, uint64_t now_ms,
                struct nl_store_report *out);
/* Takes the table back after a successor adopted it in place and failed:
 * gives every flow this process's ids again and rebuilds the free list and
 * gauges.  Workers must be forwarding or stopped.  0, or -1 (out->reason). */
int nl_ct_readopt(struct nl_lb *lb, uint64_t now_ms, struct nl_store_report *out);
/* Identifies the table layout this build reads and writes. */
uint32_t nl_ct_layout(void);

/* ---- the tc fast path (tcfast.c over csrc/bpf/fastpath.bpf.c) ---------- */
/* One loaded BPF object: its programs and maps.  The kernel carries
 * established flows with it; natlb fills its backend slots, attaches it to
 * interfaces, empties its flows and reads its counters.  Addresses of either
 * family as struct nl_addr, ports in network order.  Functions returning int
 * give 0 or -errno. */
struct nl_fastpath;
/* Loads the object at path, its maps sized for max_backends backend ids and
 * max_flows flows (both directions of each), learned entries living the
 * given fixed times (syn_lifetime_ns: learned from a SYN, until the
 * handshake's last ACK is carried), a carried FIN cutting them to
 * tcp_closing_ns, and a SYN-ACK carried only within synack_window_ns of its
 * SYN.  NULL with a one-line reason in err. */
struct nl_fastpath *nl_fp_open(const char *path, uint32_t max_backends, uint32_t max_flows,
                               uint64_t tcp_lifetime_ns, uint64_t udp_lifetime_ns,
                               uint64_t tcp_closing_ns, uint64_t syn_lifetime_ns,
                               uint64_t synack_window_ns, uint32_t max_services,
                               uint32_t decide_slots, char *err, uint32_t errlen);
/* Frees the object; filters attached keep their programs until detached. */
void nl_fp_close(struct nl_fastpath *fp);
/* Attaches carry (ingress) and learn (egress) on ifindex with that tc handle
 * and priority, replacing filters there with the same ones.  Creates the
 * clsact qdisc if none (*created_qdisc = 1). */
int nl_fp_attach(struct nl_fastpath *fp, uint32_t ifindex, uint32_t handle, uint32_t priority,
                 int *created_qdisc);
/* Removes those filters, and the clsact qdisc if destroy_qdisc.  Needs no
 * loaded object (the guardian calls it); gone already is not an error. */
int nl_fp_detach(uint32_t ifindex, uint32_t handle, uint32_t priority, int destroy_qdisc);
/* Backend id's slot: its service's VIP and port and protocol, its own
 * address (the VIP's family) and port (proto 0: no such backend, the
 * addresses unread and may be NULL; packets marked for it are not learned). */
int nl_fp_set_backend(struct nl_fastpath *fp, uint32_t id, const struct nl_addr *vip,
                      uint16_t vport, const struct nl_addr *addr, uint16_t port, uint8_t proto);
/* Forgets every carried flow: each one's next packet goes to natlb.
 * Returns the live entries it made dead, or -errno. */
int64_t nl_fp_flush(struct nl_fastpath *fp);
/* Forgets the flows of these n backend ids (a reset, a UDP backend lost):
 * only their next packets go to natlb.  Returns the live entries it made
 * dead, or -errno. */
int64_t nl_fp_flush_backends(struct nl_fastpath *fp, const uint32_t *ids, uint32_t n);
/* Forgets the flows carried in from or out to ifindex (a device that is
 * gone: its index must not send a later device's packets anywhere).
 * Returns the entries removed, or -errno. */
int64_t nl_fp_flush_ifindex(struct nl_fastpath *fp, uint32_t ifindex);
/* Entries (one per flow and direction) held now. */
int64_t nl_fp_flow_count(struct nl_fastpath *fp);
/* Kernel decisions (lb.fastpath_decide): on, the carry program places a
 * new flow's first packet (a client's SYN, a UDP datagram) to a service
 * published by nl_fp_publish itself and tells natlb (the observer applies
 * it with nl_observed_new); off, it is queued to natlb. */
void nl_fp_set_decide(struct nl_fastpath *fp, int on);
/* Copies lb's published services that the kernel may decide (rr, wrr, sh,
 * maglev, not cluster: a pure table lookup) with their tables into the
 * kernel's maps, without the program ever reading half a table; the others
 * are removed there.  *placed: services decided by the kernel; *too_big:
 * those whose table found no room (their first packets stay queued). */
int nl_fp_publish(struct nl_fastpath *fp, struct nl_lb *lb, uint32_t *placed,
                  uint32_t *too_big);
/* The programs' own counters (fastpath.h NL_FP_STAT_*), summed over CPUs:
 * out[0..n-1]. */
int nl_fp_stats(struct nl_fastpath *fp, uint64_t *out, uint32_t n);
/* New flows the kernel placed: applied by the observer, and refused (their
 * entries forgotten). */
void nl_fp_placed_counts(struct nl_fastpath *fp, uint64_t *applied, uint64_t *refused);
/* 1 if a packet with this 5-tuple would find a live entry, else 0. */
int nl_fp_has_flow(struct nl_fastpath *fp, const struct nl_addr *saddr,
                   const struct nl_addr *daddr, uint16_t sport, uint16_t dport, uint8_t proto);
/* What the kernel carried for backend ids 0..n_backends-1, summed over
 * CPUs: out[id * 4 + 0..3] = packets in, bytes in, packets out, bytes out. */
int nl_fp_read_counters(struct nl_fastpath *fp, uint64_t *out, uint32_t n_backends);
/* The kernel tells natlb of every packet it carries that moves a flow's
 * state (a ring buffer): a thread of the fast path's applies each to lb as
 * nl_observe does, forgets the flows lb moved (nl_fp_forget_take) and
 * answers lb's sync requests, until nl_fp_observe_stop (before lb is
 * destroyed; nl_fp_close stops it too). */
int nl_fp_observe_start(struct nl_fastpath *fp, struct nl_lb *lb);
void nl_fp_observe_stop(struct nl_fastpath *fp);
/* Records applied to a flow, and records that changed nothing (no flow,
 * a bad checksum, a kind natlb does not take). */
void nl_fp_observe_counts(struct nl_fastpath *fp, uint64_t *observed, uint64_t *ignored);
/* Packets the kernel queued to natlb instead of carrying them because the
 * ring had no room for their record, summed over CPUs; or -errno. */
int64_t nl_fp_ring_full(struct nl_fastpath *fp);
/* One record of the ring, as tests read it. */
struct nl_fp_record {
    uint32_t ifindex;               /* the device it arrived on            */
    uint16_t len;                   /* bytes of head that hold the packet  */
    uint16_t tot_len;               /* the IP packet's whole length        */
    uint8_t head[128];              /* the IP packet as it arrived         */
    uint32_t new_backend;           /* 0xffffffff: carried; else a first
                                       packet the kernel placed there      */
};
/* Tests (no observer running): takes the waiting records, copying the
 * first max (any beyond are consumed and lost); how many copied, or -errno. */
int nl_fp_read_events(struct nl_fastpath *fp, struct nl_fp_record *out, uint32_t max);

/* ---- the core's side of the fast path (failover.c; sans-IO) ------------ */
/* A flow's kernel entries, as the C core asks the fast path to forget them
 * (ports in network order, as nl_fp_has_flow takes them). */
struct nl_fp_forget {
    struct nl_addr client_addr;
    struct nl_addr vip_addr;
    struct nl_addr backend_addr;
    uint16_t client_port;
    uint16_t vip_port;
    uint16_t backend_port;
    uint8_t proto;
    uint8_t pad;
};
/* Takes up to max keys of flows natlb moved to another backend (their
 * kernel entries must go before anything more is carried); *overflow = 1
 * if some were lost (then every entry must go). */
uint32_t nl_fp_forget_take(struct nl_lb *lb, struct nl_fp_forget *out, uint32_t max,
                           int *overflow);
/* Whether an observer applies the kernel's records now (0: the held-SYN
 * timer waits for none). */
void nl_fp_observing(struct nl_lb *lb, int on);
/* The latest sync request of the held-SYN timer; the observer answers it
 * with nl_fp_sync_done once it has forgotten the keys queued and applied
 * every record written until it read the request. */
uint64_t nl_fp_sync_wanted(struct nl_lb *lb);
void nl_fp_sync_done(struct nl_lb *lb, uint64_t req);

/* ---- packets the kernel carried, told afterwards ----------------------- */
/* Applies one packet the kernel carried alone and told natlb of (the fast
 * path: a FIN, an RST, the handshake's SYN-ACK and last ACK, a UDP flow's
 * first answer) to its flow as nl_decide would have (state, timeouts,
 * flags, passive detection, gauges, counters), with no verdict or mark.
 * pkt is the IP packet as it arrived, or its head (NL_PKT_HEAD_ONLY).  1 if
 * applied to a flow; 0 if it changed nothing: a client's SYN, no flow, a
 * flow being reset, or a bad checksum (the last counted as
 * NL_R_BAD_CHECKSUM). */
int nl_observe(struct nl_lb *lb, uint8_t *pkt, uint32_t len, uint32_t pkt_flags,
               uint64_t now_ms);
/* A new flow's first packet (a client's SYN, a UDP datagram) that the
 * fast path placed on backend_id itself: natlb's flow made as if it had
 * queued that packet and chosen that backend (a flow the kernel may carry,
 * held SYN, counters, gauges).  1 if natlb took it; 0 if not (no such
 * service or backend, not one the kernel may decide, a table full, a flow
 * on the tuple going elsewhere, a flow natlb holds that the packet queued
 * would not have moved, a bad checksum): the kernel must then forget what
 * it installed.  sent_csum: the L4 checksum field as the kernel sent the
 * packet on (> 0xffff: not known), which says whether a partial-form field
 * was the kernel's CHECKSUM_PARTIAL or a wrong sum from a wire.  placed_ms:
 * when the kernel placed it (monotonic ms, as now_ms; 0: not known), which
 * says whether natlb's SYN_SENT flow on the tuple came after it (a copy of
 * the same SYN natlb placed meanwhile: kept) or before (the kernel's is a
 * retransmission natlb did not see: the flow follows it). */
int nl_observe_new(struct nl_lb *lb, uint8_t *pkt, uint32_t len, uint32_t pkt_flags,
                   uint32_t backend_id, uint32_t sent_csum, uint64_t placed_ms,
                   uint64_t now_ms);
/* The observer's round ends with this, once the kernel's records are
 * applied: each answer held back while the kernel decides (a published
 * backend's, which found no flow) goes through the per-packet path again,
 * sent on rewritten through the outbox if a flow takes it now, else dropped
 * (a late SYN-ACK's backend gets its RST through the outbox too).  Returns
 * the number sent on.  Exposed so tests drive the round's steps. */
uint32_t nl_retry_deferred(struct nl_lb *lb, uint64_t now_ms);
