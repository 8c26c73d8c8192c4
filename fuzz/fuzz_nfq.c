/*
 * fuzz_nfq.c -- libFuzzer target: what a worker does with one receive
 * buffer.  It walks the netlink messages as worker_main does, parses each
 * queued packet with nl_nfq_parse, and hands the payload to nl_decide (mark
 * mode) or nl_process (copy mode), with the fixture's oracles.
 *
 * Input: one byte (bit 0: mark mode), then the datagram as the kernel
 * would deliver it.  fuzz/corpus/nfq/ holds seeds written by fuzz/seeds.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/netlink.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include "natlb.h"
#include "natlb_test.h"
#include "fixture.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 65536)
        return 0;
    uint32_t mode = data[0] & 1 ? FX_MARK_MODE : 0;
    fx_begin(1000);
    /* Exactly the datagram on the heap (malloc aligns it as a socket buffer is). */
    size_t n = size - 1;
    uint8_t *buf = malloc(n ? n : 1);
    memcpy(buf, data + 1, n);
    int left = (int)n;
    for (struct nlmsghdr *nlh = (struct nlmsghdr *)buf; NLMSG_OK(nlh, left);
         nlh = NLMSG_NEXT(nlh, left)) {
        struct nl_nfq_packet q;
        if (nl_nfq_parse((const uint8_t *)nlh, nlh->nlmsg_len, &q) < 0)
            continue;
        if (nlh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
            fx_fail("parsed a message that is not a queued packet", nlh->nlmsg_type);
        if (!q.has_payload)
            continue;
        if (q.payload_off < NLMSG_HDRLEN || q.payload_off > nlh->nlmsg_len ||
            q.payload_len > nlh->nlmsg_len - q.payload_off)
            fx_fail("payload outside its message", (long)q.payload_off);
        fx_packet((uint8_t *)nlh + q.payload_off, q.payload_len, q.pkt_flags | mode);
    }
    free(buf);
    fx_end();
    return 0;
}
