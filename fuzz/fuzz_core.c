/*
 * fuzz_core.c -- libFuzzer target: nl_process and nl_decide over a sequence
 * of packets, with time passing and the control plane acting in between.
 *
 * Input: one byte of start time (the clock starts at byte << 24, so some
 * inputs cross the 32-bit wrap of the flow timers), then records:
 *   op & 3 == 0 or 1: a packet; op bit 0 = mark mode (nl_decide), bit 2 =
 *       fix lengths and checksums first, bit 3 = CSUM_PARTIAL, bit 4 = GSO,
 *       bit 5 = HEAD_ONLY, bit 6 = CSUM_VERIFIED (the kernel vouches for the
 *       checksums); then one length byte and that many bytes;
 *   op & 3 == 2: time advances by the next two bytes (ms, little endian);
 *   op & 3 == 3: the control plane acts (next byte, see fx_control).
 * fuzz/corpus/core/ holds seeds written by fuzz/seeds.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "natlb.h"
#include "fixture.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    fx_begin((uint64_t)data[0] << 24);
    size_t i = 1;
    while (i < size) {
        uint8_t op = data[i++];
        switch (op & 3) {
        case 0:
        case 1: {
            if (i >= size)
                break;
            uint32_t len = data[i++];
            if (len > size - i)
                len = (uint32_t)(size - i);
            /* Exactly len bytes on the heap: ASan sees any read past them. */
            uint8_t *pkt = malloc(len ? len : 1);
            memcpy(pkt, data + i, len);
            i += len;
            uint32_t flags = (op & 1 ? FX_MARK_MODE : 0) | (op & 4 ? FX_FIX : 0) |
                             (op & 8 ? NL_PKT_CSUM_PARTIAL : 0) | (op & 16 ? NL_PKT_GSO : 0) |
                             (op & 32 ? NL_PKT_HEAD_ONLY : 0) |
                             (op & 64 ? NL_PKT_CSUM_VERIFIED : 0);
            fx_packet(pkt, len, flags);
            free(pkt);
            break;
        }
        case 2: {
            uint32_t ms = 0;
            if (i < size)
                ms = data[i++];
            if (i < size)
                ms |= (uint32_t)data[i++] << 8;
            fx_advance(ms);
            break;
        }
        default:
            if (i < size)
                fx_control(data[i++]);
            break;
        }
    }
    fx_end();
    return 0;
}
