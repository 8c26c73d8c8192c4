"""The only door to the C core: owns ``ffi``/``lib``, validates arguments,
turns return codes into exceptions and hands back plain Python values.

Nothing else in natlb imports ``natlb._natlb_core``.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from natlb._natlb_core import ffi, lib
from natlb.config import MAX_BACKENDS, MAX_SERVICES, MAX_WORKERS, LBConfig
from natlb.errors import HostError

if (MAX_SERVICES, MAX_BACKENDS, MAX_WORKERS) != (
        lib.NL_MAX_SERVICES, lib.NL_MAX_BACKENDS, lib.NL_MAX_WORKERS):
    raise ImportError("natlb.config's limits disagree with csrc/natlb.h: rebuild or fix them")

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
SCHEDULERS = {
    "rr": lib.NL_SCHED_RR,
    "wrr": lib.NL_SCHED_WRR,
    "lc": lib.NL_SCHED_LC,
    "sh": lib.NL_SCHED_SH,
    "maglev": lib.NL_SCHED_MAGLEV,
}
TIMEOUT_KEYS = {
    "tcp_syn": lib.NL_T_TCP_SYN,
    "tcp_established": lib.NL_T_TCP_ESTABLISHED,
    "tcp_fin": lib.NL_T_TCP_FIN,
    "tcp_close": lib.NL_T_TCP_CLOSE,
    "udp": lib.NL_T_UDP,
}
REASONS = {
    "malformed": lib.NL_R_MALFORMED,
    "fragment": lib.NL_R_FRAGMENT,
    "no_flow": lib.NL_R_NO_FLOW,
    "no_backend": lib.NL_R_NO_BACKEND,
    "table_full": lib.NL_R_TABLE_FULL,
    "not_ours": lib.NL_R_NOT_OURS,
    "truncated": lib.NL_R_TRUNCATED,
    "unsupported": lib.NL_R_UNSUPPORTED,
    "verdict_error": lib.NL_R_VERDICT_ERROR,
    "bad_checksum": lib.NL_R_BAD_CHECKSUM,
    "unmatched": lib.NL_R_UNMATCHED,
    "answer_dropped": lib.NL_R_ANSWER_DROPPED,
}
FAILOVER_COUNTERS = {
    "resteered": lib.NL_F_RESTEERED,
    "syn_resent": lib.NL_F_SYN_RESENT,
    "resets_sent": lib.NL_F_RESETS_SENT,
    "outbox_full": lib.NL_F_OUTBOX_FULL,
    "events_lost": lib.NL_F_EVENTS_LOST,
    "send_errors": lib.NL_F_SEND_ERRORS,
    "pmtu_relayed": lib.NL_F_PMTU_RELAYED,
    "held_lost": lib.NL_F_HELD_LOST,
    "adopted": lib.NL_F_ADOPTED,
    "reply_adopted": lib.NL_F_REPLY_ADOPTED,
    "late_synacks": lib.NL_F_LATE_SYNACKS,
    "answers_held": lib.NL_F_ANSWERS_HELD,
}
CONNTRACK_COUNTERS = {
    "reclaimed": lib.NL_C_RECLAIMED,
    "evicted_tcp": lib.NL_C_EVICTED_TCP,
    "evicted_udp": lib.NL_C_EVICTED_UDP,
}
FRAGMENT_COUNTERS = {
    "datagrams": lib.NL_FR_DATAGRAMS,
    "followed": lib.NL_FR_FOLLOWED,
    "held": lib.NL_FR_HELD,
    "released": lib.NL_FR_RELEASED,
    "timeouts": lib.NL_FR_TIMEOUTS,
    "incomplete": lib.NL_FR_INCOMPLETE,
    "overflow": lib.NL_FR_OVERFLOW,
    "hold_full": lib.NL_FR_HOLD_FULL,
    "untracked": lib.NL_FR_UNTRACKED,
}
EVENT_KINDS = {lib.NL_EV_SYN_RST: "syn_rst", lib.NL_EV_SYN_TIMEOUT: "syn_timeout",
               lib.NL_EV_ICMP: "icmp_unreachable"}
CHECK_ERRORS = {
    lib.NL_CHECK_LINK: "link out of range",
    lib.NL_CHECK_CYCLE: "entry reached twice",
    lib.NL_CHECK_BUCKET: "entry in the wrong chain",
    lib.NL_CHECK_STATE: "state",
    lib.NL_CHECK_COUNT: "count",
    lib.NL_CHECK_GAUGE: "backend gauge",
    lib.NL_CHECK_IDS: "ids",
    lib.NL_CHECK_NOMEM: "out of memory",
}
RAW_MARK: int = lib.NL_RAW_MARK
MARK_FORWARD: int = lib.NL_MARK_FORWARD
MARK_REPLY: int = lib.NL_MARK_REPLY
MARK_FAST: int = lib.NL_MARK_FAST
PKT_HEAD_ONLY: int = lib.NL_PKT_HEAD_ONLY
PKT_CSUM_PARTIAL: int = lib.NL_PKT_CSUM_PARTIAL
PKT_GSO: int = lib.NL_PKT_GSO
PKT_CSUM_VERIFIED: int = lib.NL_PKT_CSUM_VERIFIED
HEAD_COPY: int = lib.NL_HEAD_COPY


class Verdict(enum.IntEnum):
    ACCEPT = lib.NL_VERDICT_ACCEPT
    REWRITE = lib.NL_VERDICT_REWRITE
    DROP = lib.NL_VERDICT_DROP
    MARK = lib.NL_VERDICT_MARK
    HOLD = lib.NL_VERDICT_HOLD


STORE_RESULTS = {lib.NL_STORE_CREATED: "created", lib.NL_STORE_ADOPTED: "adopted",
                 lib.NL_STORE_COPIED: "copied", lib.NL_STORE_REFUSED: "refused"}


@dataclass(frozen=True)
class StoreReport:
    """What nl_ct_store found at the flow table's path (see csrc/ctstore.c)."""

    result: str          # created | adopted | copied | refused
    adopted: int         # flows taken over
    dropped: int         # expired, or their service or backend is gone
    old_max_flows: int   # copied: the size of the table the flows came from
    reason: str          # refused: why


class CoreError(HostError):
    """The C core refused a request (bad table, no memory, queue unavailable)."""


@dataclass(frozen=True)
class BackendEntry:
    address: str
    port: int
    weight: int
    id: int
    eligible: bool       # may take new flows
    alive: bool = True   # its flows may stay; if not, movable flows move


@dataclass(frozen=True)
class Event:
    """A passive failure the data path saw (see csrc/failover.c)."""

    kind: str            # syn_rst | syn_timeout | icmp_unreachable
    service_id: int
    backend_id: int
    time_ms: int
    client: str = ""     # the client address of the flow it was seen on


@dataclass(frozen=True)
class ServiceTable:
    """One service as the data path sees it; ``table`` indexes ``backends``."""

    vip: str
    port: int
    protocol: str
    scheduler: str
    id: int
    backends: tuple[BackendEntry, ...]
    table: tuple[int, ...] = ()
    cluster: bool = False    # several nodes carry it (csrc/cluster.c)


@dataclass(frozen=True)
class Release:
    """A held fragment's verdict, given once its first fragment came (or
    it timed out): what a worker would send for ``packet_id``."""

    packet_id: int
    verdict: Verdict
    mark: int
    packet: bytes | None     # REWRITE: the rewritten packet


@dataclass
class Counters:
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    new_flows: int = 0
    active_flows: int = 0
    inactive_flows: int = 0


# struct nl_counters as natlb.h lays it out (tests/unit/test_counter_read.py).
_COUNTERS = struct.Struct("=5Q2q")


def _timeouts_ms(timeouts_s: dict[str, float]) -> dict[str, int]:
    return {k: max(1, int(v * 1000)) for k, v in timeouts_s.items()}


_LB = LBConfig()  # the only defaults: config's


@dataclass
class CoreConfig:
    """What nl_create takes.  Built from a validated LBConfig (from_lb); the
    defaults are LBConfig's, so tests get what `natlb run` gets."""

    max_flows: int = _LB.max_flows
    workers: int = _LB.workers
    poll_us: int = _LB.poll_us
    syn_timeout_ms: int = _LB.syn_timeout_ms
    resteer_tries: int = _LB.resteer_tries
    max_fragments: int = _LB.max_fragments
    fragment_timeout_ms: int = int(_LB.timeouts_s["fragment"] * 1000)
    fastpath: bool = _LB.fastpath
    max_services: int = _LB.max_services
    max_backends: int = _LB.max_backends
    timeouts_ms: dict[str, int] = field(default_factory=lambda: _timeouts_ms(_LB.timeouts_s))

    @classmethod
    def from_lb(cls, lb: LBConfig) -> CoreConfig:
        return cls(max_flows=lb.max_flows, workers=lb.workers, poll_us=lb.poll_us,
                   syn_timeout_ms=lb.syn_timeout_ms, resteer_tries=lb.resteer_tries,
                   max_fragments=lb.max_fragments,
                   fragment_timeout_ms=max(1, int(lb.timeouts_s["fragment"] * 1000)),
                   fastpath=lb.fastpath, max_services=lb.max_services,
                   max_backends=lb.max_backends, timeouts_ms=_timeouts_ms(lb.timeouts_s))


def monotonic_ms() -> int:
    """The data path's clock: CLOCK_MONOTONIC, shared by every process
    until the next boot, so flow expiry times survive a restart."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _addr(a: str) -> dict[str, list[int]]:
    """Address text of either family as a struct nl_addr: 16 bytes in
    network order as the C side reads them (4 native words), IPv4 mapped
    (csrc/natlb.h).  An IPv4-mapped IPv6 address is refused: the C side
    would take it for the IPv4 one."""
    ip = ipaddress.ip_address(a)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise ValueError(f"{a}: an IPv4-mapped IPv6 address (use the IPv4 address)")
    raw = ip.packed if ip.version == 6 else _V4_MAPPED + ip.packed
    return {"w": list(struct.unpack("=4I", raw))}


def _unaddr(a) -> str:
    """A struct nl_addr as address text (IPv4 for a mapped address)."""
    raw = struct.pack("=4I", *a.w)
    if raw.startswith(_V4_MAPPED):
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def _port(p: int) -> int:
    return socket.htons(p)


@dataclass(frozen=True)
class ForgetKey:
    """A flow whose fast-path entries natlb wants gone (ports host order)."""

    client: str
    client_port: int
    vip: str
    vip_port: int
    backend: str
    backend_port: int
    protocol: int


class Batch:
    """Packets laid out for nl_process_many."""

    def __init__(self, packets: list[bytes], now_ms: int, flags: int = 0) -> None:
        self.n = len(packets)
        self.stride = max((len(p) for p in packets), default=1)
        self.bufs = ffi.new("uint8_t[]", self.n * self.stride)
        self.lens = ffi.new("uint32_t[]", [len(p) for p in packets])
        self.verdicts = ffi.new("uint8_t[]", max(1, self.n))
        self.now_ms = now_ms
        self.flags = flags
        self._packets = packets
        self.reset()

    def reset(self) -> None:
        """Put the original bytes back (the core rewrites in place)."""
        for i, p in enumerate(self._packets):
            ffi.memmove(self.bufs + i * self.stride, p, len(p))

    def verdict_list(self) -> list[Verdict]:
        return [Verdict(v) for v in self.verdicts[0:self.n]]


@dataclass(frozen=True)
class QueuedPacket:
    """What a worker reads from one nfnetlink queued-packet message."""

    packet_id: int
    payload: bytes | None
    flags: int


def parse_queue_message(msg: bytes) -> QueuedPacket | None:
    """Tests: the workers' parse of one NFQNL_MSG_PACKET (None: unusable)."""
    buf = ffi.new("uint8_t[]", msg) if msg else ffi.new("uint8_t[1]")
    out = ffi.new("struct nl_nfq_packet *")
    if lib.nl_nfq_parse(buf, len(msg), out) != 0:
        return None
    payload = (msg[out.payload_off:out.payload_off + out.payload_len]
               if out.has_payload else None)
    return QueuedPacket(socket.ntohl(out.packet_id), payload, out.pkt_flags)


def stall_worker(worker: int, ms: int) -> None:
    """Tests: worker `worker` of every running Core in this process sleeps
    in its loop for `ms` (0: stop stalling), as a stuck worker would
    (csrc/natlb_test.h)."""
    lib.nl_test_stall(worker, ms)


class Core:
    """A C load balancer instance: conntrack, published tables, workers."""

    def __init__(self, config: CoreConfig | None = None) -> None:
        config = config or CoreConfig()
        cfg = ffi.new("struct nl_config *")
        cfg.max_flows = config.max_flows
        cfg.n_workers = config.workers
        cfg.poll_us = config.poll_us
        cfg.syn_timeout_ms = config.syn_timeout_ms
        cfg.resteer_tries = config.resteer_tries
        cfg.max_fragments = config.max_fragments
        cfg.fragment_timeout_ms = config.fragment_timeout_ms
        cfg.fastpath = int(config.fastpath)
        cfg.max_services = config.max_services
        cfg.max_backends = config.max_backends
        for name, idx in TIMEOUT_KEYS.items():
            cfg.timeout_ms[idx] = config.timeouts_ms[name]
        lb = lib.nl_create(cfg)
        if lb == ffi.NULL:
            raise CoreError(f"cannot create the data path (max_flows={config.max_flows}, "
                            f"workers={config.workers})")
        self._lb = ffi.gc(lb, lib.nl_destroy)
        self.workers = config.workers
        self.max_services, self.max_backends = config.max_services, config.max_backends
        self.running = False

    def close(self) -> None:
        if self._lb is not None:
            self.stop()
            lb, self._lb = self._lb, None
            ffi.gc(lb, None)  # detach the finalizer: we free it now, once
            lib.nl_destroy(lb)

    # -- publishing -------------------------------------------------------
    def publish(self, services: list[ServiceTable]) -> None:
        """Atomically replace every service table the data path uses."""
        snap = lib.nl_snapshot_new(len(services))
        if snap == ffi.NULL:
            raise CoreError(f"cannot allocate a snapshot of {len(services)} services")
        try:
            for i, s in enumerate(services):
                try:
                    vip = _addr(s.vip)
                    addrs = [_addr(b.address) for b in s.backends]
                except ValueError as e:
                    raise CoreError(f"service {s.vip}:{s.port}/{s.protocol}: {e}") from None
                spec = ffi.new("struct nl_service_spec *", {
                    "vip": vip, "port": _port(s.port),
                    "proto": PROTOCOLS[s.protocol], "scheduler": SCHEDULERS[s.scheduler],
                    "id": s.id, "flags": lib.NL_SVC_CLUSTER if s.cluster else 0,
                })
                bes = ffi.new("struct nl_backend_spec[]", max(1, len(s.backends)))
                for j, b in enumerate(s.backends):
                    bes[j].addr = addrs[j]
                    bes[j].port = _port(b.port)
                    bes[j].weight = b.weight
                    bes[j].id = b.id
                    bes[j].flags = ((lib.NL_BE_ELIGIBLE if b.eligible else 0)
                                    | (lib.NL_BE_ALIVE if b.alive else 0))
                table = ffi.new("uint16_t[]", list(s.table) or [0])
                rc = lib.nl_snapshot_set_service(snap, i, spec, bes, len(s.backends),
                                                 table, len(s.table))
                if rc != 0:
                    raise CoreError(f"service {s.vip}:{s.port}/{s.protocol}: table rejected "
                                    "(bad table, or backends of another address family)")
        except BaseException:
            lib.nl_snapshot_free(snap)
            raise
        if lib.nl_publish(self._lb, snap) != 0:
            lib.nl_snapshot_free(snap)
            raise CoreError("snapshot rejected (duplicate service?)")

    # -- sans-IO data path (tests, tools) ---------------------------------
    @staticmethod
    def _buffer(packet: bytes):  # cffi cannot make a zero-length array
        return ffi.new("uint8_t[]", packet) if packet else ffi.new("uint8_t[1]")

    def process(self, packet: bytes, now_ms: int, flags: int = 0,
                packet_id: int | None = None) -> tuple[Verdict, bytes]:
        """Run one packet through the data path, as a worker would.  With a
        packet_id the core may hold it (Verdict.HOLD; see take_released)."""
        buf = self._buffer(packet)
        pid = lib.NL_NO_PACKET_ID if packet_id is None else packet_id
        v = lib.nl_process_id(self._lb, self.workers, buf, len(packet), flags, now_ms, pid)
        return Verdict(v), bytes(ffi.buffer(buf, len(packet)))

    def decide(self, packet: bytes, now_ms: int, flags: int = 0,
               packet_id: int | None = None) -> tuple[Verdict, int]:
        """Mark mode: the verdict and the mark that tells nft what to rewrite."""
        buf = self._buffer(packet)
        mark = ffi.new("uint32_t *")
        pid = lib.NL_NO_PACKET_ID if packet_id is None else packet_id
        v = lib.nl_decide_id(self._lb, self.workers, buf, len(packet), flags, now_ms, pid, mark)
        return Verdict(v), mark[0]

    def observe_new(self, packet: bytes, backend_id: int, now_ms: int, flags: int = 0,
                    sent_csum: int | None = None, placed_ms: int = 0) -> bool:
        """A new flow's first packet the kernel placed on backend_id: natlb's
        flow made as if it had queued it and chosen that.  True if natlb
        took it (the kernel may carry the flow).  sent_csum: the L4
        checksum field the kernel sent it on with, placed_ms when (its
        record says; 0: not known)."""
        buf = self._buffer(packet)
        sent = 0xFFFFFFFF if sent_csum is None else sent_csum
        return bool(lib.nl_observe_new(self._lb, buf, len(packet), flags, backend_id, sent,
                                       placed_ms, now_ms))

    def deferred_retry(self, now_ms: int) -> int:
        """The observer round's last step: the answers held back while the
        kernel decides, each decided again; how many were sent on."""
        return int(lib.nl_retry_deferred(self._lb, now_ms))

    def observe(self, packet: bytes, now_ms: int, flags: int = 0) -> bool:
        """A FIN or RST the kernel carried alone: applied to its flow as
        decide would, nothing sent.  True if it was applied to a flow."""
        buf = self._buffer(packet)
        return bool(lib.nl_observe(self._lb, buf, len(packet), flags, now_ms))

    def process_many(self, packets: list[bytes], now_ms: int, flags: int = 0) -> Batch:
        """Prepare a batch for process_batch (the buffers are reused)."""
        return Batch(packets, now_ms, flags)

    def process_batch(self, batch: Batch) -> int:
        """Run a prepared batch through the core in one call; returns rewrites.
        Packets are rewritten in place, so a batch run twice sees its own
        output the second time (fine for replies and established flows)."""
        return lib.nl_process_many(self._lb, self.workers, batch.bufs, batch.stride, batch.lens,
                                   batch.verdicts, batch.n, batch.flags, batch.now_ms)

    def sweep(self, now_ms: int, max_buckets: int = 1 << 30) -> int:
        return lib.nl_ct_sweep(self._lb, now_ms, max_buckets)

    def flow_count(self) -> int:
        return lib.nl_ct_count(self._lb)

    def conntrack_counters(self) -> dict[str, int]:
        """Expired flows reclaimed early and embryonic flows evicted (full table)."""
        out = ffi.new("uint64_t[]", lib.NL_C_MAX)
        lib.nl_read_conntrack(self._lb, out)
        return {name: out[idx] for name, idx in CONNTRACK_COUNTERS.items()}

    def conntrack_memory(self) -> int:
        return lib.nl_ct_memory(self._lb)

    @staticmethod
    def entry_size() -> int:
        return lib.nl_ct_entry_size()

    def check_table(self) -> None:
        """Tests: raise CoreError if a conntrack invariant is broken
        (csrc/natlb_test.h). Only while no worker runs."""
        if self._lb is None or self.running:
            raise CoreError("check_table needs an open core with no worker running")
        rc = lib.nl_ct_check(self._lb)
        if rc != lib.NL_CHECK_OK:
            raise CoreError(f"conntrack invariant broken: {CHECK_ERRORS.get(rc, rc)}")

    # -- IP fragments -----------------------------------------------------
    def take_released(self) -> list[Release]:
        """Held fragments whose verdict is now known (as a worker takes them)."""
        out = []
        rel = ffi.new("struct nl_release *")
        buf = ffi.new("uint8_t[]", 65536)
        while lib.nl_frag_take(self._lb, self.workers, rel, buf, 65536):
            pkt = bytes(ffi.buffer(buf, rel.len)) if rel.verdict == Verdict.REWRITE else None
            out.append(Release(rel.packet_id, Verdict(rel.verdict), rel.mark, pkt))
        return out

    def fragment_tick(self, now_ms: int) -> None:
        lib.nl_frag_tick(self._lb, now_ms)

    def fragment_counters(self) -> dict[str, int]:
        out = ffi.new("uint64_t[]", lib.NL_FR_MAX)
        lib.nl_read_fragments(self._lb, out)
        return {name: out[idx] for name, idx in FRAGMENT_COUNTERS.items()}

    def fragments_tracked(self) -> int:
        return lib.nl_frag_count(self._lb)

    def fragments_held(self) -> int:
        return lib.nl_frag_held(self._lb)

    def fragment_memory(self) -> int:
        return lib.nl_frag_memory(self._lb)

    @staticmethod
    def fragment_entry_size() -> int:
        return lib.nl_frag_entry_size()

    # -- counters ---------------------------------------------------------
    def _read(self, fn, n: int) -> list[Counters]:
        out = ffi.new("struct nl_counters[]", max(1, n))
        fn(self._lb, out, n)
        # Unpacked from the bytes at once: reading each field through cffi
        # took most of a status at 65,536 backends.
        return [Counters(*c) for c in _COUNTERS.iter_unpack(ffi.buffer(out, n * _COUNTERS.size))]

    def service_counters(self, n: int | None = None) -> list[Counters]:
        return self._read(lib.nl_read_services, self.max_services if n is None else n)

    def backend_counters(self, n: int | None = None) -> list[Counters]:
        return self._read(lib.nl_read_backends, self.max_backends if n is None else n)

    def seed_counters(self, backend: bool, id: int, c: Counters) -> None:
        """Continue a predecessor's traffic counts (natlb restart)."""
        cc = ffi.new("struct nl_counters *", {
            "packets_in": c.packets_in, "bytes_in": c.bytes_in, "packets_out": c.packets_out,
            "bytes_out": c.bytes_out, "new_flows": c.new_flows})
        lib.nl_seed_counters(self._lb, int(backend), id, cc)

    def reasons(self) -> dict[str, int]:
        out = ffi.new("uint64_t[]", lib.NL_R_MAX)
        lib.nl_read_reasons(self._lb, out)
        return {name: out[idx] for name, idx in REASONS.items()}

    def io(self) -> tuple[int, int]:
        p = ffi.new("uint64_t *")
        b = ffi.new("uint64_t *")
        lib.nl_read_io(self._lb, p, b)
        return p[0], b[0]

    # -- failover ---------------------------------------------------------
    def event_fd(self) -> int:
        return lib.nl_event_fd(self._lb)

    def read_events(self, max_events: int = 256) -> list[Event]:
        """Every waiting event, oldest first (in rounds of max_events)."""
        out = ffi.new("struct nl_event[]", max_events)
        events: list[Event] = []
        while True:
            n = lib.nl_read_events(self._lb, out, max_events)
            events += [Event(EVENT_KINDS.get(e.kind, str(e.kind)), e.service_id,
                             e.backend_id, e.time_ms, _unaddr(e.client_addr))
                       for e in out[0:n]]
            if n < max_events:
                return events

    def failover_tick(self, now_ms: int) -> None:
        lib.nl_failover_tick(self._lb, now_ms)

    def reset_backend(self, backend_id: int) -> int:
        """RST the TCP flows of a backend (client and backend side)."""
        return lib.nl_reset_backend(self._lb, backend_id)

    def outbox_take(self) -> bytes | None:
        """The oldest packet natlb queued to send itself (when no worker runs)."""
        buf = ffi.new("uint8_t[]", 256)
        n = lib.nl_outbox_take(self._lb, buf, 256)
        return bytes(ffi.buffer(buf, n)) if n else None

    # -- the core's side of the fast path (the observer thread, or tests) --

    def fp_forget_take(self, max_keys: int = 64) -> tuple[list[ForgetKey], bool]:
        """Flows natlb moved whose kernel entries must go, and whether
        some were lost (then every entry must go)."""
        out = ffi.new("struct nl_fp_forget[]", max_keys)
        overflow = ffi.new("int *")
        n = lib.nl_fp_forget_take(self._lb, out, max_keys, overflow)
        keys = [ForgetKey(_unaddr(k.client_addr), _port(k.client_port), _unaddr(k.vip_addr),
                          _port(k.vip_port), _unaddr(k.backend_addr), _port(k.backend_port),
                          k.proto)
                for k in out[0:n]]
        return keys, bool(overflow[0])

    def fp_observing(self, on: bool) -> None:
        lib.nl_fp_observing(self._lb, int(on))

    def fp_sync_wanted(self) -> int:
        return lib.nl_fp_sync_wanted(self._lb)

    def fp_sync_done(self, req: int) -> None:
        lib.nl_fp_sync_done(self._lb, req)

    def failover_counters(self) -> dict[str, int]:
        out = ffi.new("uint64_t[]", lib.NL_F_MAX)
        lib.nl_read_failover(self._lb, out)
        return {name: out[idx] for name, idx in FAILOVER_COUNTERS.items()}

    # -- a flow table that outlives the process ---------------------------
    def store(self, path: str, now_ms: int | None = None) -> StoreReport:
        """Put the flow table in the file at `path`, adopting the table a
        previous natlb left there when it can.  After the first publish."""
        if now_ms is None:
            now_ms = monotonic_ms()
        out = ffi.new("struct nl_store_report *")
        if lib.nl_ct_store(self._lb, path.encode(), now_ms, out) != 0:
            raise CoreError(f"flow table {path}: {ffi.string(out.reason).decode()}")
        return StoreReport(STORE_RESULTS[out.result], out.adopted, out.dropped,
                           out.old_max_flows, ffi.string(out.reason).decode())

    def readopt(self, now_ms: int | None = None) -> StoreReport:
        """Take the flow table back from a successor that adopted it in
        place and then failed (its ids are written back to ours)."""
        out = ffi.new("struct nl_store_report *")
        if lib.nl_ct_readopt(self._lb, monotonic_ms() if now_ms is None else now_ms, out):
            raise CoreError(f"flow table: {ffi.string(out.reason).decode()}")
        return StoreReport(STORE_RESULTS[out.result], out.adopted, out.dropped,
                           out.old_max_flows, ffi.string(out.reason).decode())

    @staticmethod
    def layout() -> int:
        return lib.nl_ct_layout()

    @staticmethod
    def layout_v2() -> int:
        """Tests: the layout id of the last flow table before IPv6, which
        store() converts (csrc/ctstore.c)."""
        return lib.nl_ct_layout_v2()

    # -- NFQUEUE workers --------------------------------------------------
    def start(self, queues: list[int], gso: bool = False, mark: bool = True,
              paused: bool = False) -> None:
        err = ffi.new("char[]", 256)
        qs = ffi.new("uint16_t[]", queues)
        flags = ((lib.NL_START_GSO if gso else 0) | (lib.NL_START_MARK if mark else 0)
                 | (lib.NL_START_PAUSED if paused else 0))
        rc = lib.nl_start(self._lb, qs, len(queues), flags, err, 256)
        if rc != 0:
            raise CoreError(ffi.string(err).decode())
        self.running = True

    def worker_beats(self) -> list[int]:
        """When each running worker last went round its loop (monotonic_ms
        clock); [] when no worker runs."""
        out = ffi.new("uint64_t[]", lib.NL_MAX_WORKERS)
        n = lib.nl_worker_beats(self._lb, out, lib.NL_MAX_WORKERS)
        return list(out[0:n])

    def resume(self) -> None:
        """Workers started paused begin reading their queues."""
        lib.nl_resume(self._lb)

    def forward_to(self, queues: list[int], wait_ms: int = 2000) -> None:
        """Handover: pass every packet on to `queues` undecided; returns once
        no worker decides any more (the flow table is then left alone)."""
        qs = ffi.new("uint16_t[]", queues or [0])
        if lib.nl_forward(self._lb, qs, len(queues), wait_ms) != 0:
            raise CoreError(f"workers did not switch to forwarding within {wait_ms} ms")

    def stop(self) -> None:
        if self.running:
            lib.nl_stop(self._lb)
            self.running = False


# -- the tc fast path (csrc/tcfast.c) ---------------------------------------

FASTPATH_OBJECT = Path(__file__).resolve().parent / "_fastpath.bpf.o"
# fastpath.h NL_FP_STAT_*, in order.
FP_STATS = ("ring_full", "decided", "fallback_ring", "fallback_map", "fallback_route",
            "fallback_packet", "fallback_stale")


@dataclass(frozen=True)
class ProgRun:
    """One BPF_PROG_TEST_RUN of a fast-path program."""

    retval: int          # TC_ACT_*
    packet: bytes        # the frame after the program
    mark: int            # skb->mark after it


class FastPath:
    """The loaded BPF object of the tc fast path: attach it to interfaces,
    fill its backend slots, empty its flows, read its counters."""

    def __init__(self, max_backends: int, max_flows: int, tcp_lifetime_ms: int,
                 udp_lifetime_ms: int, tcp_closing_ms: int | None = None,
                 path: Path = FASTPATH_OBJECT, syn_lifetime_ms: int = 5_000,
                 synack_window_ms: int = 75, max_services: int = 4096,
                 decide_slots: int = 1 << 20) -> None:
        err = ffi.new("char[]", 256)
        closing = tcp_lifetime_ms if tcp_closing_ms is None else tcp_closing_ms
        fp = lib.nl_fp_open(str(path).encode(), max_backends, max_flows,
                            tcp_lifetime_ms * 1_000_000, udp_lifetime_ms * 1_000_000,
                            closing * 1_000_000, syn_lifetime_ms * 1_000_000,
                            synack_window_ms * 1_000_000, max_services, decide_slots,
                            err, 256)
        if fp == ffi.NULL:
            raise CoreError(f"fast path: {ffi.string(err).decode()}")
        self._fp = ffi.gc(fp, lib.nl_fp_close)
        self.max_backends = max_backends
        self._observed: Core | None = None

    def close(self) -> None:
        if self._fp is not None:
            fp, self._fp = self._fp, None
            ffi.gc(fp, None)
            lib.nl_fp_close(fp)

    def observe(self, core: Core) -> None:
        """Applies every FIN and RST the kernel carries to core's flows, from
        a C thread, until stop_observing (before core closes)."""
        rc = lib.nl_fp_observe_start(self._fp, core._lb)
        if rc:
            raise CoreError(f"fast path: reading its events: {os.strerror(-rc)}")
        self._observed = core      # core outlives the thread that uses it

    def stop_observing(self) -> None:
        if self._fp is not None:
            lib.nl_fp_observe_stop(self._fp)
        self._observed = None

    def set_decide(self, on: bool) -> None:
        """The kernel places new flows' first packets itself (on), or
        queues them to natlb (off)."""
        lib.nl_fp_set_decide(self._fp, int(on))

    def publish(self, core: Core) -> tuple[int, int]:
        """core's published services the kernel may decide, with their
        tables, into its maps: (services placed, services whose table
        found no room)."""
        placed, too_big = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        rc = lib.nl_fp_publish(self._fp, core._lb, placed, too_big)
        if rc:
            raise CoreError(f"fast path: publishing its services: {os.strerror(-rc)}")
        return placed[0], too_big[0]

    def stats(self) -> dict[str, int]:
        """The programs' own counters: first packets placed, and those
        queued instead by reason."""
        out = ffi.new("uint64_t[]", len(FP_STATS))
        rc = lib.nl_fp_stats(self._fp, out, len(FP_STATS))
        if rc:
            raise CoreError(f"fast path: reading its stats: {os.strerror(-rc)}")
        return dict(zip(FP_STATS, out, strict=True))

    def placed_counts(self) -> tuple[int, int]:
        """(first packets the kernel placed that natlb applied, those it
        refused: their entries forgotten)."""
        applied, refused = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.nl_fp_placed_counts(self._fp, applied, refused)
        return applied[0], refused[0]

    def read_records(self, max_records: int = 4096) -> list[tuple[int, bytes, int, int | None]]:
        """Tests (no observer): as read_events, and the backend id a
        record of a first packet the kernel placed names (else None)."""
        out = ffi.new("struct nl_fp_record[]", max_records)
        n = lib.nl_fp_read_events(self._fp, out, max_records)
        if n < 0:
            raise CoreError(f"fast path: reading its events: {os.strerror(-n)}")
        return [(out[i].ifindex, bytes(ffi.buffer(out[i].head, out[i].len)), out[i].tot_len,
                 None if out[i].new_backend == 0xFFFFFFFF else out[i].new_backend)
                for i in range(n)]

    def observe_counts(self) -> tuple[int, int]:
        """(records applied to a flow, records that changed nothing)."""
        applied, ignored = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.nl_fp_observe_counts(self._fp, applied, ignored)
        return applied[0], ignored[0]

    def ring_full(self) -> int:
        """Packets the kernel queued instead of carrying them: no room in
        the ring for their record."""
        n = lib.nl_fp_ring_full(self._fp)
        if n < 0:
            raise CoreError(f"fast path: reading its stats: {os.strerror(-n)}")
        return n

    def read_events(self, max_records: int = 4096) -> list[tuple[int, bytes, int]]:
        """Tests (no observer): the waiting records as (ifindex, head,
        the IP packet's whole length)."""
        out = ffi.new("struct nl_fp_record[]", max_records)
        n = lib.nl_fp_read_events(self._fp, out, max_records)
        if n < 0:
            raise CoreError(f"fast path: reading its events: {os.strerror(-n)}")
        return [(out[i].ifindex, bytes(ffi.buffer(out[i].head, out[i].len)), out[i].tot_len)
                for i in range(n)]

    def attach(self, ifindex: int, handle: int, priority: int) -> bool:
        """Our filters on ifindex's ingress and egress; True if we created
        its clsact qdisc."""
        created = ffi.new("int *")
        rc = lib.nl_fp_attach(self._fp, ifindex, handle, priority, created)
        if rc:
            raise CoreError(f"fast path: attaching to ifindex {ifindex}: "
                            f"{os.strerror(-rc)}")
        return bool(created[0])

    @staticmethod
    def detach(ifindex: int, handle: int, priority: int, destroy_qdisc: bool) -> None:
        rc = lib.nl_fp_detach(ifindex, handle, priority, int(destroy_qdisc))
        if rc:
            raise CoreError(f"fast path: detaching from ifindex {ifindex}: "
                            f"{os.strerror(-rc)}")

    def set_backend(self, id: int, vip: str, vport: int, addr: str, port: int,
                    protocol: int) -> None:
        rc = lib.nl_fp_set_backend(self._fp, id, ffi.new("struct nl_addr *", _addr(vip)),
                                   _port(vport), ffi.new("struct nl_addr *", _addr(addr)),
                                   _port(port), protocol)
        if rc:
            raise CoreError(f"fast path: backend slot {id}: {os.strerror(-rc)}")

    def clear_backend(self, id: int) -> None:
        rc = lib.nl_fp_set_backend(self._fp, id, ffi.NULL, 0, ffi.NULL, 0, 0)
        if rc:
            raise CoreError(f"fast path: backend slot {id}: {os.strerror(-rc)}")

    def flush(self) -> int:
        n = lib.nl_fp_flush(self._fp)
        if n < 0:
            raise CoreError(f"fast path: emptying the flows: {os.strerror(-n)}")
        return n

    def flush_backends(self, ids: Iterable[int]) -> int:
        """Forgets the flows of these backends; the live entries made dead."""
        want = list(set(ids))    # nl_fp_flush_backends sorts them for its search
        n = lib.nl_fp_flush_backends(self._fp, ffi.new("uint32_t[]", want), len(want))
        if n < 0:
            raise CoreError(f"fast path: forgetting backends {sorted(want)}'s flows: "
                            f"{os.strerror(-n)}")
        return n

    def flush_interface(self, ifindex: int) -> int:
        """Forgets the flows carried in from or out to ifindex."""
        n = lib.nl_fp_flush_ifindex(self._fp, ifindex)
        if n < 0:
            raise CoreError(f"fast path: forgetting ifindex {ifindex}'s flows: "
                            f"{os.strerror(-n)}")
        return n

    def flow_count(self) -> int:
        return lib.nl_fp_flow_count(self._fp)

    def has_flow(self, saddr: str, daddr: str, sport: int, dport: int, protocol: int) -> bool:
        return bool(lib.nl_fp_has_flow(self._fp, ffi.new("struct nl_addr *", _addr(saddr)),
                                       ffi.new("struct nl_addr *", _addr(daddr)), _port(sport),
                                       _port(dport), protocol))

    def counters(self, n_backends: int | None = None) -> dict[int, tuple[int, int, int, int]]:
        """Backend id -> (packets in, bytes in, packets out, bytes out)
        carried, those with any."""
        n = self.max_backends if n_backends is None else min(n_backends, self.max_backends)
        out = ffi.new("uint64_t[]", 4 * n)
        rc = lib.nl_fp_read_counters(self._fp, out, n)
        if rc:
            raise CoreError(f"fast path: reading counters: {os.strerror(-rc)}")
        return {i: (out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3])
                for i in range(n) if out[4 * i] or out[4 * i + 2]}

    def test_run(self, egress: bool, frame: bytes, mark: int = 0, ifindex: int = 0,
                 ingress_ifindex: int = 0, gso_size: int = 0) -> ProgRun:
        """Tests: run learn (egress) or carry on one Ethernet frame; with
        gso_size, as a GSO packet of segments of that payload size."""
        cap = len(frame) + 256
        out = ffi.new("uint8_t[]", cap)
        out_len = ffi.new("uint32_t *", cap)
        retval = ffi.new("uint32_t *")
        mark_out = ffi.new("uint32_t *")
        rc = lib.nl_fp_test_run(self._fp, int(egress), frame, len(frame), out, out_len, mark,
                                ifindex, ingress_ifindex, gso_size, retval, mark_out)
        if rc:
            raise CoreError(f"fast path test run: {os.strerror(-rc)}")
        return ProgRun(retval[0], bytes(ffi.buffer(out, out_len[0])), mark_out[0])

    def test_ring_fd(self) -> int:
        """Tests: the records' ring, to watch with epoll for the kernel's wakeups."""
        return lib.nl_fp_test_ring_fd(self._fp)

    def test_polling(self, on: bool) -> None:
        """Tests: say the observer polls (busy), as its loop does."""
        lib.nl_fp_test_polling(self._fp, int(on))
