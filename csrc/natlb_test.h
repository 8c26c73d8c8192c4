/*
 * natlb_test.h -- hooks for tests, fuzzers and benchmarks, kept out of natlb.h so
 * the product boundary stays narrow.  natlb/_build.py appends this file to
 * the cffi cdef (after natlb.h), so it follows the same "cdef-clean" rules:
 * integer #defines, plain structs and prototypes only.
 */

/* ---- conntrack invariants ------------------------------------------------ */
#define NL_CHECK_OK 0
#define NL_CHECK_LINK 1          /* a chain or free-list link is out of range */
#define NL_CHECK_CYCLE 2         /* an entry reached twice (cycle, or on two lists) */
#define NL_CHECK_BUCKET 3        /* an entry sits in a chain it does not hash to */
#define NL_CHECK_STATE 4         /* a chained entry is FREE, or state and proto disagree,
                                    or a free entry is not FREE */
#define NL_CHECK_COUNT 5         /* count != chained entries, or chained + free != max */
#define NL_CHECK_GAUGE 6         /* a backend's active/inactive gauge differs from
                                    its chained flows (or is negative) */
#define NL_CHECK_IDS 7           /* service/backend id out of range, or no try */
#define NL_CHECK_NOMEM 8         /* could not allocate what the check needs */

/* Walks the whole table and the per-backend gauges; returns NL_CHECK_*.
 * Only while no packet is being processed (no workers running): it takes
 * no locks and reads the gauges of all backends as one state. */
int nl_ct_check(struct nl_lb *lb);

/* ---- nfnetlink: one queued-packet message -------------------------------- */
/* What the workers read from one NFQNL_MSG_PACKET. */
struct nl_nfq_packet {
    uint32_t packet_id;          /* network order, echoed in the verdict   */
    uint32_t has_payload;        /* NFQA_PAYLOAD present                   */
    uint32_t payload_off;        /* its bytes: msg[payload_off..+payload_len) */
    uint32_t payload_len;
    uint32_t pkt_flags;          /* NL_PKT_* from NFQA_SKB_INFO; NL_PKT_HEAD_ONLY
                                    when NFQA_CAP_LEN says the copy is partial */
};

/* Parses one netlink message of `len` bytes (the message's own nlmsg_len
 * may say less, never more).  0 if it is a queued packet with a usable
 * packet header, -1 otherwise.  Sans-IO: the workers call it per message. */
int nl_nfq_parse(const uint8_t *msg, uint32_t len, struct nl_nfq_packet *out);

/* ---- driving the core without workers (tests, fuzzers, benchmarks) ------- */
/* nl_process over n packets laid out every `stride` bytes in `bufs`, with
 * lengths `lens`; verdicts go to `verdicts`.  Returns how many were
 * rewritten.  Measures the core without one foreign call per packet. */
uint32_t nl_process_many(struct nl_lb *lb, uint32_t worker, uint8_t *bufs, uint32_t stride,
                         const uint32_t *lens, uint8_t *verdicts, uint32_t n,
                         uint32_t pkt_flags, uint64_t now_ms);
/* Reclaims expired flows in up to `max_buckets` buckets; returns how many
 * flows it freed.  Workers sweep by themselves. */
uint32_t nl_ct_sweep(struct nl_lb *lb, uint64_t now_ms, uint32_t max_buckets);
/* Re-steers SYNs whose deadline passed.  The workers call it; exposed so
 * tests can drive time (safe while the workers run, like nl_process). */
void nl_failover_tick(struct nl_lb *lb, uint64_t now_ms);
/* Packets natlb originates (re-sent SYNs, RSTs) wait in an outbox.  Workers
 * send them through a raw socket (nfqueue.c takes them with this); without
 * workers they stay there for tests to take.  Copies the oldest into buf and
 * returns its length, or 0. */
uint32_t nl_outbox_take(struct nl_lb *lb, uint8_t *buf, uint32_t cap);

/* ---- IP fragments held for their first (fragtrack.c) -------------------- */
/* A held fragment whose verdict is now known. */
struct nl_release {
    uint32_t packet_id;             /* as given to nl_process_id/nl_decide_id */
    uint32_t verdict;               /* NL_VERDICT_*: REWRITE means the
                                       rewritten packet is in the buffer   */
    uint32_t mark;                  /* NL_VERDICT_MARK                      */
    uint32_t len;                   /* bytes in the buffer (REWRITE)       */
};
/* Takes one released fragment held by `worker`; with REWRITE its bytes go
 * to buf (cap bytes; a larger one becomes a DROP).  1 if one was taken.
 * The workers answer theirs with it; tests take the others'. */
int nl_frag_take(struct nl_lb *lb, uint32_t worker, struct nl_release *out, uint8_t *buf,
                 uint32_t cap);
/* Times out datagrams; their held fragments become DROP releases.  The
 * workers call it; exposed so tests can drive time. */
void nl_frag_tick(struct nl_lb *lb, uint64_t now_ms);

/* ---- flow tables of earlier layouts (ctstore.c) --------------------------- */
/* The layout id a table of layout 2 (the last before IPv6: 48-byte entries,
 * 32-bit addresses) carries; nl_ct_store converts such a table.  Tests
 * write one with it. */
uint32_t nl_ct_layout_v2(void);

/* ---- a stuck worker (the watchdog's test) -------------------------------- */
/* Worker `worker` of every running lb sleeps in its loop for `ms` from now
 * (0: no more), as if stuck; it still wakes for nl_stop.  Process-wide, so a
 * test can stall the natlb it runs in a subprocess (natlb_testbed/stallable.py). */
void nl_test_stall(uint32_t worker, uint32_t ms);

/* ---- the tc fast path's programs, run on a packet (BPF_PROG_TEST_RUN) ---- */
/* Runs learn (egress != 0) or carry on an Ethernet frame with that skb mark,
 * ifindex and ingress ifindex (and, gso_size != 0, as a GSO packet of
 * segments of that payload size); the frame after it goes to out (*out_len:
 * its capacity in, its length out), with the program's return code and the
 * skb's mark after it.  Needs root. */
int nl_fp_test_run(struct nl_fastpath *fp, int egress, const uint8_t *pkt, uint32_t len,
                   uint8_t *out, uint32_t *out_len, uint32_t mark, uint32_t ifindex,
                   uint32_t ingress_ifindex, uint32_t gso_size, uint32_t *retval,
                   uint32_t *mark_out);
/* The ring of records (a BPF ringbuf map's fd, for epoll: readable only when
 * the kernel woke its readers), and the config's observer_polling as the
 * observer sets it while busy (records then wake nobody until the ring is a
 * quarter full).  For a fast path that is not observing. */
int nl_fp_test_ring_fd(struct nl_fastpath *fp);
void nl_fp_test_polling(struct nl_fastpath *fp, uint32_t on);
