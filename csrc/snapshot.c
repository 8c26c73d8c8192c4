/*
 * snapshot.c -- the tables the control plane publishes (services, backends,
 * scheduler tables), and when an old one may be freed.
 *
 * Snapshot reclamation (quiescent-state based): a worker records the
 * publish generation it saw before loading the snapshot pointer for a batch
 * and clears it after the batch.  nl_publish stores the new pointer, then
 * bumps the generation, and retires the old snapshot tagged with the new
 * generation; it is freed once no worker is still inside a batch that began
 * before that generation.  Packets never wait for a publish.  Callers
 * outside the workers (tests, tools, the control plane driving time) take
 * one extra epoch slot in turn, under a mutex, for the length of each call.
 */
#include <stdlib.h>
#include <string.h>
#include "internal.h"

#define EPOCH_IDLE UINT64_MAX

struct retired {
    struct nl_snapshot *snap;
    uint64_t gen;
    struct retired *next;
};

/* Per-lb reclamation state, kept out of nl_lb's hot cache lines. */
struct nl_reclaim {
    uint64_t epoch[NL_MAX_WORKERS + 1];   /* the last: callers outside workers */
    struct retired *list;
    pthread_mutex_t ext_lock;             /* one such caller at a time       */
    uint64_t generation;                  /* bumped on each publish          */
    pthread_mutex_t publish_lock;
};
#define EXT_SLOT NL_MAX_WORKERS

static struct nl_reclaim *reclaim_of(struct nl_lb *lb)
{
    return lb->reclaim;
}

/* ---- snapshots --------------------------------------------------------- */

struct nl_snapshot *nl_snapshot_new(uint32_t n_services)
{
    if (n_services > NL_MAX_SERVICES)
        return NULL;
    struct nl_snapshot *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->n_services = n_services;
    s->services = calloc(n_services ? n_services : 1, sizeof(struct nl_service));
    uint32_t size = 4;
    while (size < 2 * n_services)
        size <<= 1;
    s->index = calloc(size, sizeof(uint32_t));
    s->index_mask = size - 1;
    if (!s->services || !s->index) {
        nl_snapshot_free(s);
        return NULL;
    }
    return s;
}

void nl_snapshot_free(struct nl_snapshot *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; s->services && i < s->n_services; i++) {
        free(s->services[i].backends);
        free(s->services[i].table);
    }
    nl_cluster_index_free(s);
    free(s->by_id);
    free(s->alive);
    free(s->services);
    free(s->index);
    free(s);
}

int nl_snapshot_set_service(struct nl_snapshot *s, uint32_t index,
                            const struct nl_service_spec *spec,
                            const struct nl_backend_spec *backends, uint32_t n_backends,
                            const uint16_t *table, uint32_t table_len)
{
    if (!s || index >= s->n_services || spec->id >= NL_MAX_SERVICES ||
        spec->scheduler > NL_SCHED_MAGLEV ||
        (spec->proto != NL_IPPROTO_TCP && spec->proto != NL_IPPROTO_UDP) ||
        (spec->flags & ~(uint32_t)NL_SVC_CLUSTER) ||
        ((spec->flags & NL_SVC_CLUSTER) && spec->scheduler != NL_SCHED_MAGLEV) ||
        n_backends > NL_MAX_BACKENDS || n_backends > 65535)
        return -1;
    /* One family per service: no NAT64/46. */
    for (uint32_t i = 0; i < n_backends; i++)
        if (backends[i].id >= NL_MAX_BACKENDS ||
            nl_addr_is_v4(&backends[i].addr) != nl_addr_is_v4(&spec->vip))
            return -1;
    for (uint32_t i = 0; i < table_len; i++)
        if (table[i] >= n_backends)
            return -1;
    struct nl_service *svc = &s->services[index];
    free(svc->backends);
    free(svc->table);
    memset(svc, 0, sizeof(*svc));
    svc->spec = *spec;
    svc->backends = malloc((n_backends ? n_backends : 1) * sizeof(*backends));
    svc->table = malloc((table_len ? table_len : 1) * sizeof(*table));
    if (!svc->backends || !svc->table)
        return -1;
    memcpy(svc->backends, backends, n_backends * sizeof(*backends));
    memcpy(svc->table, table, table_len * sizeof(*table));
    svc->n_backends = n_backends;
    svc->table_len = table_len;
    svc->filled = 1;
    return 0;
}

/* The id tables are sized by the lb's bounds, known only at publish. */
static int build_index(const struct nl_lb *lb, struct nl_snapshot *s)
{
    free(s->by_id);
    free(s->alive);
    s->by_id = calloc(lb->cfg.max_services, sizeof(*s->by_id));
    s->alive = calloc(lb->cfg.max_backends, 1);
    if (!s->by_id || !s->alive)
        return -1;
    for (uint32_t i = 0; i < s->n_services; i++) {
        struct nl_service *svc = &s->services[i];
        if (!svc->filled || svc->spec.id >= lb->cfg.max_services || s->by_id[svc->spec.id])
            return -1;
        s->by_id[svc->spec.id] = svc;
        for (uint32_t j = 0; j < svc->n_backends; j++) {
            if (svc->backends[j].id >= lb->cfg.max_backends)
                return -1;
            if (svc->backends[j].flags & NL_BE_ALIVE)
                s->alive[svc->backends[j].id] = 1;
        }
        uint32_t h = nl_svc_hash(&svc->spec.vip, svc->spec.port, svc->spec.proto);
        for (;; h++) {
            uint32_t *slot = &s->index[h & s->index_mask];
            if (*slot == 0) {
                *slot = i + 1;
                break;
            }
            const struct nl_service_spec *o = &s->services[*slot - 1].spec;
            if (nl_addr_eq(&o->vip, &svc->spec.vip) && o->port == svc->spec.port &&
                o->proto == svc->spec.proto)
                return -1;
        }
    }
    return nl_cluster_index_build(s);
}

static void reclaim(struct nl_lb *lb)
{
    struct nl_reclaim *r = reclaim_of(lb);
    uint64_t oldest = EPOCH_IDLE;
    for (uint32_t w = 0; w <= NL_MAX_WORKERS; w++) {
        uint64_t e = __atomic_load_n(&r->epoch[w], __ATOMIC_SEQ_CST);
        if (e < oldest)
            oldest = e;
    }
    struct retired **link = &r->list;
    while (*link) {
        struct retired *x = *link;
        if (x->gen <= oldest) {
            *link = x->next;
            nl_snapshot_free(x->snap);
            free(x);
        } else {
            link = &x->next;
        }
    }
}

int nl_publish(struct nl_lb *lb, struct nl_snapshot *snap)
{
    if (!snap || build_index(lb, snap) < 0)
        return -1;
    struct retired *x = malloc(sizeof(*x));
    if (!x)
        return -1;
    struct nl_reclaim *r = reclaim_of(lb);
    pthread_mutex_lock(&r->publish_lock);
    struct nl_snapshot *old = __atomic_exchange_n(&lb->snap, snap, __ATOMIC_SEQ_CST);
    uint64_t gen = __atomic_add_fetch(&r->generation, 1, __ATOMIC_SEQ_CST);
    x->snap = old;
    x->gen = gen;
    x->next = r->list;
    r->list = x;
    reclaim(lb);
    pthread_mutex_unlock(&r->publish_lock);
    return 0;
}

void nl_worker_enter(struct nl_lb *lb, uint32_t worker)
{
    struct nl_reclaim *r = reclaim_of(lb);
    __atomic_store_n(&r->epoch[worker], __atomic_load_n(&r->generation, __ATOMIC_SEQ_CST),
                     __ATOMIC_SEQ_CST);
}

void nl_worker_quiescent(struct nl_lb *lb, uint32_t worker)
{
    __atomic_store_n(&reclaim_of(lb)->epoch[worker], EPOCH_IDLE, __ATOMIC_RELEASE);
}

void nl_ext_enter(struct nl_lb *lb)
{
    pthread_mutex_lock(&reclaim_of(lb)->ext_lock);
    nl_worker_enter(lb, EXT_SLOT);
}

void nl_ext_exit(struct nl_lb *lb)
{
    nl_worker_quiescent(lb, EXT_SLOT);
    pthread_mutex_unlock(&reclaim_of(lb)->ext_lock);
}


/* ---- lifetime ---------------------------------------------------------- */

int nl_snapshots_init(struct nl_lb *lb)
{
    struct nl_reclaim *r = calloc(1, sizeof(*r));
    if (!r)
        return -1;
    for (uint32_t w = 0; w <= NL_MAX_WORKERS; w++)
        r->epoch[w] = EPOCH_IDLE;
    pthread_mutex_init(&r->ext_lock, NULL);
    pthread_mutex_init(&r->publish_lock, NULL);
    lb->reclaim = r;
    return 0;
}

void nl_snapshots_fini(struct nl_lb *lb)
{
    struct nl_reclaim *r = reclaim_of(lb);
    if (!r)
        return;
    while (r->list) {
        struct retired *x = r->list;
        r->list = x->next;
        nl_snapshot_free(x->snap);
        free(x);
    }
    nl_snapshot_free(lb->snap);
    lb->snap = NULL;
    pthread_mutex_destroy(&r->ext_lock);
    pthread_mutex_destroy(&r->publish_lock);
    free(r);
    lb->reclaim = NULL;
}
