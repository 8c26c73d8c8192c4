/*
 * tcfast.c -- the I/O layer of the tc fast path: loads csrc/bpf's object
 * (built into the package as natlb/_fastpath.bpf.o), attaches its two
 * programs to interfaces, and reads and writes its maps.  Nothing here runs
 * per packet: the kernel carries the packets (see fastpath.bpf.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <net/if.h>
#include <linux/if_ether.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "internal.h"
#include "bpf/fastpath.h"

_Static_assert(sizeof(((struct nl_fp_record *)0)->head) == NL_FP_HEAD,
               "natlb.h's nl_fp_record holds a whole event head");

struct nl_fastpath {
    struct bpf_object *obj;
    int learn_fd, carry_fd;        /* the programs */
    int backends_fd, flows_fd, counters_fd, stats_fd;
    uint32_t max_backends;
    int n_cpus;
    int events_fd;                 /* the ring of carried FINs and RSTs */
    int config_fd;
    struct nl_fp_config config;    /* as last written                   */
    struct ring_buffer *rb;        /* its reader, while an observer runs */
    struct nl_lb *lb;              /* where the observer applies them   */
    pthread_t observer;
    int epfd;                      /* the ring and the core's wake fd    */
    volatile int stop;
    uint64_t observed, ignored;    /* records applied, records that were not */
    uint64_t placed, refused;      /* new flows the kernel placed: applied,
                                      and refused by natlb (forgotten)      */
    /* What the kernel decides (publish): the services map, and the tables
     * array mapped here, used by halves: a publish writes the half no
     * service points at, then swaps each service's entry to it. */
    int svcs_fd, tables_fd;
    uint32_t max_services;
    uint32_t *tables;              /* n_slots backend ids                  */
    size_t tables_bytes;
    uint32_t n_slots, half;        /* the half the last publish wrote      */
    uint32_t decide;               /* as configured (nl_fp_set_decide)     */
    struct nl_lb *pub_lb;          /* the core last published: told whether
                                      the kernel decides (its held answers) */
    int observer_fd;               /* the observer map (a sockmap)         */
    int alive[2];                  /* while observing: a socket pair, one
                                      end in that map (closed with us)     */
    pthread_mutex_t config_lock;   /* one writer of the config at a time:
                                      the observer's heartbeat, set_decide */
    int forget_fd, doomed_fd;      /* the flush's program and its bitmap */
    pthread_mutex_t forget_lock;   /* one flush at a time owns the bitmap */
};

/* Three idle waits and more: a stuck or killed observer's kernel queues
 * first packets instead of placing them. */
#define HEARTBEAT_STALE_MS 200

static int fail(char *err, uint32_t errlen, const char *what, int code)
{
    snprintf(err, errlen, "%s: %s", what, strerror(code > 0 ? code : -code));
    return code > 0 ? -code : code;
}

static int silent(enum libbpf_print_level level, const char *fmt, va_list args)
{
    /* libbpf's own log would go to natlb's stderr line by line; the caller
     * gets one error instead.  NATLB_BPF_DEBUG shows it. */
    if (getenv("NATLB_BPF_DEBUG"))
        return vfprintf(stderr, fmt, args);
    (void)level;
    return 0;
}

struct nl_fastpath *nl_fp_open(const char *path, uint32_t max_backends, uint32_t max_flows,
                               uint64_t tcp_lifetime_ns, uint64_t udp_lifetime_ns,
                               uint64_t tcp_closing_ns, uint64_t syn_lifetime_ns,
                               uint64_t synack_window_ns, uint32_t max_services,
                               uint32_t decide_slots, char *err, uint32_t errlen)
{
    libbpf_set_print(silent);
    struct nl_fastpath *fp = calloc(1, sizeof *fp);
    if (!fp) {
        fail(err, errlen, "fast path", ENOMEM);
        return NULL;
    }
    pthread_mutex_init(&fp->config_lock, NULL);
    pthread_mutex_init(&fp->forget_lock, NULL);
    fp->obj = bpf_object__open_file(path, NULL);
    int rc = libbpf_get_error(fp->obj);
    if (rc) {
        fp->obj = NULL;
        fail(err, errlen, path, rc);
        goto out;
    }
    struct bpf_map *backends = bpf_object__find_map_by_name(fp->obj, "backends");
    struct bpf_map *flows = bpf_object__find_map_by_name(fp->obj, "flows");
    struct bpf_map *counters = bpf_object__find_map_by_name(fp->obj, "counters");
    struct bpf_map *config = bpf_object__find_map_by_name(fp->obj, "config");
    struct bpf_map *events = bpf_object__find_map_by_name(fp->obj, "events");
    struct bpf_map *stats = bpf_object__find_map_by_name(fp->obj, "stats");
    struct bpf_map *svcs = bpf_object__find_map_by_name(fp->obj, "svcs");
    struct bpf_map *tables = bpf_object__find_map_by_name(fp->obj, "tables");
    struct bpf_map *observer = bpf_object__find_map_by_name(fp->obj, "observer");
    struct bpf_map *doomed = bpf_object__find_map_by_name(fp->obj, "doomed");
    struct bpf_program *learn = bpf_object__find_program_by_name(fp->obj, "learn");
    struct bpf_program *carry = bpf_object__find_program_by_name(fp->obj, "carry");
    struct bpf_program *forget_flows = bpf_object__find_program_by_name(fp->obj,
                                                                       "forget_flows");
    if (!backends || !flows || !counters || !config || !events || !stats || !learn ||
        !carry || !svcs || !tables || !observer || !doomed || !forget_flows) {
        fail(err, errlen, "fast path object lacks a map or program", ENOENT);
        goto out;
    }
    uint32_t n_slots = decide_slots >= 2 ? decide_slots & ~1u : 2;
    /* Both directions of each flow natlb may hold. */
    uint64_t n_flows = (uint64_t)max_flows * 2;
    if ((rc = bpf_map__set_max_entries(backends, max_backends)) ||
        (rc = bpf_map__set_max_entries(flows, n_flows > 1u << 30 ? 1u << 30 : n_flows)) ||
        (rc = bpf_map__set_max_entries(counters, max_backends * 2)) ||
        (rc = bpf_map__set_max_entries(doomed, (max_backends + 63) / 64)) ||
        (rc = bpf_map__set_max_entries(svcs, max_services ? max_services : 1)) ||
        (rc = bpf_map__set_max_entries(tables, (n_slots + 1) / 2))) {
        fail(err, errlen, "sizing the fast path's maps", rc);
        goto out;
    }
    if ((rc = bpf_object__load(fp->obj))) {
        fail(err, errlen, "loading the fast path (BPF)", rc);
        goto out;
    }
    fp->learn_fd = bpf_program__fd(learn);
    fp->carry_fd = bpf_program__fd(carry);
    fp->forget_fd = bpf_program__fd(forget_flows);
    fp->doomed_fd = bpf_map__fd(doomed);
    fp->backends_fd = bpf_map__fd(backends);
    fp->flows_fd = bpf_map__fd(flows);
    fp->counters_fd = bpf_map__fd(counters);
    fp->events_fd = bpf_map__fd(events);
    fp->stats_fd = bpf_map__fd(stats);
    fp->config_fd = bpf_map__fd(config);
    fp->svcs_fd = bpf_map__fd(svcs);
    fp->tables_fd = bpf_map__fd(tables);
    fp->observer_fd = bpf_map__fd(observer);
    fp->alive[0] = fp->alive[1] = -1;
    fp->max_services = max_services;
    fp->n_slots = n_slots;
    long page = sysconf(_SC_PAGESIZE);
    fp->tables_bytes = ((size_t)fp->n_slots * 4 + (size_t)page - 1) / (size_t)page * (size_t)page;
    fp->tables = mmap(NULL, fp->tables_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fp->tables_fd, 0);
    if (fp->tables == MAP_FAILED) {
        fp->tables = NULL;
        fail(err, errlen, "mapping the fast path's scheduler tables", errno);
        goto out;
    }
    fp->max_backends = max_backends;
    fp->n_cpus = libbpf_num_possible_cpus();
    if (fp->n_cpus <= 0) {
        fail(err, errlen, "counting CPUs", fp->n_cpus);
        goto out;
    }
    fp->config = (struct nl_fp_config){.tcp_lifetime_ns = tcp_lifetime_ns,
                                       .udp_lifetime_ns = udp_lifetime_ns,
                                       .tcp_closing_ns = tcp_closing_ns,
                                       .syn_lifetime_ns = syn_lifetime_ns,
                                       .synack_window_ns = synack_window_ns,
                                       .stale_ns = HEARTBEAT_STALE_MS * 1000000ull};
    uint32_t zero = 0;
    if ((rc = bpf_map_update_elem(fp->config_fd, &zero, &fp->config, BPF_ANY))) {
        fail(err, errlen, "configuring the fast path", rc);
        goto out;
    }
    return fp;
out:
    nl_fp_close(fp);
    return NULL;
}

void nl_fp_close(struct nl_fastpath *fp)
{
    if (!fp)
        return;
    nl_fp_observe_stop(fp);
    if (fp->tables)
        munmap(fp->tables, fp->tables_bytes);
    bpf_object__close(fp->obj);     /* the attached filters keep their programs */
    free(fp);
}

static void hook_of(struct bpf_tc_hook *h, uint32_t ifindex, enum bpf_tc_attach_point where)
{
    memset(h, 0, sizeof *h);
    h->sz = sizeof *h;
    h->ifindex = (int)ifindex;
    h->attach_point = where;
}

int nl_fp_attach(struct nl_fastpath *fp, uint32_t ifindex, uint32_t handle, uint32_t priority,
                 int *created_qdisc)
{
    struct bpf_tc_hook hook;
    hook_of(&hook, ifindex, BPF_TC_INGRESS);
    int rc = bpf_tc_hook_create(&hook);     /* the clsact qdisc */
    *created_qdisc = rc == 0;
    if (rc && rc != -EEXIST)
        return rc;
    const struct { enum bpf_tc_attach_point where; int fd; } both[] = {
        {BPF_TC_INGRESS, fp->carry_fd}, {BPF_TC_EGRESS, fp->learn_fd}};
    for (int i = 0; i < 2; i++) {
        hook_of(&hook, ifindex, both[i].where);
        /* REPLACE: a predecessor's filters (natlb restart, a crash) become ours. */
        LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority,
                    .prog_fd = both[i].fd, .flags = BPF_TC_F_REPLACE);
        if ((rc = bpf_tc_attach(&hook, &opts)))
            return rc;
    }
    return 0;
}

int nl_fp_detach(uint32_t ifindex, uint32_t handle, uint32_t priority, int destroy_qdisc)
{
    struct bpf_tc_hook hook;
    int first = 0;
    const enum bpf_tc_attach_point where[] = {BPF_TC_INGRESS, BPF_TC_EGRESS};
    for (int i = 0; i < 2; i++) {
        hook_of(&hook, ifindex, where[i]);
        LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority);
        int rc = bpf_tc_detach(&hook, &opts);
        /* Gone already (the device, the qdisc, the filter) is fine. */
        if (rc && rc != -ENOENT && rc != -ENODEV && rc != -EINVAL && !first)
            first = rc;
    }
    if (destroy_qdisc) {
        hook_of(&hook, ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS);
        int rc = bpf_tc_hook_destroy(&hook);
        if (rc && rc != -ENOENT && rc != -ENODEV && rc != -EINVAL && !first)
            first = rc;
    }
    return first;
}

/* bpf_ktime_get_ns()'s clock. */
static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The key of a 5-tuple of natlb's (an IPv4 address is mapped in nl_addr as
 * in the key). */
static struct nl_fp_key key_of(const struct nl_addr *saddr, const struct nl_addr *daddr,
                               uint16_t sport, uint16_t dport, uint8_t proto)
{
    struct nl_fp_key k = {.sport = sport, .dport = dport, .proto = proto,
                          .family = nl_addr_is_v4(saddr) ? 4 : 6};
    memcpy(k.saddr, saddr->w, sizeof k.saddr);
    memcpy(k.daddr, daddr->w, sizeof k.daddr);
    return k;
}

/* How long a backend side that died (buried, forgotten, flushed, expired)
 * still says "placed": past the observer's lag by far (a millisecond; a
 * stuck observer stops decisions within 200 ms), short enough that traffic
 * straight to the backend on a tuple a VIP flow once used is not held. */
#define PLACED_GRACE_NS 1000000000ull

/* nl_placed_fn: an entry alive or dead less than PLACED_GRACE_NS ago (a
 * placed handshake's refusal, a flow forgotten or flushed meanwhile); an
 * error other than "none" says "placed" (natlb holds the packet). */
static int placed_in(int fd, const struct nl_addr *saddr, const struct nl_addr *daddr,
                     uint16_t sport, uint16_t dport, uint8_t proto)
{
    struct nl_fp_key k = key_of(saddr, daddr, sport, dport, proto);
    struct nl_fp_flow f;
    if (bpf_map_lookup_elem(fd, &k, &f))
        return errno != ENOENT;
    return now_ns() < f.deadline_ns + PLACED_GRACE_NS;
}

static void placed_release(int fd)
{
    close(fd);
}

int nl_fp_set_backend(struct nl_fastpath *fp, uint32_t id, const struct nl_addr *vip,
                      uint16_t vport, const struct nl_addr *addr, uint16_t port, uint8_t proto)
{
    if (id >= fp->max_backends)
        return -ERANGE;
    struct nl_fp_backend b = {0};
    if (proto) {
        b = (struct nl_fp_backend){.vport = vport, .port = port, .proto = proto,
                                   .family = nl_addr_is_v4(vip) ? 4 : 6};
        memcpy(b.vip, vip->w, sizeof b.vip);
        memcpy(b.addr, addr->w, sizeof b.addr);
    }
    return bpf_map_update_elem(fp->backends_fd, &id, &b, BPF_ANY);
}

/* ---- what the kernel decides: services and their scheduler tables ---- */

/* Each writer changes its fields of fp->config, then writes it whole: the
 * lock makes the last write the one that copied every change before it. */
static void write_config(struct nl_fastpath *fp)
{
    uint32_t zero = 0;
    pthread_mutex_lock(&fp->config_lock);
    bpf_map_update_elem(fp->config_fd, &zero, &fp->config, BPF_ANY);
    pthread_mutex_unlock(&fp->config_lock);
}

void nl_fp_set_decide(struct nl_fastpath *fp, int on)
{
    fp->decide = on != 0;
    fp->config.decide = fp->decide;
    write_config(fp);
    /* Never cleared here: records of flows placed before a pause may still
     * be on their way, and their answers must be held, not passed. */
    if (fp->pub_lb && fp->decide)
        nl_fp_deciding(fp->pub_lb, 1);
}

struct placed_svc { struct nl_fp_svc_key k; struct nl_fp_svc v; };

static int svc_key_cmp(const void *a, const void *b)
{
    return memcmp(a, b, sizeof(struct nl_fp_svc_key));
}

/* Services whose backend is a pure lookup in the table natlb publishes: rr,
 * wrr, sh, maglev, not a cluster's (its replies may come through another
 * node).  lc reads live flow counts: queued. */
static int decidable(const struct nl_service *svc)
{
    uint8_t s = svc->spec.scheduler;
    return !nl_svc_cluster(svc) && svc->table_len > 0 &&
           (s == NL_SCHED_RR || s == NL_SCHED_WRR || s == NL_SCHED_SH || s == NL_SCHED_MAGLEV);
}

int nl_fp_publish(struct nl_fastpath *fp, struct nl_lb *lb, uint32_t *placed,
                  uint32_t *too_big)
{
    *placed = *too_big = 0;
    uint32_t half = fp->n_slots / 2, base = (fp->half ^ 1) * half, used = 0, n = 0;
    struct placed_svc *want = NULL;
    nl_ext_enter(lb);
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    uint32_t n_services = snap ? snap->n_services : 0;
    want = calloc(n_services ? n_services : 1, sizeof *want);
    for (uint32_t i = 0; want && i < n_services; i++) {
        const struct nl_service *svc = &snap->services[i];
        if (!decidable(svc))
            continue;
        if (svc->table_len > half - used) {
            (*too_big)++;       /* its first packets stay queued */
            continue;
        }
        for (uint32_t j = 0; j < svc->table_len; j++)
            fp->tables[base + used + j] = svc->backends[svc->table[j]].id;
        struct placed_svc *w = &want[n++];
        w->k.port = svc->spec.port;
        w->k.proto = svc->spec.proto;
        w->k.family = nl_addr_is_v4(&svc->spec.vip) ? 4 : 6;
        memcpy(w->k.vip, svc->spec.vip.w, sizeof w->k.vip);
        w->v = (struct nl_fp_svc){.table_off = base + used, .table_len = svc->table_len,
                                  .service_id = (uint16_t)svc->spec.id,
                                  .scheduler = svc->spec.scheduler};
        used += svc->table_len;
    }
    nl_ext_exit(lb);
    if (!want)
        return -ENOMEM;
    if (fp->pub_lb != lb) {
        int fd = fcntl(fp->flows_fd, F_DUPFD_CLOEXEC, 0);
        if (fd >= 0)
            nl_fp_placed_source(lb, placed_in, placed_release, fd);
    }
    fp->pub_lb = lb;
    if (fp->decide)
        nl_fp_deciding(lb, 1);
    /* The tables are written before any entry points at them. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    fp->half ^= 1;
    if (fp->config.sched_seed != lb->sched_seed) {
        fp->config.sched_seed = lb->sched_seed;
        write_config(fp);
    }
    int rc = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct nl_fp_svc old;
        if (bpf_map_lookup_elem(fp->svcs_fd, &want[i].k, &old) == 0)
            want[i].v.cursor = old.cursor;   /* rr goes on where it was */
        int r = bpf_map_update_elem(fp->svcs_fd, &want[i].k, &want[i].v, BPF_ANY);
        if (r && !rc)
            rc = r;
        *placed += r == 0;
    }
    /* Services no longer decided here (gone, lc now, too big): queued. */
    qsort(want, n, sizeof *want, svc_key_cmp);
    struct nl_fp_svc_key key, next;
    int more = bpf_map_get_next_key(fp->svcs_fd, NULL, &key) == 0;
    while (more) {
        more = bpf_map_get_next_key(fp->svcs_fd, &key, &next) == 0;
        if (!bsearch(&key, want, n, sizeof *want, svc_key_cmp))
            bpf_map_delete_elem(fp->svcs_fd, &key);
        key = next;
    }
    free(want);
    return rc;
}

int nl_fp_stats(struct nl_fastpath *fp, uint64_t *out, uint32_t n)
{
    uint64_t *vals = calloc((size_t)fp->n_cpus, sizeof *vals);
    if (!vals)
        return -ENOMEM;
    int rc = 0;
    for (uint32_t key = 0; key < n && key < NL_FP_STAT_MAX && !rc; key++) {
        rc = bpf_map_lookup_elem(fp->stats_fd, &key, vals);
        out[key] = 0;
        for (int cpu = 0; !rc && cpu < fp->n_cpus; cpu++)
            out[key] += vals[cpu];
    }
    free(vals);
    return rc;
}

void nl_fp_placed_counts(struct nl_fastpath *fp, uint64_t *applied, uint64_t *refused)
{
    *applied = __atomic_load_n(&fp->placed, __ATOMIC_RELAXED);
    *refused = __atomic_load_n(&fp->refused, __ATOMIC_RELAXED);
}

/* Deletes the entries carrying in from or out to ifindex (a later device
 * may get the index), reading the map a batch of buckets per system call.
 * How many live ones it deleted, or -errno. */
#define WALK_BATCH 4096
#define WALK_BATCH_MAX (1u << 20)

int64_t nl_fp_flush_ifindex(struct nl_fastpath *fp, uint32_t ifindex)
{
    if (!ifindex)
        return 0;
    uint32_t cap = WALK_BATCH;
    struct nl_fp_key *keys = malloc(cap * sizeof *keys);
    struct nl_fp_flow *vals = malloc(cap * sizeof *vals);
    int64_t n = 0;
    int rc = keys && vals ? 0 : -ENOMEM;
    uint32_t token = 0;
    int first = 1, end = 0;
    while (!rc && !end) {
        uint32_t count = cap;
        rc = bpf_map_lookup_batch(fp->flows_fd, first ? NULL : &token, &token, keys, vals,
                                  &count, NULL);
        if (rc == -ENOSPC && cap < WALK_BATCH_MAX) {
            /* One bucket holds more than a batch: read it into a bigger one. */
            cap *= 2;
            struct nl_fp_key *k2 = realloc(keys, cap * sizeof *keys);
            if (k2)
                keys = k2;
            struct nl_fp_flow *v2 = realloc(vals, cap * sizeof *vals);
            if (v2)
                vals = v2;
            rc = k2 && v2 ? 0 : -ENOMEM;
            continue;
        }
        if (rc == -ENOENT) {   /* the map's end: count holds what was read */
            rc = 0;
            end = 1;
        } else if (rc) {
            break;
        }
        first = 0;
        uint64_t now = now_ns();
        for (uint32_t i = 0; i < count && !rc; i++) {
            struct nl_fp_flow *f = &vals[i];
            if (f->in_ifindex != ifindex && f->out_ifindex != ifindex)
                continue;
            int d = bpf_map_delete_elem(fp->flows_fd, &keys[i]);
            if (d && d != -ENOENT)
                rc = d;
            n += d == 0 && f->deadline_ns > now;           /* live ones */
        }
        if (!count && !end)
            break;
    }
    free(keys);
    free(vals);
    return rc ? rc : n;
}

/* Runs the forget_flows program once (it is never attached): the kernel
 * walks the flow map and makes dead, in place, the live entries of every
 * backend (all) or of the doomed ones.  How many, or -errno. */
static int64_t run_forget(struct nl_fastpath *fp, int all)
{
    uint8_t frame[ETH_HLEN] = {0};     /* the least a tc program runs on */
    struct __sk_buff ctx = {.mark = all ? 1 : 0};
    LIBBPF_OPTS(bpf_test_run_opts, o, .data_in = frame, .data_size_in = sizeof frame,
                .ctx_in = &ctx, .ctx_size_in = sizeof ctx, .repeat = 1);
    int rc = bpf_prog_test_run_opts(fp->forget_fd, &o);
    return rc ? rc : (int64_t)o.retval;
}

int64_t nl_fp_flush(struct nl_fastpath *fp)
{
    pthread_mutex_lock(&fp->forget_lock);
    int64_t n = run_forget(fp, 1);
    pthread_mutex_unlock(&fp->forget_lock);
    return n;
}

int64_t nl_fp_flush_backends(struct nl_fastpath *fp, const uint32_t *ids, uint32_t n)
{
    if (!n)
        return 0;
    uint32_t n_words = (fp->max_backends + 63) / 64;
    uint64_t *bits = calloc(n_words, sizeof *bits);
    if (!bits)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] < fp->max_backends)
            bits[ids[i] / 64] |= 1ull << (ids[i] % 64);
    /* One flush at a time owns the doomed map: set, walk, cleared again. */
    pthread_mutex_lock(&fp->forget_lock);
    int64_t r = 0;
    for (uint32_t w = 0; w < n_words && !r; w++)
        if (bits[w])
            r = bpf_map_update_elem(fp->doomed_fd, &w, &bits[w], BPF_ANY);
    if (!r)
        r = run_forget(fp, 0);
    uint64_t zero = 0;
    for (uint32_t w = 0; w < n_words; w++)
        if (bits[w])
            bpf_map_update_elem(fp->doomed_fd, &w, &zero, BPF_ANY);
    pthread_mutex_unlock(&fp->forget_lock);
    free(bits);
    return r;
}

int64_t nl_fp_flow_count(struct nl_fastpath *fp)
{
    struct nl_fp_key key, next;
    struct nl_fp_flow f;
    int64_t n = 0;
    void *prev = NULL;
    uint64_t now = now_ns();
    /* Live entries: not the dead client sides kept (bury). */
    while (bpf_map_get_next_key(fp->flows_fd, prev, &next) == 0) {
        key = next;
        prev = &key;
        n += bpf_map_lookup_elem(fp->flows_fd, &key, &f) == 0 && f.deadline_ns > now;
    }
    return n;
}

int nl_fp_has_flow(struct nl_fastpath *fp, const struct nl_addr *saddr,
                   const struct nl_addr *daddr, uint16_t sport, uint16_t dport, uint8_t proto)
{
    struct nl_fp_key k = key_of(saddr, daddr, sport, dport, proto);
    struct nl_fp_flow f;
    return bpf_map_lookup_elem(fp->flows_fd, &k, &f) == 0 && f.deadline_ns > now_ns();
}

/* Slots read per batch: 1,024 x 2 CPUs x 16 bytes fits a page or eight. */
#define NL_FP_READ_CHUNK 1024

int nl_fp_read_counters(struct nl_fastpath *fp, uint64_t *out, uint32_t n_backends)
{
    if (n_backends > fp->max_backends)
        n_backends = fp->max_backends;
    uint32_t total = n_backends * 2, done = 0, next = 0;
    uint32_t *keys = calloc(NL_FP_READ_CHUNK, sizeof *keys);
    struct nl_fp_count *vals = calloc((size_t)NL_FP_READ_CHUNK * (size_t)fp->n_cpus,
                                      sizeof *vals);
    int rc = (keys && vals) ? 0 : -ENOMEM;
    /* One system call per chunk, not one per slot: at 65,536 backends the
     * slot-by-slot reading took about 0.2 s of every status and rate sample. */
    while (!rc && done < total) {
        uint32_t count = total - done < NL_FP_READ_CHUNK ? total - done : NL_FP_READ_CHUNK;
        rc = bpf_map_lookup_batch(fp->counters_fd, done ? &next : NULL, &next, keys, vals,
                                  &count, NULL);
        if (rc == -ENOENT)      /* the map's end: count holds what was read */
            rc = 0;
        else if (rc)
            break;
        for (uint32_t i = 0; i < count; i++) {
            uint32_t slot = keys[i];
            if (slot >= total)
                continue;
            uint64_t packets = 0, bytes = 0;
            for (int cpu = 0; cpu < fp->n_cpus; cpu++) {
                packets += vals[(size_t)i * (size_t)fp->n_cpus + (size_t)cpu].packets;
                bytes += vals[(size_t)i * (size_t)fp->n_cpus + (size_t)cpu].bytes;
            }
            /* out[id * 4 ..]: packets in, bytes in, packets out, bytes out */
            out[slot * 2] = packets;
            out[slot * 2 + 1] = bytes;
        }
        if (!count)
            break;
        done += count;
    }
    free(keys);
    free(vals);
    return rc;
}

int nl_fp_test_run(struct nl_fastpath *fp, int egress, const uint8_t *pkt, uint32_t len,
                   uint8_t *out, uint32_t *out_len, uint32_t mark, uint32_t ifindex,
                   uint32_t ingress_ifindex, uint32_t gso_size, uint32_t *retval,
                   uint32_t *mark_out)
{
    /* gso_size != 0: the frame stands for a GSO packet, segments of that
     * much payload (as TCP's TSO or GRO would hand it over). */
    struct __sk_buff ctx = {.mark = mark, .ifindex = ifindex,
                            .ingress_ifindex = ingress_ifindex, .gso_size = gso_size};
    struct __sk_buff ctx_out;
    memset(&ctx_out, 0, sizeof ctx_out);
    LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = pkt, .data_size_in = len, .data_out = out,
                .data_size_out = *out_len, .ctx_in = &ctx, .ctx_size_in = sizeof ctx,
                .ctx_out = &ctx_out, .ctx_size_out = sizeof ctx_out, .repeat = 1);
    int rc = bpf_prog_test_run_opts(egress ? fp->learn_fd : fp->carry_fd, &opts);
    if (rc)
        return rc;
    *out_len = opts.data_size_out;
    *retval = opts.retval;
    *mark_out = ctx_out.mark;
    return 0;
}

/* ---- the observer: what the kernel carried, applied to natlb's flows ---- */

/* The client's side of a flow kept dead (deadline 0), as the programs
 * keep it (fastpath.bpf.c bury): its next first packet goes to natlb. */
static void bury(struct nl_fastpath *fp, const struct nl_fp_key *in)
{
    struct nl_fp_flow f;
    if (bpf_map_lookup_elem(fp->flows_fd, in, &f) == 0 && f.deadline_ns > now_ns()) {
        f.deadline_ns = 0;
        bpf_map_update_elem(fp->flows_fd, in, &f, BPF_EXIST);
    }
}

/* The backend's side of a flow, if alive, dead from now rather than
 * deleted: its answers a moment later are held, not taken for traffic
 * straight to the backend (nl_fp_placed). */
static void kill_backend_side(struct nl_fastpath *fp, const struct nl_fp_key *out)
{
    struct nl_fp_flow f;
    uint64_t now = now_ns();
    if (bpf_map_lookup_elem(fp->flows_fd, out, &f) == 0 && f.deadline_ns > now) {
        f.deadline_ns = now - 1;
        bpf_map_update_elem(fp->flows_fd, out, &f, BPF_EXIST);
    }
}

/* Both entries of the flow whose entry k is (if any): the client's buried,
 * the backend's dead from now. */
static void forget_both(struct nl_fastpath *fp, const struct nl_fp_key *k)
{
    struct nl_fp_flow f;
    if (bpf_map_lookup_elem(fp->flows_fd, k, &f))
        return;
    struct nl_fp_key r;
    nl_fp_other_side(k, &f, &r);
    bury(fp, f.dir == NL_FP_IN ? k : &r);
    kill_backend_side(fp, f.dir == NL_FP_IN ? &r : k);
}

/* The tuple of a record's packet, as the fast path takes them: IPv4 with a
 * 20-byte header or IPv6 without extension headers, its ports right after.
 * 0 if it is neither. */
static int record_key(const uint8_t *pkt, uint32_t len, struct nl_fp_key *k)
{
    struct nl_addr s, d;
    uint32_t l4, v4[2];
    if (len >= 24 && pkt[0] == 0x45) {
        memcpy(v4, pkt + 12, 8);
        s = nl_addr_v4(v4[0]);
        d = nl_addr_v4(v4[1]);
        l4 = 20;
    } else if (len >= 44 && pkt[0] >> 4 == 6) {
        memcpy(s.w, pkt + 8, 16);
        memcpy(d.w, pkt + 24, 16);
        l4 = 40;
    } else {
        return 0;
    }
    uint16_t sport, dport;
    memcpy(&sport, pkt + l4, 2);
    memcpy(&dport, pkt + l4 + 2, 2);
    *k = key_of(&s, &d, sport, dport, pkt[l4 == 20 ? 9 : 6]);
    return 1;
}

/* A record natlb did not take (no flow: expired or evicted meanwhile, a bad
 * checksum, a flow being reset): the kernel must not go on carrying what
 * natlb does not follow, so both of its entries go (the flow's next packet
 * is natlb's).  The record is a packet as the fast path takes them: IPv4
 * with a 20-byte header or IPv6 without extension headers, its ports right
 * after. */
static void forget_record(struct nl_fastpath *fp, const uint8_t *pkt, uint32_t len)
{
    struct nl_fp_key k;
    if (record_key(pkt, len, &k))
        forget_both(fp, &k);
}

/* A first packet's record natlb refused: what the kernel installed for it
 * goes (its backend's side; the client's side, buried, only if it still
 * names that backend: natlb may have placed a copy of the packet itself
 * meanwhile, a SYN sent twice, and its entries stay). */
static void forget_placed(struct nl_fastpath *fp, const uint8_t *pkt, uint32_t len,
                          uint32_t backend_id)
{
    struct nl_fp_flow f;
    struct nl_fp_backend b;
    struct nl_fp_key k;
    if (!record_key(pkt, len, &k))
        return;
    if (bpf_map_lookup_elem(fp->flows_fd, &k, &f) == 0 && f.backend_id == backend_id) {
        forget_both(fp, &k);
        return;
    }
    if (bpf_map_lookup_elem(fp->backends_fd, &backend_id, &b) == 0) {
        struct nl_fp_key out = {.sport = b.port, .dport = k.sport, .proto = k.proto,
                                .family = k.family};
        memcpy(out.saddr, b.addr, sizeof out.saddr);
        memcpy(out.daddr, k.saddr, sizeof out.daddr);
        if (bpf_map_lookup_elem(fp->flows_fd, &out, &f) == 0 && f.backend_id == backend_id)
            bpf_map_delete_elem(fp->flows_fd, &out);
    }
}

/* Called by ring_buffer__consume inside the external epoch (observe_round). */
static int apply_event(void *ctx, void *data, size_t size)
{
    struct nl_fastpath *fp = ctx;
    const struct nl_fp_event *ev = data;
    if (size < sizeof *ev || ev->len > NL_FP_HEAD) {
        __atomic_fetch_add(&fp->ignored, 1, __ATOMIC_RELAXED);
        return 0;
    }
    uint8_t pkt[NL_FP_HEAD];
    memcpy(pkt, ev->head, ev->len);
    uint32_t flags = ev->len < ev->tot_len ? NL_PKT_HEAD_ONLY : 0;
    int applied;
    if (ev->new_backend != NL_FP_CARRIED) {
        /* A first packet the kernel placed: natlb's flow as if queued. */
        applied = nl_observed_new(fp->lb, fp->lb->cfg.n_workers, pkt, ev->len, flags,
                                  ev->new_backend, ev->sent_csum,
                                  ev->placed_ns / 1000000 ? ev->placed_ns / 1000000 : 1,
                                  nl_monotonic_ms());
        __atomic_fetch_add(applied ? &fp->placed : &fp->refused, 1, __ATOMIC_RELAXED);
    } else {
        applied = nl_observed(fp->lb, fp->lb->cfg.n_workers, pkt, ev->len, flags,
                              nl_monotonic_ms());
        __atomic_fetch_add(applied ? &fp->observed : &fp->ignored, 1, __ATOMIC_RELAXED);
    }
    if (!applied && ev->new_backend != NL_FP_CARRIED)
        forget_placed(fp, pkt, ev->len, ev->new_backend);
    else if (!applied)
        forget_record(fp, pkt, ev->len);
    return 0;
}

/* Both directions' entries of a flow natlb moved. */
static void forget(struct nl_fastpath *fp, const struct nl_fp_forget *f)
{
    struct nl_fp_key in = key_of(&f->client_addr, &f->vip_addr, f->client_port, f->vip_port,
                                 f->proto);
    struct nl_fp_key out = key_of(&f->backend_addr, &f->client_addr, f->backend_port,
                                  f->client_port, f->proto);
    bury(fp, &in);
    kill_backend_side(fp, &out);
}

/* One round: the core's keys forgotten, then every record waiting applied
 * (one epoch, one hold of the external mutex for them all), then the sync
 * request read before the keys answered: every record the kernel wrote
 * before it was applied, and no moved flow is carried any more. */
static int observe_round(struct nl_fastpath *fp)
{
    struct nl_lb *lb = fp->lb;
    uint64_t want = nl_fp_sync_wanted(lb);
    struct nl_fp_forget keys[64];
    int overflow = 0;
    uint32_t n;
    do {
        int lost;
        n = nl_fp_forget_take(lb, keys, 64, &lost);
        overflow |= lost;
        for (uint32_t i = 0; i < n; i++)
            forget(fp, &keys[i]);
    } while (n == 64);
    if (overflow)
        nl_fp_flush(fp);       /* keys were lost: forget them all */
    nl_ext_enter(lb);
    int got = ring_buffer__consume(fp->rb);
    /* ICMP errors and RSTs about flows natlb did not hold yet: the kernel's
     * records of those flows came before them, and are applied now. */
    uint32_t sent = nl_deferred_retry(lb, nl_monotonic_ms());
    nl_ext_exit(lb);
    if (sent)
        nl_io_flush(lb);       /* the held answers a flow took, on their way */
    nl_event_signal(lb);       /* what applying them emitted (passive reports) */
    if (want)
        nl_fp_sync_done(lb, want);
    return got;
}

#define POLL_MS 1                  /* busy: the ring is read every 1 ms      */
#define IDLE_POLLS 100             /* ... until 100 reads in a row find nothing */
#define IDLE_WAIT_MS 50            /* idle: bounds how long stopping waits,
                                      and the heartbeat's period              */
#define HEARTBEAT_MS 20            /* busy: the heartbeat written at most so often */

/* The kernel places first packets only while this beats (config
 * heartbeat_ns, fastpath.bpf.c decide): natlb killed, they are queued (to
 * its successor) after HEARTBEAT_STALE_MS. */
static void heartbeat(struct nl_fastpath *fp)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    if (now - fp->config.heartbeat_ns < HEARTBEAT_MS * 1000000ull)
        return;
    fp->config.heartbeat_ns = now;
    write_config(fp);
}

static void set_polling(struct nl_fastpath *fp, uint32_t on)
{
    fp->config.observer_polling = on;
    write_config(fp);
}

int nl_fp_test_ring_fd(struct nl_fastpath *fp)
{
    return fp->events_fd;
}

void nl_fp_test_polling(struct nl_fastpath *fp, uint32_t on)
{
    set_polling(fp, on);
}

/* Idle, the thread sleeps until the kernel wakes it (the first record) or
 * the core does (keys to forget, a sync request: nl_fp_wake_fd).  Busy, it
 * reads the ring every millisecond and the kernel wakes nobody per record
 * (fastpath.bpf.c) unless the ring is a quarter full, which ends the wait
 * early: one context switch per millisecond, not per record.  A record is
 * applied at most about 1 ms after its packet passed.  Every wait also
 * reads the ring when it times out: a record submitted without a wakeup
 * just as polling stopped (or while a failed map update left the kernel
 * believing we poll) would otherwise sit at the read position, and the
 * kernel wakes the reader only for the record there. */
static void *observe_loop(void *arg)
{
    struct nl_fastpath *fp = arg;
    int wake_fd = nl_fp_wake_fd(fp->lb);
    uint32_t idle = 0;
    while (!fp->stop) {
        struct epoll_event evs[2];
        int polling = fp->config.observer_polling;
        int n = epoll_wait(fp->epfd, evs, 2, polling ? POLL_MS : IDLE_WAIT_MS);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == wake_fd) {
                uint64_t v;
                if (read(wake_fd, &v, sizeof v) < 0) {
                    /* EAGAIN: another round already took it */
                }
            }
        }
        int got = observe_round(fp);
        heartbeat(fp);
        if (got > 0) {
            idle = 0;
            if (!polling)
                set_polling(fp, 1);
        } else if (polling && ++idle >= IDLE_POLLS) {
            set_polling(fp, 0);
            /* What came with no wakeup before the kernel saw the change. */
            observe_round(fp);
        }
    }
    observe_round(fp);
    if (fp->config.observer_polling)
        set_polling(fp, 0);
    return NULL;
}

static void unwatch_alive(struct nl_fastpath *fp)
{
    uint32_t zero = 0;
    if (fp->config.observer_alive) {
        fp->config.observer_alive = 0;
        write_config(fp);
        bpf_map_delete_elem(fp->observer_fd, &zero);
    }
    for (int i = 0; i < 2; i++)
        if (fp->alive[i] >= 0)
            close(fp->alive[i]);
    fp->alive[0] = fp->alive[1] = -1;
}

/* The kernel decides only while an observer will apply its records: a
 * socket of ours in the observer map says so until our process ends (the
 * kernel closes it then, SIGKILL included, and takes it out of the map),
 * at once, where the heartbeat would take HEARTBEAT_STALE_MS.  A kernel
 * that refuses the socket leaves the heartbeat alone to say it. */
static void watch_alive(struct nl_fastpath *fp)
{
    uint32_t zero = 0;
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, fp->alive))
        fp->alive[0] = fp->alive[1] = -1;
    uint64_t fd = (uint64_t)fp->alive[0];
    if (fp->alive[0] < 0 || bpf_map_update_elem(fp->observer_fd, &zero, &fd, BPF_ANY)) {
        unwatch_alive(fp);
        return;
    }
    fp->config.observer_alive = 1;
    write_config(fp);
}

int nl_fp_observe_start(struct nl_fastpath *fp, struct nl_lb *lb)
{
    if (fp->rb)
        return -EALREADY;
    fp->rb = ring_buffer__new(fp->events_fd, apply_event, fp, NULL);
    if (!fp->rb)
        return -errno;
    int rc = 0;
    fp->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ring = {.events = EPOLLIN, .data.fd = ring_buffer__epoll_fd(fp->rb)};
    struct epoll_event core = {.events = EPOLLIN, .data.fd = nl_fp_wake_fd(lb)};
    if (fp->epfd < 0 ||
        epoll_ctl(fp->epfd, EPOLL_CTL_ADD, ring.data.fd, &ring) ||
        epoll_ctl(fp->epfd, EPOLL_CTL_ADD, core.data.fd, &core))
        rc = -errno;
    fp->lb = lb;
    fp->stop = 0;
    if (!rc)
        watch_alive(fp);
    if (!rc) {
        nl_fp_observing(lb, 1);
        rc = -pthread_create(&fp->observer, NULL, observe_loop, fp);
        if (rc) {
            nl_fp_observing(lb, 0);
            unwatch_alive(fp);
        }
    }
    if (rc) {
        if (fp->epfd >= 0)
            close(fp->epfd);
        ring_buffer__free(fp->rb);
        fp->rb = NULL;
        fp->lb = NULL;
    }
    return rc;
}

void nl_fp_observe_stop(struct nl_fastpath *fp)
{
    if (!fp->rb)
        return;
    fp->stop = 1;
    pthread_join(fp->observer, NULL);
    unwatch_alive(fp);
    nl_fp_observing(fp->lb, 0);
    close(fp->epfd);
    ring_buffer__free(fp->rb);
    fp->rb = NULL;
    fp->lb = NULL;
}

void nl_fp_observe_counts(struct nl_fastpath *fp, uint64_t *observed, uint64_t *ignored)
{
    *observed = __atomic_load_n(&fp->observed, __ATOMIC_RELAXED);
    *ignored = __atomic_load_n(&fp->ignored, __ATOMIC_RELAXED);
}

int64_t nl_fp_ring_full(struct nl_fastpath *fp)
{
    uint32_t key = NL_FP_STAT_RING_FULL;
    uint64_t *vals = calloc((size_t)fp->n_cpus, sizeof *vals);
    if (!vals)
        return -ENOMEM;
    int rc = bpf_map_lookup_elem(fp->stats_fd, &key, vals);
    int64_t sum = 0;
    for (int cpu = 0; !rc && cpu < fp->n_cpus; cpu++)
        sum += (int64_t)vals[cpu];
    free(vals);
    return rc ? rc : sum;
}

/* Tests: the records waiting, copied out whole (at most max). */
struct drain { struct nl_fp_record *out; uint32_t max, n; };

static int copy_event(void *ctx, void *data, size_t size)
{
    struct drain *d = ctx;
    const struct nl_fp_event *ev = data;
    if (d->n >= d->max)
        return 0;              /* consumed, not copied (natlb.h says so) */
    if (size >= sizeof *ev) {
        struct nl_fp_record *r = &d->out[d->n++];
        r->ifindex = ev->ifindex;
        r->len = ev->len;
        r->tot_len = ev->tot_len;
        memcpy(r->head, ev->head, sizeof r->head);
        r->new_backend = ev->new_backend;
    }
    return 0;
}

int nl_fp_read_events(struct nl_fastpath *fp, struct nl_fp_record *out, uint32_t max)
{
    if (fp->rb)
        return -EBUSY;         /* the observer owns the ring */
    struct drain d = {out, max, 0};
    struct ring_buffer *rb = ring_buffer__new(fp->events_fd, copy_event, &d, NULL);
    if (!rb)
        return -errno;
    int rc = ring_buffer__consume(rb);
    ring_buffer__free(rb);
    return rc < 0 && rc != -1 ? rc : (int)d.n;
}
