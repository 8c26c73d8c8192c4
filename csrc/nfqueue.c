/*
 * nfqueue.c -- the thin I/O layer: one thread per NFQUEUE queue, talking
 * nfnetlink directly (no Python, no per-packet allocation).
 *
 * Each loop iteration receives up to BATCH netlink datagrams with one
 * recvmmsg (MSG_WAITFORONE: it returns as soon as one is there, so batching
 * never adds latency), decides every packet, and sends all verdicts with
 * one sendmsg.  Two modes:
 *  - mark (NL_START_MARK): the kernel copies the first NL_HEAD_COPY bytes of
 *    each packet; nl_decide answers with a mark and the nftables rewrite
 *    chain does the rewriting, so no packet body crosses into userspace;
 *  - copy: whole packets; nl_process rewrites them in place and the verdict
 *    iovecs point at them in the receive slots.
 * Between batches the worker runs the failover timers, sends what the core
 * queued in its outbox, and answers the IP fragments the core held
 * (NL_VERDICT_HOLD: no verdict at first; NFQUEUE keeps the packet until
 * one comes, in any order) once their first fragment came or they timed
 * out.  The queue is fail-closed: no BYPASS/FAIL_OPEN
 * flag, because a packet that skipped the rewrite would leak backend
 * addresses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include "internal.h"
#include "natlb_test.h"

#define BATCH 64
/* Queued packets decided together (nl_packets), then answered in order. */
#define CHUNK 64
/* One slot holds a whole GSO super-packet plus its netlink headers. */
#define SLOT (65536 + 4096)
#define RCVBUF (32 << 20)
#define QUEUE_MAXLEN 16384
#define SWEEP_PERIOD_MS 1000     /* a full conntrack sweep about once a second */
/* Buckets swept between two batches while packets are flowing; the rest of
 * what is due waits for the next pass or an idle moment, so a very large
 * table never holds up queued packets for long. */
#define SWEEP_SLICE 1024
#define SWEEP_IDLE_MAX (16 * SWEEP_SLICE)

/* One verdict: the fixed part, then either NFQA_MARK or the header of
 * NFQA_PAYLOAD (whose bytes follow in their own iovec), or nothing. */
struct verdict_msg {
    struct nlmsghdr nlh;
    struct nfgenmsg nfg;
    struct nlattr vattr;
    struct nfqnl_msg_verdict_hdr vhdr;
    struct nlattr tattr;         /* NFQA_MARK or NFQA_PAYLOAD              */
    uint32_t mark;               /* sent only with NFQA_MARK               */
};

struct nl_worker {
    struct nl_lb *lb;
    uint32_t index;
    uint16_t queue;
    int fd;
    pthread_t thread;
    uint32_t slot_size;
    uint8_t *slots;
    struct mmsghdr msgs[BATCH];
    struct iovec rx_iov[BATCH];
    struct verdict_msg verdicts[BATCH * 8];
    struct iovec tx_iov[BATCH * 8 * 3];
    uint64_t last_sweep_ms;
    uint64_t sweep_owed;         /* buckets due to the sweeper, not yet swept */
    uint64_t poll_ns;
    uint32_t timeout_ms;         /* current SO_RCVTIMEO                     */
    int mark_mode;               /* NL_START_MARK: decide, let nft rewrite  */
    uint8_t *release_buf;        /* copy mode: a released fragment's bytes  */
    uint64_t loops;              /* loop iterations, for nl_forward's wait  */
    uint64_t beat_ms;            /* nl_monotonic_ms() at the top of the last iteration:
                                    the watchdog's proof the loop turns    */
    /* The chunk being gathered: every queued packet in arrival order (pend),
     * and those the core decides (todo; pend[i].todo indexes it, or -1). */
    struct pending {
        uint32_t id;             /* network order                          */
        uint32_t payload_len;
        uint8_t *pkt;
        int verdict;             /* when not the core's to decide          */
        int forward_to;          /* >= 0: handover to that queue           */
        int todo;
    } pend[CHUNK];
    struct nl_batch_pkt todo[CHUNK];
    uint32_t n_pend, n_todo;
};

/* What the I/O layer owns: the threads and every file descriptor. */
struct nl_io {
    struct nl_worker *workers;
    uint32_t n_running;
    volatile int stop;
    int raw_fd;                  /* raw socket while workers run, or -1    */
    int raw6_fd;                 /* the same for IPv6 (-1 also when the host
                                    has no IPv6)                          */
    int evfd;                    /* readable when events wait (nl_event_fd) */
    int fpfd;                    /* readable when the fast path's observer
                                    has work from the core (nl_fp_wake_fd) */
    int paused;                  /* workers bound but not reading (handover) */
    uint32_t n_fwd;              /* >0: pass every packet on to fwd_queue  */
    uint16_t fwd_queue[NL_MAX_WORKERS];
};

int nl_io_init(struct nl_lb *lb)
{
    struct nl_io *io = calloc(1, sizeof(*io));
    if (!io)
        return -1;
    io->raw_fd = -1;
    io->raw6_fd = -1;
    io->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    io->fpfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (io->evfd < 0 || io->fpfd < 0) {
        if (io->evfd >= 0)
            close(io->evfd);
        if (io->fpfd >= 0)
            close(io->fpfd);
        free(io);
        return -1;
    }
    lb->io = io;
    return 0;
}

void nl_io_fini(struct nl_lb *lb)
{
    if (lb->io) {
        close(lb->io->evfd);
        close(lb->io->fpfd);
        free(lb->io);
        lb->io = NULL;
    }
}

/* Test hook (natlb_test.h): one worker sleeps in its loop, as if stuck. */
static uint32_t stall_worker;
static uint64_t stall_until_ms;

/* ---- events: the eventfd over failover.c's ring ------------------------ */

static void wake_fd(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0) {
        /* EAGAIN: the counter is saturated, the reader is already due. */
    }
}

static void wake(struct nl_io *io)
{
    wake_fd(io->evfd);
}

void nl_event_signal(struct nl_lb *lb)
{
    if (nl_events_unsignalled(lb))
        wake(lb->io);
    /* The fast path's observer forgets the keys of moved flows at once. */
    if (nl_fp_unsignalled(lb))
        wake_fd(lb->io->fpfd);
}

int nl_fp_wake_fd(struct nl_lb *lb)
{
    return lb->io->fpfd;
}

int nl_event_fd(struct nl_lb *lb)
{
    return lb->io->evfd;
}

uint32_t nl_read_events(struct nl_lb *lb, struct nl_event *out, uint32_t max)
{
    uint64_t drained;
    /* Clear the signal first: an event pushed after this signals again. */
    if (read(lb->io->evfd, &drained, sizeof(drained)) < 0) {
        /* EAGAIN: nothing signalled; there may still be events to read. */
    }
    int left;
    uint32_t n = nl_events_take(lb, out, max, &left);
    if (left)
        wake(lb->io);               /* so the reader comes back for the rest */
    return n;
}

/* ---- the outbox, sent through the raw socket --------------------------- */

uint32_t nl_io_flush(struct nl_lb *lb)
{
    int fd = __atomic_load_n(&lb->io->raw_fd, __ATOMIC_ACQUIRE);
    int fd6 = __atomic_load_n(&lb->io->raw6_fd, __ATOMIC_ACQUIRE);
    if (fd < 0)
        return 0;
    uint8_t buf[256];
    uint32_t len, sent = 0;
    while ((len = nl_outbox_take(lb, buf, sizeof(buf))) != 0) {
        ssize_t rc;
        if (nl_ip_version(buf) == 6) {
            /* sin6_port 0: the protocol is the header's (IPV6_HDRINCL). */
            struct sockaddr_in6 to = { .sin6_family = AF_INET6 };
            memcpy(&to.sin6_addr, buf + NL_OFF_IP6_DADDR, 16);
            rc = fd6 < 0 ? -1 : sendto(fd6, buf, len, 0, (struct sockaddr *)&to, sizeof(to));
        } else {
            struct sockaddr_in to = { .sin_family = AF_INET };
            memcpy(&to.sin_addr, buf + NL_OFF_IP_DADDR, 4);
            rc = sendto(fd, buf, len, 0, (struct sockaddr *)&to, sizeof(to));
        }
        if (rc < 0)
            nl_count_failover(lb, NL_F_SEND_ERRORS, 1);
        else
            sent++;
    }
    return sent;
}

static void put_attr(uint8_t *buf, size_t *off, uint16_t type, const void *data, uint16_t len)
{
    struct nlattr *a = (struct nlattr *)(buf + *off);
    a->nla_type = type;
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    memcpy(buf + *off + NLA_HDRLEN, data, len);
    *off += NLA_ALIGN(a->nla_len);
}

/* Sends one NFQNL_MSG_CONFIG message and waits for its ack. */
static int config_msg(int fd, uint16_t queue, const uint8_t *attrs, size_t attrs_len)
{
    uint8_t buf[256];
    struct nlmsghdr *nlh = (struct nlmsghdr *)buf;
    struct nfgenmsg *nfg = (struct nfgenmsg *)(buf + NLMSG_HDRLEN);
    size_t len = NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(*nfg)) + attrs_len;
    memset(buf, 0, sizeof(buf));
    nlh->nlmsg_len = (uint32_t)len;
    nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG;
    nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    nlh->nlmsg_seq = 1;
    nfg->nfgen_family = AF_UNSPEC;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = htons(queue);
    memcpy(buf + NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(*nfg)), attrs, attrs_len);
    if (send(fd, buf, len, 0) < 0)
        return -errno;
    uint8_t rbuf[4096];
    for (;;) {
        ssize_t n = recv(fd, rbuf, sizeof(rbuf), 0);
        if (n < 0)
            return -errno;
        for (struct nlmsghdr *r = (struct nlmsghdr *)rbuf; NLMSG_OK(r, (size_t)n);
             r = NLMSG_NEXT(r, n)) {
            if (r->nlmsg_type == NLMSG_ERROR)
                return ((struct nlmsgerr *)NLMSG_DATA(r))->error;
        }
    }
}

static int open_queue(struct nl_worker *w, uint32_t flags, char *err, uint32_t errlen)
{
    w->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
    if (w->fd < 0) {
        snprintf(err, errlen, "netlink socket: %s", strerror(errno));
        return -1;
    }
    int one = 1, size = RCVBUF;
    /* FORCE needs CAP_NET_ADMIN, which natlb has; fall back silently. */
    if (setsockopt(w->fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
        setsockopt(w->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    setsockopt(w->fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size));
    /* Overruns are counted by the kernel in /proc; an ENOBUFS error would
     * only interrupt the loop. */
    setsockopt(w->fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    if (bind(w->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "netlink bind: %s", strerror(errno));
        return -1;
    }
    uint8_t attrs[128];
    size_t off = 0;
    struct nfqnl_msg_config_cmd cmd = { .command = NFQNL_CFG_CMD_BIND, .pf = htons(AF_INET) };
    put_attr(attrs, &off, NFQA_CFG_CMD, &cmd, sizeof(cmd));
    int rc = config_msg(w->fd, w->queue, attrs, off);
    if (rc < 0) {
        /* The kernel refuses a queue another socket bound with EPERM (EBUSY
         * is this socket's own second bind): say so, not "not permitted". */
        snprintf(err, errlen, "bind NFQUEUE %u: %s%s", w->queue, strerror(-rc),
                 rc == -EPERM ? " (another program owns this queue, or natlb lacks "
                                "CAP_NET_ADMIN)" :
                 rc == -EBUSY ? " (another program owns this queue)" : "");
        return -1;
    }
    off = 0;
    uint32_t range = (flags & NL_START_MARK) ? NL_HEAD_COPY : 0xffff;
    struct nfqnl_msg_config_params params = { .copy_range = htonl(range),
                                              .copy_mode = NFQNL_COPY_PACKET };
    put_attr(attrs, &off, NFQA_CFG_PARAMS, &params, sizeof(params));
    uint32_t maxlen = htonl(QUEUE_MAXLEN);
    put_attr(attrs, &off, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof(maxlen));
    w->mark_mode = (flags & NL_START_MARK) != 0;
    uint32_t f = htonl((flags & (NL_START_GSO | NL_START_MARK)) ? NFQA_CFG_F_GSO : 0);
    uint32_t mask = htonl(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN);
    put_attr(attrs, &off, NFQA_CFG_FLAGS, &f, sizeof(f));
    put_attr(attrs, &off, NFQA_CFG_MASK, &mask, sizeof(mask));
    rc = config_msg(w->fd, w->queue, attrs, off);
    if (rc < 0) {
        snprintf(err, errlen, "configure NFQUEUE %u: %s", w->queue, strerror(-rc));
        return -1;
    }
    /* Receive timeout so the loop notices nl_stop. */
    struct timeval tv = { .tv_sec = 0, .tv_usec = 100000 };
    setsockopt(w->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    w->timeout_ms = 100;
    w->slot_size = SLOT;
    w->slots = malloc((size_t)BATCH * w->slot_size);
    if (!w->mark_mode)
        w->release_buf = malloc(SLOT);
    if (!w->slots || (!w->mark_mode && !w->release_buf)) {
        snprintf(err, errlen, "out of memory for receive slots");
        return -1;
    }
    for (int i = 0; i < BATCH; i++) {
        w->rx_iov[i].iov_base = w->slots + (size_t)i * w->slot_size;
        w->rx_iov[i].iov_len = w->slot_size;
        memset(&w->msgs[i].msg_hdr, 0, sizeof(w->msgs[i].msg_hdr));
        w->msgs[i].msg_hdr.msg_iov = &w->rx_iov[i];
        w->msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

/* The smallest payload of each attribute natlb reads; a shorter one is
 * ignored as if absent (so a packet without a header gets no verdict, and
 * short skb info means "nothing vouched for": natlb checks checksums). */
static uint16_t attr_min_len(uint16_t type)
{
    switch (type) {
    case NFQA_PACKET_HDR: return sizeof(struct nfqnl_msg_packet_hdr);
    case NFQA_SKB_INFO: return 4;
    case NFQA_CAP_LEN: return 4;
    default: return 0;
    }
}

/* Appends the verdict for packet `id` (network order): NFQA_MARK with
 * NL_VERDICT_MARK, or `payload` bytes at pkt as the new packet. */
/* forward_to >= 0: hand the packet to that queue instead (handover, see
 * nl_forward); the verdict and mark are then ignored. */
static void add_verdict(struct nl_worker *w, uint32_t id, int verdict, uint32_t mark,
                        uint8_t *pkt, uint32_t payload, size_t *nv, size_t *niov,
                        int forward_to)
{
    struct verdict_msg *v = &w->verdicts[*nv];
    memset(v, 0, sizeof(*v));
    v->nlh.nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT;
    v->nlh.nlmsg_flags = NLM_F_REQUEST;
    v->nfg.nfgen_family = AF_UNSPEC;
    v->nfg.version = NFNETLINK_V0;
    v->nfg.res_id = htons(w->queue);
    v->vattr.nla_type = NFQA_VERDICT_HDR;
    v->vattr.nla_len = NLA_HDRLEN + sizeof(v->vhdr);
    v->vhdr.verdict = htonl(forward_to >= 0 ? NF_QUEUE | ((uint32_t)forward_to << 16)
                            : verdict == NL_VERDICT_DROP ? NF_DROP : NF_ACCEPT);
    v->vhdr.id = id;
    size_t hdr = offsetof(struct verdict_msg, tattr);
    static const uint8_t pad[4];
    if (payload) {
        v->tattr.nla_type = NFQA_PAYLOAD;
        v->tattr.nla_len = (uint16_t)(NLA_HDRLEN + payload);
        hdr += NLA_HDRLEN;
    } else if (verdict == NL_VERDICT_MARK) {
        v->tattr.nla_type = NFQA_MARK;
        v->tattr.nla_len = NLA_HDRLEN + sizeof(v->mark);
        v->mark = htonl(mark);
        hdr = sizeof(*v);
    }
    v->nlh.nlmsg_len = (uint32_t)(hdr + payload);
    w->tx_iov[(*niov)++] = (struct iovec){ v, hdr };
    if (payload) {
        w->tx_iov[(*niov)++] = (struct iovec){ pkt, payload };
        if (NLMSG_ALIGN(payload) != payload)
            w->tx_iov[(*niov)++] = (struct iovec){ (void *)pad, NLMSG_ALIGN(payload) - payload };
    }
    (*nv)++;
}

int nl_nfq_parse(const uint8_t *msg, uint32_t len, struct nl_nfq_packet *out)
{
    memset(out, 0, sizeof(*out));
    if (len < NLMSG_HDRLEN)
        return -1;
    const struct nlmsghdr *nlh = (const struct nlmsghdr *)msg;
    if (nlh->nlmsg_len < NLMSG_HDRLEN || nlh->nlmsg_len > len ||
        nlh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
        return -1;
    uint32_t end = nlh->nlmsg_len;
    const struct nlattr *attr[NFQA_MAX + 1] = { 0 };
    int doubtful = 0;            /* an attribute was cut or too short */
    size_t off = NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg));
    while (off + NLA_HDRLEN <= end) {
        const struct nlattr *a = (const struct nlattr *)(msg + off);
        if (a->nla_len < NLA_HDRLEN || off + a->nla_len > end) {
            doubtful = 1;
            break;
        }
        uint16_t type = a->nla_type & NLA_TYPE_MASK;
        if (type <= NFQA_MAX && a->nla_len - NLA_HDRLEN >= attr_min_len(type))
            attr[type] = a;
        else if (type <= NFQA_MAX)
            doubtful = 1;
        off += NLA_ALIGN(a->nla_len);
    }
    if (!attr[NFQA_PACKET_HDR])
        return -1;
    memcpy(&out->packet_id, (const uint8_t *)attr[NFQA_PACKET_HDR] + NLA_HDRLEN, 4);
    if (attr[NFQA_PAYLOAD]) {
        out->has_payload = 1;
        out->payload_off = (uint32_t)((const uint8_t *)attr[NFQA_PAYLOAD] + NLA_HDRLEN - msg);
        out->payload_len = attr[NFQA_PAYLOAD]->nla_len - NLA_HDRLEN;
    }
    /* No skb info means nothing to say: the kernel verified the checksum or
     * made the packet here.  A message with a cut or short attribute
     * vouches for nothing. */
    out->pkt_flags = doubtful ? 0 : NL_PKT_CSUM_VERIFIED;
    if (attr[NFQA_SKB_INFO]) {
        uint32_t info;
        memcpy(&info, (const uint8_t *)attr[NFQA_SKB_INFO] + NLA_HDRLEN, 4);
        info = ntohl(info);
        if (info & (NFQA_SKB_CSUM_NOTVERIFIED | NFQA_SKB_CSUMNOTREADY))
            out->pkt_flags &= ~(uint32_t)NL_PKT_CSUM_VERIFIED;
        if (info & NFQA_SKB_CSUMNOTREADY)
            out->pkt_flags |= NL_PKT_CSUM_PARTIAL;
        if (info & NFQA_SKB_GSO)
            out->pkt_flags |= NL_PKT_GSO;
    }
    /* NFQA_CAP_LEN is present only when the copy is shorter than the packet. */
    if (attr[NFQA_CAP_LEN])
        out->pkt_flags |= NL_PKT_HEAD_ONLY;
    return 0;
}

/* One NFQNL_MSG_PACKET joins the chunk: parsed (nl_nfq_parse), and its
 * verdict settled here when the core has no say (a handover, a missing or
 * cut payload in copy mode). */
static void gather(struct nl_worker *w, struct nlmsghdr *nlh, uint32_t n_fwd)
{
    struct nl_nfq_packet q;
    if (nl_nfq_parse((const uint8_t *)nlh, nlh->nlmsg_len, &q) < 0)
        return;
    struct nl_worker_counters *wc = &w->lb->counters[w->index];
    struct pending *e = &w->pend[w->n_pend++];
    *e = (struct pending){ .id = q.packet_id, .payload_len = q.payload_len,
                           .pkt = q.has_payload ? (uint8_t *)nlh + q.payload_off : NULL,
                           .forward_to = -1, .todo = -1 };
    wc->io_packets++;
    if (n_fwd) {
        /* Handover: the successor decides; the kernel moves the packet to
         * its queue, at the same hook position. */
        e->forward_to = w->lb->io->fwd_queue[w->index % n_fwd];
        e->verdict = NL_VERDICT_ACCEPT;
    } else if (!e->pkt) {
        wc->reasons[NL_R_TRUNCATED]++;
        e->verdict = NL_VERDICT_DROP;
    } else if (!w->mark_mode && (q.pkt_flags & NL_PKT_HEAD_ONLY)) {
        /* We only have part of the packet; returning it would truncate it.
         * (With GSO, the kernel copies at most 65,531 bytes: a GRO packet
         * of 65,532-65,535 bytes lands here; TCP resends it in smaller
         * pieces.  Mark mode never needs the whole packet.) */
        wc->reasons[NL_R_TRUNCATED]++;
        e->verdict = NL_VERDICT_DROP;
    } else {
        e->todo = (int)w->n_todo;
        w->todo[w->n_todo++] = (struct nl_batch_pkt){
            .pkt = e->pkt, .len = q.payload_len, .pkt_flags = q.pkt_flags,
            .packet_id = ntohl(q.packet_id) };
    }
}

/* Decides the chunk and encodes its verdicts (add_verdict), in arrival
 * order; a held packet (NL_VERDICT_HOLD) gets its verdict later
 * (answer_released). */
static void answer_chunk(struct nl_worker *w, uint64_t now, size_t *nv, size_t *niov)
{
    if (w->n_todo)
        nl_packets(w->lb, w->index, w->todo, w->n_todo, now, w->mark_mode);
    for (uint32_t i = 0; i < w->n_pend; i++) {
        const struct pending *e = &w->pend[i];
        const struct nl_batch_pkt *t = e->todo >= 0 ? &w->todo[e->todo] : NULL;
        int verdict = t ? t->verdict : e->verdict;
        if (verdict == NL_VERDICT_HOLD)
            continue;
        add_verdict(w, e->id, verdict, t ? t->mark : 0, e->pkt,
                    verdict == NL_VERDICT_REWRITE ? e->payload_len : 0, nv, niov,
                    e->forward_to);
    }
    w->n_pend = w->n_todo = 0;
}

static void send_verdicts(struct nl_worker *w, size_t nv, size_t niov)
{
    if (!nv)
        return;
    struct sockaddr_nl to = { .nl_family = AF_NETLINK };
    struct msghdr mh = { .msg_name = &to, .msg_namelen = sizeof(to),
                         .msg_iov = w->tx_iov, .msg_iovlen = niov };
    if (sendmsg(w->fd, &mh, 0) < 0)
        w->lb->counters[w->index].reasons[NL_R_VERDICT_ERROR] += nv;
}

/* Gives the verdicts of fragments the core held and has now released.  One
 * message each: this is the rare path, and a copy-mode release's bytes
 * live in the one release buffer. */
static void answer_released(struct nl_worker *w)
{
    struct nl_release rel;
    uint8_t *buf = w->release_buf;
    while (nl_frag_take(w->lb, w->index, &rel, buf, buf ? SLOT : 0)) {
        size_t nv = 0, niov = 0;
        add_verdict(w, htonl(rel.packet_id), (int)rel.verdict, rel.mark, buf,
                    rel.verdict == NL_VERDICT_REWRITE ? rel.len : 0, &nv, &niov, -1);
        send_verdicts(w, nv, niov);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Receive a batch.  Polling without sleeping for a short while first saves
 * the wakeup per packet (a scheduler round trip) when traffic is steady;
 * after that we block so an idle natlb costs nothing. */
static int receive(struct nl_worker *w)
{
    if (w->poll_ns) {
        uint64_t until = now_ns() + w->poll_ns;
        do {
            int n = recvmmsg(w->fd, w->msgs, BATCH, MSG_DONTWAIT, NULL);
            if (n > 0)
                return n;
        } while (now_ns() < until);
    }
    return recvmmsg(w->fd, w->msgs, BATCH, MSG_WAITFORONE, NULL);
}

/* Sleep in recvmmsg at most 100 ms, or one tick (a quarter of the SYN
 * timeout) while a held SYN is pending.  Two fixed values rather than the
 * exact time to the next deadline: that changes every batch under load and
 * would cost a setsockopt each time. */
static void set_timeout(struct nl_worker *w, uint32_t wait_ms)
{
    uint32_t tick = w->lb->cfg.syn_timeout_ms / 4;
    tick = tick < 1 ? 1 : (tick > 100 ? 100 : tick);
    uint32_t ms = wait_ms >= 100 ? 100 : tick;
    if (ms == w->timeout_ms)
        return;
    struct timeval tv = { .tv_sec = 0, .tv_usec = (suseconds_t)ms * 1000 };
    setsockopt(w->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    w->timeout_ms = ms;
}

void nl_test_stall(uint32_t worker, uint32_t ms)
{
    __atomic_store_n(&stall_worker, worker, __ATOMIC_RELAXED);
    __atomic_store_n(&stall_until_ms, ms ? nl_monotonic_ms() + ms : 0, __ATOMIC_RELAXED);
}

/* The test hook's effect: sleep (waking for nl_stop) until the stall ends. */
static void stall(struct nl_worker *w)
{
    if (w->index != __atomic_load_n(&stall_worker, __ATOMIC_RELAXED))
        return;
    while (nl_monotonic_ms() < __atomic_load_n(&stall_until_ms, __ATOMIC_RELAXED) &&
           !__atomic_load_n(&w->lb->io->stop, __ATOMIC_RELAXED))
        usleep(10000);
}

static void *worker_main(void *arg)
{
    struct nl_worker *w = arg;
    struct nl_lb *lb = w->lb;
    struct nl_io *io = lb->io;
    const size_t max_v = sizeof(w->verdicts) / sizeof(w->verdicts[0]);
    w->last_sweep_ms = nl_monotonic_ms();
    while (!__atomic_load_n(&io->stop, __ATOMIC_RELAXED)) {
        __atomic_add_fetch(&w->loops, 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&w->beat_ms, nl_monotonic_ms(), __ATOMIC_RELAXED);
        if (__atomic_load_n(&stall_until_ms, __ATOMIC_RELAXED))
            stall(w);
        if (__atomic_load_n(&io->paused, __ATOMIC_ACQUIRE)) {
            /* Bound: the kernel keeps the packets until we read. */
            usleep(500);
            continue;
        }
        uint32_t n_fwd = __atomic_load_n(&io->n_fwd, __ATOMIC_SEQ_CST);
        nl_worker_quiescent(lb, w->index);
        int n = receive(w);
        uint64_t now = nl_monotonic_ms();
        if (n > 0) {
            nl_worker_enter(lb, w->index);
            lb->counters[w->index].io_batches++;
            size_t nv = 0, niov = 0;
            for (int i = 0; i < n; i++) {
                uint8_t *buf = w->rx_iov[i].iov_base;
                /* int, not size_t: NLMSG_NEXT subtracts the aligned length, which
                 * can exceed what is left after an odd-sized last message. */
                int left = (int)w->msgs[i].msg_len;
                for (struct nlmsghdr *nlh = (struct nlmsghdr *)buf; NLMSG_OK(nlh, left);
                     nlh = NLMSG_NEXT(nlh, left)) {
                    if (nlh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
                        continue;
                    if (w->n_pend == CHUNK) {
                        if (nv + CHUNK > max_v) {
                            send_verdicts(w, nv, niov);
                            nv = niov = 0;
                        }
                        answer_chunk(w, now, &nv, &niov);
                    }
                    gather(w, nlh, n_fwd);
                }
            }
            if (nv + w->n_pend > max_v) {
                send_verdicts(w, nv, niov);
                nv = niov = 0;
            }
            answer_chunk(w, now, &nv, &niov);
            send_verdicts(w, nv, niov);
        }
        if (n_fwd)
            continue;            /* the table is the successor's now */
        if (lb->cfg.syn_timeout_ms) {
            if (n <= 0)
                nl_worker_enter(lb, w->index);   /* the tick reads the snapshot */
            nl_failover_due(lb, now);
            set_timeout(w, nl_syn_deadline_next(lb, (uint32_t)now));
        }
        nl_worker_quiescent(lb, w->index);
        nl_event_signal(lb);
        nl_io_flush(lb);
        nl_frag_tick(lb, now);
        answer_released(w);
        uint64_t elapsed = now - w->last_sweep_ms;
        if (elapsed >= 10) {
            /* Sweep share proportional to time, split between workers. */
            w->sweep_owed += (uint64_t)lb->ct.n_buckets * elapsed / SWEEP_PERIOD_MS /
                             (io->n_running ? io->n_running : 1) + 1;
            if (w->sweep_owed > lb->ct.n_buckets)
                w->sweep_owed = lb->ct.n_buckets;
            w->last_sweep_ms = now;
        }
        if (w->sweep_owed) {
            uint64_t nb = w->sweep_owed;
            /* A full batch means packets are likely waiting behind it. */
            uint64_t cap = n >= BATCH ? SWEEP_SLICE
                         : n > 0 ? 4 * SWEEP_SLICE : SWEEP_IDLE_MAX;
            nb = nb > cap ? cap : nb;
            nl_ct_expire(&lb->ct, (uint32_t)now, (uint32_t)nb);
            w->sweep_owed -= nb;
        }
    }
    nl_worker_quiescent(lb, w->index);
    return NULL;
}

static void close_worker(struct nl_worker *w)
{
    if (w->fd >= 0)
        close(w->fd);
    free(w->slots);
    free(w->release_buf);
    w->fd = -1;
    w->slots = NULL;
    w->release_buf = NULL;
}

int nl_start(struct nl_lb *lb, const uint16_t *queues, uint32_t n, uint32_t flags,
             char *err, uint32_t errlen)
{
    struct nl_io *io = lb->io;
    if (io->workers) {
        snprintf(err, errlen, "workers already running");
        return -1;
    }
    if (n == 0 || n > lb->cfg.n_workers) {
        snprintf(err, errlen, "%u queues for %u workers", n, lb->cfg.n_workers);
        return -1;
    }
    struct nl_worker *ws = calloc(n, sizeof(*ws));
    if (!ws) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (uint32_t i = 0; i < n; i++)
        ws[i].fd = -1;
    uint32_t i;
    for (i = 0; i < n; i++) {
        ws[i].lb = lb;
        ws[i].index = i;
        ws[i].queue = queues[i];
        ws[i].poll_ns = (uint64_t)lb->cfg.poll_us * 1000;
        ws[i].beat_ms = nl_monotonic_ms();    /* not stuck before its first loop */
        if (open_queue(&ws[i], flags, err, errlen) < 0)
            goto fail;
    }
    /* Packets natlb originates (re-sent SYNs, RSTs, PMTU news) go out
     * through a raw socket per family, header included (IPPROTO_RAW implies
     * IP_HDRINCL / IPV6_HDRINCL), marked so the nftables table can untrack
     * them.  A host without IPv6 has no IPv6 flows to send for. */
    int raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    int raw6 = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    uint32_t mark = NL_RAW_MARK;
    if (raw6 < 0 && errno != EAFNOSUPPORT) {
        snprintf(err, errlen, "IPv6 raw socket: %s", strerror(errno));
        if (raw >= 0)
            close(raw);
        i = n;
        goto fail;
    }
    if (raw < 0 || setsockopt(raw, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0 ||
        (raw6 >= 0 && setsockopt(raw6, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0)) {
        snprintf(err, errlen, "raw socket: %s", strerror(errno));
        if (raw >= 0)
            close(raw);
        if (raw6 >= 0)
            close(raw6);
        i = n;
        goto fail;
    }
    __atomic_store_n(&io->raw6_fd, raw6, __ATOMIC_RELEASE);
    __atomic_store_n(&io->raw_fd, raw, __ATOMIC_RELEASE);
    io->stop = 0;
    io->paused = (flags & NL_START_PAUSED) != 0;
    io->n_running = 0;
    for (i = 0; i < n; i++) {
        if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
            snprintf(err, errlen, "pthread_create: %s", strerror(errno));
            __atomic_store_n(&io->stop, 1, __ATOMIC_RELAXED);
            for (uint32_t j = 0; j < i; j++)
                pthread_join(ws[j].thread, NULL);
            close(__atomic_exchange_n(&io->raw_fd, -1, __ATOMIC_ACQ_REL));
            int r6 = __atomic_exchange_n(&io->raw6_fd, -1, __ATOMIC_ACQ_REL);
            if (r6 >= 0)
                close(r6);
            i = n;
            goto fail;
        }
        io->n_running++;
    }
    io->workers = ws;
    return 0;
fail:
    for (uint32_t j = 0; j < n; j++)
        close_worker(&ws[j]);
    free(ws);
    io->n_running = 0;
    return -1;
}

void nl_stop(struct nl_lb *lb)
{
    struct nl_io *io = lb->io;
    if (!io || !io->workers)
        return;
    __atomic_store_n(&io->stop, 1, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < io->n_running; i++)
        pthread_join(io->workers[i].thread, NULL);
    for (uint32_t i = 0; i < io->n_running; i++)
        close_worker(&io->workers[i]);
    int raw = __atomic_exchange_n(&io->raw_fd, -1, __ATOMIC_ACQ_REL);
    if (raw >= 0)
        close(raw);
    int raw6 = __atomic_exchange_n(&io->raw6_fd, -1, __ATOMIC_ACQ_REL);
    if (raw6 >= 0)
        close(raw6);
    free(io->workers);
    io->workers = NULL;
    io->n_running = 0;
}

uint32_t nl_worker_beats(struct nl_lb *lb, uint64_t *out, uint32_t max)
{
    struct nl_io *io = lb->io;
    if (!io || !io->workers)
        return 0;
    uint32_t n = io->n_running < max ? io->n_running : max;
    for (uint32_t i = 0; i < n; i++)
        out[i] = __atomic_load_n(&io->workers[i].beat_ms, __ATOMIC_RELAXED);
    return n;
}

void nl_resume(struct nl_lb *lb)
{
    __atomic_store_n(&lb->io->paused, 0, __ATOMIC_RELEASE);
}

int nl_io_reading(struct nl_lb *lb)
{
    struct nl_io *io = lb->io;
    return io->workers && !__atomic_load_n(&io->paused, __ATOMIC_ACQUIRE);
}

int nl_forward(struct nl_lb *lb, const uint16_t *queues, uint32_t n, uint32_t wait_ms)
{
    struct nl_io *io = lb->io;
    if (n > NL_MAX_WORKERS)
        return -1;
    uint64_t seen[NL_MAX_WORKERS];
    for (uint32_t i = 0; i < io->n_running; i++)
        seen[i] = __atomic_load_n(&io->workers[i].loops, __ATOMIC_SEQ_CST);
    memcpy(io->fwd_queue, queues, n * sizeof(*queues));
    __atomic_store_n(&io->n_fwd, n, __ATOMIC_SEQ_CST);
    /* A worker whose counter moved twice has finished the batch it was in
     * and read the new setting at the top of the next loop. */
    uint64_t deadline = nl_monotonic_ms() + wait_ms;
    for (uint32_t i = 0; i < io->n_running; i++) {
        while (__atomic_load_n(&io->workers[i].loops, __ATOMIC_SEQ_CST) < seen[i] + 2) {
            if (nl_monotonic_ms() > deadline)
                return -1;
            usleep(200);
        }
    }
    return 0;
}
