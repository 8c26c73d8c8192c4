/*
 * check_selftest.c -- the oracle's own test: nl_ct_check must notice each
 * kind of damage it claims to detect.  A few flows are made through the
 * fixture, then the table is damaged one way at a time and repaired.
 * Exit status 0 when every damage was reported with its code.
 */
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include "internal.h"
#include "natlb_test.h"
#include "fixture.h"

static int failures;

static void expect(const char *what, int got, int want)
{
    if (got != want) {
        fprintf(stderr, "check_selftest: %s: nl_ct_check gave %d, want %d\n", what, got, want);
        failures++;
    }
}

/* A TCP SYN from 198.51.100.7:port to the fixture's rr service 192.0.2.100:80. */
static void syn(uint16_t port)
{
    uint8_t p[40] = { 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0,
                      198, 51, 100, 7, 192, 0, 2, 100 };
    p[20] = (uint8_t)(port >> 8);
    p[21] = (uint8_t)port;
    p[23] = 80;
    p[32] = 5 << 4;
    p[33] = 0x02;
    fx_packet(p, sizeof(p), 0x200 /* FX_FIX */);
}

int main(void)
{
    fx_begin(1000);
    for (uint16_t port = 1000; port < 1010; port++)
        syn(port);
    struct nl_lb *lb = fx_lb();
    struct nl_ct *ct = &lb->ct;
    expect("intact", nl_ct_check(lb), NL_CHECK_OK);

    uint32_t b = 0;
    while (ct->buckets[b] == NL_NIL)
        b++;
    struct nl_flow *f = &ct->flows[ct->buckets[b]];

    uint32_t saved = f->next;
    f->next = ct->max_flows + 3;
    expect("link out of range", nl_ct_check(lb), NL_CHECK_LINK);
    f->next = ct->buckets[b];
    expect("chain cycle", nl_ct_check(lb), NL_CHECK_CYCLE);
    f->next = saved;

    uint16_t port = f->client_port;
    for (uint16_t p = 1; ; p++) {
        f->client_port = p;
        if (nl_ct_flow_bucket(ct, f) != b)
            break;
    }
    expect("entry in another bucket's chain", nl_ct_check(lb), NL_CHECK_BUCKET);
    f->client_port = port;

    uint8_t state = f->state;
    f->state = NL_FS_UDP;
    expect("TCP flow in the UDP state", nl_ct_check(lb), NL_CHECK_STATE);
    f->state = state;

    ct->flows[ct->free_head].state = NL_FS_SYN_SENT;
    expect("free entry in use", nl_ct_check(lb), NL_CHECK_STATE);
    ct->flows[ct->free_head].state = NL_FS_FREE;

    ct->count++;
    expect("count", nl_ct_check(lb), NL_CHECK_COUNT);
    ct->count--;

    lb->active[f->backend_id]++;
    expect("gauge", nl_ct_check(lb), NL_CHECK_GAUGE);
    lb->active[f->backend_id]--;

    f->tries = 0;
    expect("no try", nl_ct_check(lb), NL_CHECK_IDS);
    f->tries = 1;

    expect("repaired", nl_ct_check(lb), NL_CHECK_OK);
    fx_end();
    if (!failures)
        printf("check_selftest: nl_ct_check reports each of its 7 kinds of damage\n");
    return failures != 0;
}
