/*
 * ctstore.c -- the flow table in a shared file mapping, so that it outlives
 * the process: a successor (after a crash, or `natlb restart`) adopts it.
 *
 * File layout: a 4 KiB header, then the flows array, then the bucket heads.
 * Entries link to each other by index (never by pointer), so the mapping
 * may sit at any address in the next process.
 *
 * A table is adopted only if its header says it was written by this exact
 * layout (NL_CT_LAYOUT_VERSION and the offsets of struct nl_flow) since the
 * current boot (flow expiry times are CLOCK_MONOTONIC milliseconds, whose
 * epoch is the boot).  A table of layout 2 (the last before IPv6: 48-byte
 * entries with 32-bit addresses) is read too, and its flows are converted
 * (addresses mapped) into a new table, as for another size, so an upgrade
 * loses no flow.  Anything else is refused with a reason and replaced by an
 * empty table: a table is never misread.
 *
 * Adoption walks every chain once.  It drops what a successor cannot use:
 * expired flows, flows whose service or backend left the configuration,
 * entries in the wrong chain or reached twice (a crash can tear an insert
 * or unlink mid-way).  Service and backend ids are process-local counter
 * slots, so each kept flow gets the new process's ids, looked up from the
 * addresses the flow itself carries (VIP:port/proto, backend address:port).
 * The free list, the count and the per-backend gauges are rebuilt from
 * what was kept.  With another max_flows the kept flows are re-inserted
 * into a new table of the new size, written next to the old and renamed
 * over it.
 *
 * Concurrency: one process writes the table at a time.  `natlb restart`
 * guarantees that with nl_forward (the old process stops deciding before
 * the new one adopts); a crashed process writes nothing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "internal.h"
#include "natlb_test.h"

/* Bump whenever struct nl_flow's meaning changes without changing its
 * offsets (a new state, another clock); offset changes are caught anyway. */
#define NL_CT_LAYOUT_VERSION 3       /* 2: syn_seq, flags (issue 9); 3: 128-bit
                                        addresses (IPv6, issue 14) */
#define NL_CT_MAGIC 0x574f4c4654434c4eull     /* "NLCTFLOW" */
#define HEADER_SIZE 4096

struct ct_header {
    uint64_t magic;
    uint32_t layout;             /* nl_ct_layout(): stays at offset 8     */
    uint32_t header_size;
    uint32_t max_flows;
    uint32_t n_buckets;
    uint32_t seed;               /* the bucket hash seed of this table    */
    uint32_t owner_pid;          /* last process that opened it (logs)    */
    char boot_id[40];            /* the monotonic clock's epoch           */
};
_Static_assert(sizeof(struct ct_header) <= HEADER_SIZE, "header fits its page");

#define MIX(h, v) ((h) = nl_mix32((h) ^ (uint32_t)(v)) + 0x9e3779b9u)

/* The flow entry of layout 2, the last before IPv6 (48 bytes, 32-bit IPv4
 * addresses): read so that an upgrade keeps its flows (flow_from_v2). */
struct flow_v2 {
    uint32_t client_addr, vip_addr, backend_addr;   /* network order */
    uint16_t client_port, vip_port, backend_port;
    uint8_t proto, state;
    uint32_t next, expires_ms;
    uint16_t service_id, backend_id;
    uint32_t syn_seq, client_seq_next, server_seq_next;
    uint16_t held;
    uint8_t tries, flags;
};
_Static_assert(sizeof(struct flow_v2) == 48, "layout 2's entry: 48 bytes");

/* The layout id layout 2 wrote (nl_ct_layout of that build). */
static uint32_t layout_v2(void)
{
    uint32_t h = 2;
    MIX(h, sizeof(struct flow_v2));
    MIX(h, sizeof(struct ct_header));
    MIX(h, offsetof(struct flow_v2, client_addr));
    MIX(h, offsetof(struct flow_v2, vip_addr));
    MIX(h, offsetof(struct flow_v2, backend_addr));
    MIX(h, offsetof(struct flow_v2, client_port));
    MIX(h, offsetof(struct flow_v2, vip_port));
    MIX(h, offsetof(struct flow_v2, backend_port));
    MIX(h, offsetof(struct flow_v2, proto));
    MIX(h, offsetof(struct flow_v2, state));
    MIX(h, offsetof(struct flow_v2, next));
    MIX(h, offsetof(struct flow_v2, expires_ms));
    MIX(h, offsetof(struct flow_v2, service_id));
    MIX(h, offsetof(struct flow_v2, backend_id));
    MIX(h, offsetof(struct flow_v2, syn_seq));
    MIX(h, offsetof(struct flow_v2, client_seq_next));
    MIX(h, offsetof(struct flow_v2, server_seq_next));
    MIX(h, offsetof(struct flow_v2, held));
    MIX(h, offsetof(struct flow_v2, tries));
    MIX(h, offsetof(struct flow_v2, flags));
    MIX(h, NL_FS_UDP);
    MIX(h, NL_NIL);
    return h;
}

uint32_t nl_ct_layout_v2(void)
{
    return layout_v2();
}

/* A layout-2 entry as one of ours: its IPv4 addresses mapped. */
static struct nl_flow flow_from_v2(const struct flow_v2 *o)
{
    struct nl_flow f = {
        .client_addr = nl_addr_v4(o->client_addr), .vip_addr = nl_addr_v4(o->vip_addr),
        .backend_addr = nl_addr_v4(o->backend_addr), .client_port = o->client_port,
        .vip_port = o->vip_port, .backend_port = o->backend_port, .proto = o->proto,
        .state = o->state, .next = o->next, .expires_ms = o->expires_ms,
        .service_id = o->service_id, .backend_id = o->backend_id, .syn_seq = o->syn_seq,
        .client_seq_next = o->client_seq_next, .server_seq_next = o->server_seq_next,
        .held = o->held, .tries = o->tries, .flags = o->flags,
    };
    return f;
}

uint32_t nl_ct_layout(void)
{
    uint32_t h = NL_CT_LAYOUT_VERSION;
    MIX(h, sizeof(struct nl_flow));
    MIX(h, sizeof(struct ct_header));
    MIX(h, offsetof(struct nl_flow, client_addr));
    MIX(h, offsetof(struct nl_flow, vip_addr));
    MIX(h, offsetof(struct nl_flow, backend_addr));
    MIX(h, offsetof(struct nl_flow, client_port));
    MIX(h, offsetof(struct nl_flow, vip_port));
    MIX(h, offsetof(struct nl_flow, backend_port));
    MIX(h, offsetof(struct nl_flow, proto));
    MIX(h, offsetof(struct nl_flow, state));
    MIX(h, offsetof(struct nl_flow, next));
    MIX(h, offsetof(struct nl_flow, expires_ms));
    MIX(h, offsetof(struct nl_flow, service_id));
    MIX(h, offsetof(struct nl_flow, backend_id));
    MIX(h, offsetof(struct nl_flow, syn_seq));
    MIX(h, offsetof(struct nl_flow, client_seq_next));
    MIX(h, offsetof(struct nl_flow, server_seq_next));
    MIX(h, offsetof(struct nl_flow, held));
    MIX(h, offsetof(struct nl_flow, tries));
    MIX(h, offsetof(struct nl_flow, flags));
    MIX(h, NL_FS_UDP);
    MIX(h, NL_NIL);
    return h;
}

static size_t flows_bytes_of(uint32_t max_flows, size_t entry)
{
    return ((size_t)max_flows * entry + 63) & ~(size_t)63;
}

static size_t store_bytes_of(uint32_t max_flows, uint32_t n_buckets, size_t entry)
{
    return HEADER_SIZE + flows_bytes_of(max_flows, entry) + (size_t)n_buckets * sizeof(uint32_t);
}

static size_t store_bytes(uint32_t max_flows, uint32_t n_buckets)
{
    return store_bytes_of(max_flows, n_buckets, sizeof(struct nl_flow));
}

static void read_boot_id(char *out)
{
    memset(out, 0, 40);
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (f) {
        if (!fgets(out, 40, f))
            out[0] = 0;
        fclose(f);
    }
}

/* A mapped store: header and the two arrays inside it. */
struct mapped {
    void *base;
    size_t len;
    struct ct_header *hdr;
    struct nl_flow *flows;
    uint32_t *buckets;
    int v2;                      /* layout 2: flows are struct flow_v2    */
};

static void point_into(struct mapped *m)
{
    size_t entry = m->v2 ? sizeof(struct flow_v2) : sizeof(struct nl_flow);
    m->hdr = m->base;
    m->flows = (struct nl_flow *)((uint8_t *)m->base + HEADER_SIZE);
    m->buckets = (uint32_t *)((uint8_t *)m->flows + flows_bytes_of(m->hdr->max_flows, entry));
}

/* Why the header at m cannot be adopted, or NULL; sets m->v2 for a
 * table of layout 2, which is converted rather than adopted. */
static const char *refusal(struct mapped *m, const char *boot_id)
{
    const struct ct_header *h = m->hdr;
    if (m->len < HEADER_SIZE || h->magic != NL_CT_MAGIC)
        return "not a natlb flow table";
    m->v2 = h->layout == layout_v2();
    if (h->layout != nl_ct_layout() && !m->v2)
        return "written by another layout version";
    size_t entry = m->v2 ? sizeof(struct flow_v2) : sizeof(struct nl_flow);
    if (h->header_size != HEADER_SIZE || h->max_flows == 0 || h->max_flows >= NL_NIL ||
        h->n_buckets == 0 || (h->n_buckets & (h->n_buckets - 1)) ||
        m->len != store_bytes_of(h->max_flows, h->n_buckets, entry))
        return "inconsistent size";
    if (strncmp(h->boot_id, boot_id, 40) != 0)
        return "written before the last boot";
    return NULL;
}

/* The new process's ids for f, from the addresses it carries; -1 if its
 * service or backend is not in the published configuration. */
static int remap(const struct nl_snapshot *snap, struct nl_flow *f)
{
    if (!snap)
        return -1;
    for (uint32_t i = 0; i < snap->n_services; i++) {
        const struct nl_service *s = &snap->services[i];
        if (!nl_addr_eq(&s->spec.vip, &f->vip_addr) || s->spec.port != f->vip_port ||
            s->spec.proto != f->proto)
            continue;
        for (uint32_t j = 0; j < s->n_backends; j++) {
            const struct nl_backend_spec *b = &s->backends[j];
            if (nl_addr_eq(&b->addr, &f->backend_addr) && b->port == f->backend_port) {
                f->service_id = (uint16_t)s->spec.id;
                f->backend_id = (uint16_t)b->id;
                return 0;
            }
        }
        return -1;
    }
    return -1;
}

/* Walks the old table's chains, unlinking what cannot be kept and giving
 * the rest new ids; marks kept entries in `kept`.  -1 if the links are
 * corrupt (out of range or a cycle): the table must not be used. */
static int sweep_old(struct nl_lb *lb, struct mapped *m, uint8_t *kept, uint32_t now,
                     struct nl_store_report *out)
{
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    struct nl_ct probe = { .seed = m->hdr->seed, .n_buckets = m->hdr->n_buckets };
    uint32_t max = m->hdr->max_flows;
    for (uint32_t b = 0; b < m->hdr->n_buckets; b++) {
        uint32_t *link = &m->buckets[b];
        while (*link != NL_NIL) {
            uint32_t i = *link;
            if (i >= max || kept[i])
                return -1;
            struct nl_flow *f = &m->flows[i];
            int keep = f->state != NL_FS_FREE && f->state <= NL_FS_UDP &&
                       !nl_time_before(f->expires_ms, now) &&
                       nl_ct_flow_bucket(&probe, f) == b &&
                       remap(snap, f) == 0;
            kept[i] = keep ? 2 : 1;      /* visited: a second visit is a cycle */
            if (!keep) {
                *link = f->next;
                out->dropped++;
                continue;
            }
            f->held = NL_HELD_NONE;      /* held SYNs lived in the old process */
            link = &f->next;
        }
    }
    for (uint32_t i = 0; i < max; i++)
        kept[i] = kept[i] == 2;
    return 0;
}

/* sweep_old for a layout-2 table, which is read, never written: the flows
 * worth keeping are converted into `out` (max_flows entries), their count
 * in *n.  -1 if the links are corrupt. */
static int sweep_v2(struct nl_lb *lb, const struct mapped *m, struct nl_flow *out, uint32_t *n,
                    uint32_t now, struct nl_store_report *rep)
{
    const struct nl_snapshot *snap = __atomic_load_n(&lb->snap, __ATOMIC_ACQUIRE);
    struct nl_ct probe = { .seed = m->hdr->seed, .n_buckets = m->hdr->n_buckets };
    const struct flow_v2 *flows = (const struct flow_v2 *)m->flows;
    uint32_t max = m->hdr->max_flows;
    uint8_t *seen = calloc(max, 1);
    if (!seen)
        return -1;
    *n = 0;
    for (uint32_t b = 0; b < m->hdr->n_buckets; b++) {
        for (uint32_t i = m->buckets[b]; i != NL_NIL; i = flows[i].next) {
            if (i >= max || seen[i]++) {
                free(seen);
                return -1;
            }
            struct nl_flow f = flow_from_v2(&flows[i]);
            /* IPv4 hashes as it did in layout 2, so its chains still hold. */
            if (f.state != NL_FS_FREE && f.state <= NL_FS_UDP &&
                !nl_time_before(f.expires_ms, now) && nl_ct_flow_bucket(&probe, &f) == b &&
                remap(snap, &f) == 0) {
                f.held = NL_HELD_NONE;
                out[(*n)++] = f;
            } else {
                rep->dropped++;
            }
        }
    }
    free(seen);
    return 0;
}

static int map_fd(int fd, size_t len, struct mapped *m)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -1;
    m->base = p;
    m->len = len;
    m->hdr = p;
    return 0;
}

/* A new, empty store file of ct's size at tmp, mapped into m. */
static int create_store(struct nl_ct *ct, const char *tmp, const char *boot_id,
                        struct mapped *m, struct nl_store_report *out)
{
    size_t len = store_bytes(ct->max_flows, ct->n_buckets);
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)len) < 0 || map_fd(fd, len, m) < 0) {
        snprintf(out->reason, sizeof(out->reason), "%s: %s", tmp, strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        return -1;
    }
    close(fd);
    struct ct_header *h = m->hdr;
    h->magic = NL_CT_MAGIC;
    h->layout = nl_ct_layout();
    h->header_size = HEADER_SIZE;
    h->max_flows = ct->max_flows;
    h->n_buckets = ct->n_buckets;
    h->seed = ct->seed;
    memcpy(h->boot_id, boot_id, 40);
    point_into(m);
    return 0;
}

/* Makes the mapping ct's table: private arrays are freed. */
static void install(struct nl_ct *ct, struct mapped *m)
{
    free(ct->flows);
    free(ct->buckets);
    ct->flows = m->flows;
    ct->buckets = m->buckets;
    ct->seed = m->hdr->seed;
    ct->store = m->base;
    ct->store_len = m->len;
    m->hdr->owner_pid = (uint32_t)getpid();
}

/* Rebuilds the free list, count and gauges of ct from `kept`. */
static uint32_t rebuild(struct nl_lb *lb, const uint8_t *kept)
{
    struct nl_ct *ct = &lb->ct;
    uint32_t n = 0;
    ct->free_head = NL_NIL;
    for (uint32_t i = ct->max_flows; i-- > 0;) {
        struct nl_flow *f = &ct->flows[i];
        if (kept[i]) {
            nl_flow_gauge(lb, f, f->state, 1);
            n++;
        } else {
            memset(f, 0, sizeof(*f));
            f->next = ct->free_head;
            ct->free_head = i;
        }
    }
    ct->count = n;
    return n;
}

int nl_ct_store(struct nl_lb *lb, const char *path, uint64_t now_ms,
                struct nl_store_report *out)
{
    struct nl_ct *ct = &lb->ct;
    uint32_t now = (uint32_t)now_ms;
    memset(out, 0, sizeof(*out));
    if (ct->store || nl_io_reading(lb)) {
        snprintf(out->reason, sizeof(out->reason), "the table is already in use");
        return -1;
    }
    char boot_id[40], tmp[4200];
    read_boot_id(boot_id);
    if (snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid()) >= (int)sizeof(tmp)) {
        snprintf(out->reason, sizeof(out->reason), "path too long");
        return -1;
    }
    struct mapped old = { 0 }, new = { 0 };
    out->result = NL_STORE_CREATED;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        struct stat st;
        const char *why = NULL;
        if (fstat(fd, &st) < 0 || (size_t)st.st_size < HEADER_SIZE ||
            map_fd(fd, (size_t)st.st_size, &old) < 0)
            why = "unreadable";
        close(fd);
        if (!why && !(why = refusal(&old, boot_id)))
            point_into(&old);
        uint8_t *kept = NULL;
        struct nl_flow *conv = NULL;       /* layout 2: the flows converted */
        uint32_t n_conv = 0;
        if (!why && old.v2 && !(conv = malloc((size_t)old.hdr->max_flows * sizeof(*conv))))
            why = "out of memory";
        if (!why && !old.v2 && !(kept = calloc(old.hdr->max_flows, 1)))
            why = "out of memory";
        if (!why && (old.v2 ? sweep_v2(lb, &old, conv, &n_conv, now, out)
                            : sweep_old(lb, &old, kept, now, out)) < 0)
            why = "corrupt links";
        if (why) {
            out->result = NL_STORE_REFUSED;
            out->dropped = 0;
            snprintf(out->reason, sizeof(out->reason), "%s", why);
            free(kept);
            free(conv);
        } else if (!old.v2 && old.hdr->max_flows == ct->max_flows &&
                   old.hdr->n_buckets == ct->n_buckets) {
            install(ct, &old);
            out->adopted = rebuild(lb, kept);
            out->result = NL_STORE_ADOPTED;
            free(kept);
            return 0;
        } else {
            /* Another size or layout 2: re-insert what was kept into a
             * table of ours. */
            out->old_max_flows = old.hdr->max_flows;
            const struct nl_flow *src = old.v2 ? conv : old.flows;
            uint32_t n_src = old.v2 ? n_conv : old.hdr->max_flows;
            if (create_store(ct, tmp, boot_id, &new, out) < 0) {
                free(kept);
                free(conv);
                munmap(old.base, old.len);
                return -1;
            }
            memset(new.buckets, 0xff, (size_t)ct->n_buckets * sizeof(uint32_t));
            install(ct, &new);
            uint8_t *now_kept = calloc(ct->max_flows, 1);
            uint32_t slot = 0;
            for (uint32_t i = 0; now_kept && i < n_src; i++) {
                if (kept && !kept[i])
                    continue;
                if (slot == ct->max_flows) {
                    out->dropped++;          /* the new table is smaller */
                    continue;
                }
                struct nl_flow *f = &ct->flows[slot];
                *f = src[i];
                uint32_t b = nl_ct_flow_bucket(ct, f);
                f->next = ct->buckets[b];
                ct->buckets[b] = slot;
                now_kept[slot++] = 1;
            }
            free(kept);
            free(conv);
            munmap(old.base, old.len);
            if (!now_kept) {
                snprintf(out->reason, sizeof(out->reason), "out of memory");
                unlink(tmp);
                return -1;
            }
            out->adopted = rebuild(lb, now_kept);
            free(now_kept);
            out->result = NL_STORE_COPIED;
            goto publish;
        }
        munmap(old.base, old.len);
    }
    if (create_store(ct, tmp, boot_id, &new, out) < 0)
        return -1;
    /* The private table may already hold flows (tests): carry them over. */
    memcpy(new.flows, ct->flows, (size_t)ct->max_flows * sizeof(struct nl_flow));
    memcpy(new.buckets, ct->buckets, (size_t)ct->n_buckets * sizeof(uint32_t));
    install(ct, &new);
publish:
    if (rename(tmp, path) < 0) {
        snprintf(out->reason, sizeof(out->reason), "rename to %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

int nl_ct_readopt(struct nl_lb *lb, uint64_t now_ms, struct nl_store_report *out)
{
    struct nl_ct *ct = &lb->ct;
    memset(out, 0, sizeof(*out));
    if (!ct->store) {
        snprintf(out->reason, sizeof(out->reason), "the table is not in a file");
        return -1;
    }
    struct mapped m = { .base = ct->store, .len = ct->store_len };
    point_into(&m);
    uint8_t *kept = calloc(ct->max_flows, 1);
    if (!kept || sweep_old(lb, &m, kept, (uint32_t)now_ms, out) < 0) {
        snprintf(out->reason, sizeof(out->reason), kept ? "corrupt links" : "out of memory");
        free(kept);
        return -1;
    }
    memset(lb->active, 0, lb->cfg.max_backends * sizeof(*lb->active));
    memset(lb->inactive, 0, lb->cfg.max_backends * sizeof(*lb->inactive));
    out->adopted = rebuild(lb, kept);
    out->result = NL_STORE_ADOPTED;
    free(kept);
    return 0;
}

void nl_ct_store_unmap(struct nl_ct *ct)
{
    munmap(ct->store, ct->store_len);
    ct->store = NULL;
    ct->store_len = 0;
}
