"""Programs that run inside the testbed's namespaces (``python -m
natlb_testbed.hosts ...``): a backend serving HTTP and UDP echo that answer
with its own name, and client load generators that print one JSON line per
result.  Used by the integration tests, ``natlb demo`` and the benchmarks."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import select
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK = 1 << 16


def blob_chunks(size: int, seed: int):
    rnd = random.Random(seed)
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield rnd.randbytes(n)
        left -= n


REVERSED = b"reversed:"   # a UDP query so marked is answered with its fragments reversed


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def ip_fragments(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int,
                 mtu: int = 1500) -> list[bytes]:
    """A UDP datagram as the IPv4 fragments a host would send (in order)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    head = struct.pack("!HHHH", sport, dport, ulen, 0)
    csum = _csum(pseudo + head + payload) or 0xffff
    l4 = struct.pack("!HHHH", sport, dport, ulen, csum) + payload
    step = (mtu - 20) // 8 * 8
    out = []
    for off in range(0, len(l4), step):
        chunk = l4[off:off + step]
        more = 0x2000 if off + step < len(l4) else 0
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), ident, more | off // 8, 64,
                          socket.IPPROTO_UDP, 0, s, d)
        out.append(hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + chunk)
    return out


def ip6_fragments(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int,
                  mtu: int = 1500) -> list[bytes]:
    """A UDP datagram as the IPv6 fragments a host would send (in order):
    each a fixed header and a fragment header (next header 44)."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    ulen = 8 + len(payload)
    pseudo = s + d + struct.pack("!I3xB", ulen, socket.IPPROTO_UDP)
    csum = _csum(pseudo + struct.pack("!HHHH", sport, dport, ulen, 0) + payload) or 0xffff
    l4 = struct.pack("!HHHH", sport, dport, ulen, csum) + payload
    step = (mtu - 40 - 8) // 8 * 8
    out = []
    for off in range(0, len(l4), step):
        chunk = l4[off:off + step]
        more = 1 if off + step < len(l4) else 0
        frag = struct.pack("!BBHI", socket.IPPROTO_UDP, 0, off | more, ident)
        hdr = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(chunk), 44, 64, s, d)
        out.append(hdr + frag + chunk)
    return out


def is_ipv6(address: str) -> bool:
    return ":" in address


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if is_ipv6(address) else f"{address}:{port}"


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if is_ipv6(address) else socket.AF_INET


def send_reversed(src: str, dst: str, sport: int, dport: int, payload: bytes) -> None:
    """Send a datagram as fragments, last first: its first fragment comes
    after all the others (a raw socket; needs root, as in the testbed)."""
    make = ip6_fragments if is_ipv6(dst) else ip_fragments
    frags = make(src, dst, sport, dport, payload, random.randrange(1, 65536))
    with socket.socket(_family(dst), socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for f in reversed(frags):
            raw.sendto(f, (dst, 0))


def _source_for(dst: str) -> str:
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        s.connect((dst, 9))
        return s.getsockname()[0]


def serve(name: str, http_port: int, udp_port: int) -> int:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def _send(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/blob/"):
                _, _, size, seed = self.path.split("/")
                self.send_response(200)
                self.send_header("Content-Length", size)
                self.end_headers()
                for c in blob_chunks(int(size), int(seed)):
                    self.wfile.write(c)
                return
            self._send(f"{name}\n".encode())

        def do_POST(self) -> None:
            left = int(self.headers["Content-Length"])
            h = hashlib.sha256()
            while left:
                c = self.rfile.read(min(CHUNK, left))
                if not c:
                    break
                h.update(c)
                left -= len(c)
            self._send(f"{name} {h.hexdigest()}\n".encode())

    class Server(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            # Health checks close with RST on purpose; that is not an error.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    class Server6(Server):
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            # The IPv4 server has the port on 0.0.0.0: this one takes IPv6 only.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()

    httpd = Server(("0.0.0.0", http_port), Handler)
    httpd6 = Server6(("::", http_port), Handler)
    threading.Thread(target=httpd6.serve_forever, daemon=True).start()

    def echo(udp: socket.socket) -> None:
        while True:
            data, peer = udp.recvfrom(65535)
            answer = f"{name}:".encode() + data
            if data.startswith(REVERSED):
                send_reversed(_source_for(peer[0]), peer[0], udp_port, peer[1], answer)
            else:
                udp.sendto(answer, peer)

    for af, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        udp = socket.socket(af, socket.SOCK_DGRAM)
        if af == socket.AF_INET6:
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        udp.bind((any_addr, udp_port))
        threading.Thread(target=echo, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    httpd.serve_forever()
    return 0


def _emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


_print_lock = threading.Lock()


def _emit_locked(**kw: object) -> None:
    with _print_lock:
        _emit(**kw)


def http_stream(host: str, port: int, count: int, interval_ms: int, timeout: float) -> int:
    """One new TCP connection per request, started on schedule whatever the
    earlier ones are doing (a hung connection does not delay the next);
    lines come out as connections finish."""
    start = time.monotonic()

    def one(i: int) -> None:
        t0 = time.monotonic()
        wall = time.time()
        stage = "connect"  # a failure here is a new connection lost; later, an established one
        try:
            c = http.client.HTTPConnection(host, port, timeout=timeout)
            c.connect()
            stage = "request"
            c.request("GET", "/", headers={"Connection": "close"})
            body = c.getresponse().read().decode().strip()
            c.close()
            _emit_locked(i=i, t=round(t0 - start, 4), wall=wall, ok=True, backend=body,
                         ms=round((time.monotonic() - t0) * 1000, 2))
        except (OSError, http.client.HTTPException) as e:
            _emit_locked(i=i, t=round(t0 - start, 4), wall=wall, ok=False, stage=stage,
                         error=type(e).__name__, ms=round((time.monotonic() - t0) * 1000, 2))

    threads = []
    for i in range(count):
        due = start + i * interval_ms / 1000
        time.sleep(max(0.0, due - time.monotonic()))
        t = threading.Thread(target=one, args=(i,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return 0


def udp_stream(host: str, port: int, count: int, interval_ms: int, timeout: float,
               same_socket: bool = False) -> int:
    """One new UDP socket (so a new flow) per query; or, with same_socket,
    every query from one socket (one flow)."""
    start = time.monotonic()
    shared = socket.socket(_family(host), socket.SOCK_DGRAM) if same_socket else None
    for i in range(count):
        due = start + i * interval_ms / 1000
        time.sleep(max(0.0, due - time.monotonic()))
        t0 = time.monotonic()
        s = shared or socket.socket(_family(host), socket.SOCK_DGRAM)
        try:
            s.settimeout(timeout)
            payload = f"q{i}".encode()
            s.sendto(payload, (host, port))
            while True:    # past a late answer to an earlier query
                data, peer = s.recvfrom(65535)
                name, _, echoed = data.partition(b":")
                if echoed == payload or not same_socket:
                    break
            _emit(i=i, t=round(t0 - start, 4), ok=echoed == payload,
                  backend=name.decode(), peer=host_port(peer[0], peer[1]))
        except OSError as e:
            _emit(i=i, t=round(t0 - start, 4), ok=False, error=type(e).__name__)
        finally:
            if shared is None:
                s.close()
    if shared is not None:
        shared.close()
    return 0


def udp_sizes(host: str, port: int, sizes: list[int], count: int, timeout: float,
              reverse: bool) -> int:
    """`count` datagrams of each size, each from a new socket (a new flow),
    checked byte for byte in the echo.  With `reverse`, the query goes out
    as fragments last-first and the backend answers the same way."""
    rnd = random.Random(1)
    for size in sizes:
        for i in range(count):
            payload = rnd.randbytes(size)
            if reverse:
                payload = REVERSED + payload[len(REVERSED):]
            with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                try:
                    if reverse:
                        s.bind((_source_for(host), 0))
                        src, sport = s.getsockname()[:2]
                        send_reversed(src, host, sport, port, payload)
                    else:
                        s.sendto(payload, (host, port))
                    data, peer = s.recvfrom(65535)
                    name, _, echoed = data.partition(b":")
                    _emit(size=size, i=i, ok=echoed == payload, backend=name.decode(),
                          peer=host_port(peer[0], peer[1]))
                except OSError as e:
                    _emit(size=size, i=i, ok=False, error=type(e).__name__)
    return 0


def _get(s: socket.socket) -> str:
    """One keep-alive GET on s; the body (the backend's name)."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: natlb\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed before the answer")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed before the answer")
        body += chunk
    return body.decode().strip()


def hold(host: str, port: int, timeout: float, probe: bool = False) -> int:
    """Open a keep-alive connection, learn its backend, then sit idle and
    report how the connection ends: reset, closed, or still open at timeout.
    With probe, a line on stdin ends the wait early: the connection asks
    again and reports "answered" (and by whom) if it still works, so a test
    asserts that it survived instead of waiting out the timeout."""
    s = socket.create_connection((host, port), timeout=10)
    _emit(backend=_get(s))
    t0 = time.monotonic()
    waits = [s, sys.stdin] if probe else [s]
    ready, _, _ = select.select(waits, [], [], timeout)
    extra: dict[str, object] = {}
    try:
        if s in ready:
            outcome = "closed" if not s.recv(1) else "data"
        elif ready:
            extra["backend"] = _get(s)
            outcome = "answered"
        else:
            outcome = "open"
    except ConnectionResetError:
        outcome = "reset"
    except TimeoutError:
        outcome = "open"
    _emit(outcome=outcome, after=round(time.monotonic() - t0, 3), **extra)
    return 0


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def spoofed_syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """An IPv4 TCP SYN with both checksums right: natlb takes it as real."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", _csum(saddr + daddr + b"\0\x06\0\x14" + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, seq & 0xFFFF, 0, 64, 6, 0, saddr, daddr)
    return ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:] + tcp


def syn_flood(host: str, port: int, count: int, seconds: float) -> int:
    """`count` SYNs from spoofed 198.51.100.10-249 addresses (a documentation
    range, inside the test's namespace), evenly over `seconds`: bounded in
    number and time."""
    rng = random.Random(9)
    pkts = [spoofed_syn(f"198.51.100.{rng.randrange(10, 250)}", host,
                        rng.randrange(1024, 65536), port, rng.getrandbits(32))
            for _ in range(count)]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    start = time.monotonic()
    sent = 0
    for i, pkt in enumerate(pkts):
        due = start + seconds * i / count
        if (delay := due - time.monotonic()) > 0.001:
            time.sleep(delay)
        try:
            s.sendto(pkt, (host, 0))
            sent += 1
        except OSError:
            pass
    s.close()
    _emit(sent=sent, seconds=round(time.monotonic() - start, 3))
def churn(host: str, port: int, keepalive: int, interval_ms: int, seconds: float,
          timeout: float) -> int:
    """`keepalive` connections, each sending a request every 20 ms over the
    same connection, plus a new connection every `interval_ms`, for
    `seconds`.  One JSON summary: keep-alive connections lost (any error,
    never reconnected), new connections failed, and those slower than 1 s
    (a client retransmit)."""
    stop = time.monotonic() + seconds
    lost: list[str] = []
    requests = [0]
    new: list[tuple[bool, float]] = []
    lock = threading.Lock()

    def keep(k: int) -> None:
        try:
            c = http.client.HTTPConnection(host, port, timeout=timeout)
            while time.monotonic() < stop:
                c.request("GET", "/")
                c.getresponse().read()
                with lock:
                    requests[0] += 1
                time.sleep(0.02)
            c.close()
        except (OSError, http.client.HTTPException) as e:
            with lock:
                lost.append(f"{k}: {type(e).__name__}")

    def one() -> None:
        t0 = time.monotonic()
        ok = True
        try:
            c = http.client.HTTPConnection(host, port, timeout=timeout)
            c.request("GET", "/", headers={"Connection": "close"})
            c.getresponse().read()
            c.close()
        except (OSError, http.client.HTTPException):
            ok = False
        with lock:
            new.append((ok, time.monotonic() - t0))

    threads = [threading.Thread(target=keep, args=(k,)) for k in range(keepalive)]
    for t in threads:
        t.start()
    start = time.monotonic()
    i = 0
    while True:
        due = start + i * interval_ms / 1000
        if due >= stop:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
        i += 1
    for t in threads:
        t.join()
    _emit(established=keepalive, established_lost=len(lost), lost=lost,
          keepalive_requests=requests[0], new=len(new),
          new_failed=sum(1 for ok, _ in new if not ok),
          new_delayed=sum(1 for ok, d in new if ok and d > 1.0),
          new_max_ms=round(max((d for _, d in new), default=0) * 1000, 1))
    return 0


def blob_sha256(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for c in blob_chunks(size, seed):
        h.update(c)
    return h.hexdigest()


def blob(host: str, port: int, size: int, seed: int, timeout: float) -> int:
    """Download `size` deterministic bytes and compare their hash."""
    want = blob_sha256(size, seed)
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.request("GET", f"/blob/{size}/{seed}")
    sock = c.sock
    r = c.getresponse()
    got, n, mss = hashlib.sha256(), 0, 0
    while chunk := r.read(CHUNK):
        got.update(chunk)
        n += len(chunk)
        mss = max(mss, rcv_mss(sock))
    secs = time.monotonic() - t0
    _emit(ok=got.hexdigest() == want and n == size, bytes=n, sha256=got.hexdigest(),
          expected=want, seconds=round(secs, 3), rcv_mss=mss)
    return 0


def rcv_mss(sock: socket.socket) -> int:
    """The largest segment payload this socket has received so far (the
    kernel's tcpi_rcv_mss: GSO packets count by their segments), 0 once
    the socket is gone."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 24)
    except OSError:
        return 0
    return struct.unpack_from("I", info, 20)[0]


def upload(host: str, port: int, size: int, seed: int, timeout: float) -> int:
    """Upload `size` deterministic bytes; the backend answers with their hash."""
    want = blob_sha256(size, seed)
    t0 = time.monotonic()
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.putrequest("POST", "/upload")
    c.putheader("Content-Length", str(size))
    c.endheaders()
    for chunk in blob_chunks(size, seed):
        c.send(chunk)
    body = c.getresponse().read().decode().split()
    _emit(ok=len(body) == 2 and body[1] == want, backend=body[0] if body else "",
          seconds=round(time.monotonic() - t0, 3))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="natlb_testbed.hosts")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--http-port", type=int, default=80)
    s.add_argument("--udp-port", type=int, default=53)
    for name in ("http-stream", "udp-stream", "blob", "upload", "hold", "syn-flood", "churn"):
        c = sub.add_parser(name)
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--count", type=int, default=1)
        c.add_argument("--interval-ms", type=int, default=0)
        c.add_argument("--timeout", type=float, default=2.0)
        c.add_argument("--size", type=int, default=0)
        c.add_argument("--seed", type=int, default=1)
        c.add_argument("--seconds", type=float, default=1.0)
        c.add_argument("--keepalive", type=int, default=10)
        c.add_argument("--probe", action="store_true")
        c.add_argument("--same-socket", action="store_true")
    u = sub.add_parser("udp-sizes")
    u.add_argument("--host", required=True)
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--sizes", default="100,1400,4000,8000,30000")
    u.add_argument("--count", type=int, default=1)
    u.add_argument("--timeout", type=float, default=2.0)
    u.add_argument("--reverse", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.name, a.http_port, a.udp_port)
    if a.cmd == "http-stream":
        return http_stream(a.host, a.port, a.count, a.interval_ms, a.timeout)
    if a.cmd == "udp-stream":
        return udp_stream(a.host, a.port, a.count, a.interval_ms, a.timeout, a.same_socket)
    if a.cmd == "udp-sizes":
        return udp_sizes(a.host, a.port, [int(x) for x in a.sizes.split(",")], a.count,
                         a.timeout, a.reverse)
    if a.cmd == "churn":
        return churn(a.host, a.port, a.keepalive, a.interval_ms, a.seconds, a.timeout)
    if a.cmd == "hold":
        return hold(a.host, a.port, a.timeout, a.probe)
    if a.cmd == "syn-flood":
        return syn_flood(a.host, a.port, a.count, a.seconds)
    if a.cmd == "blob":
        return blob(a.host, a.port, a.size, a.seed, a.timeout)
    return upload(a.host, a.port, a.size, a.seed, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
