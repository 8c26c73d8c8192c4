/*
 * fixture.h -- one small load balancer the fuzz targets drive: a 64-flow
 * table, a published snapshot of ten services over every scheduler and both
 * families, fragment tracking, and the oracles checked after each step.
 * Each input starts from an empty table and a fresh snapshot, so a finding
 * replays from its input alone.
 */
#ifndef NATLB_FUZZ_FIXTURE_H
#define NATLB_FUZZ_FIXTURE_H

#include <stdint.h>

/* Flags of fx_packet, on top of the NL_PKT_* ones. */
#define FX_MARK_MODE 0x100       /* nl_decide (mark mode), else nl_process */
#define FX_FIX 0x200             /* set lengths and checksums first, like a real
                                    sender, so the rewrite's sums can be checked */

/* Starts an input: empty table, fresh snapshot, clock at `now_ms`. */
void fx_begin(uint64_t now_ms);
/* One packet through the core (buf is modified; len bytes, exactly). */
void fx_packet(uint8_t *buf, uint32_t len, uint32_t flags);
/* Time passes as in a worker: failover tick, then a sweep share. */
void fx_advance(uint32_t ms);
/* The control plane acts; `op` picks what (alive, eligible, reset...). */
void fx_control(uint8_t op);
/* Ends an input: everything expires; the table must come back empty. */
void fx_end(void);
/* The fixture's load balancer (fx_begin creates it). */
struct nl_lb *fx_lb(void);
/* Aborts with a message when an oracle fails (libFuzzer saves the input). */
void fx_fail(const char *what, long detail) __attribute__((noreturn));

#endif
