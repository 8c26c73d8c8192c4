"""Health checkers against real servers on loopback (no root needed)."""

import asyncio
import socket
import struct
import sys

import pytest

from natlb.checkers import check_once, dns_answered, dns_query
from natlb.config import HEALTH_KINDS


def check(kind, port, timeout_ms=500, **kw):
    hc = HEALTH_KINDS[kind](timeout_ms=timeout_ms, **kw)
    return asyncio.run(check_once("127.0.0.1", port, hc))


@pytest.fixture
def http_server():
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall good")
        await writer.drain()
        writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield port
    loop.call_soon_threadsafe(loop.stop)
    t.join()
    # Closed and drained on its own loop: an accept left pending would be
    # reported as a coroutine never awaited.
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp(http_server):
    assert check("tcp", http_server)[0]
    ok, detail = check("tcp", free_port())
    assert not ok and "refused" in detail.lower()


def test_http_status_and_body(http_server):
    assert check("http", http_server) == (True, "HTTP 200")
    assert check("http", http_server, expect_body="good")[0]
    ok, detail = check("http", http_server, expect_body="bad")
    assert not ok and "body" in detail
    assert check("http", http_server, expect_status=204) == (False, "HTTP 200")


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, reply):
        self.reply = reply

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(self.reply(data), addr)


def udp_server(reply):
    loop = asyncio.new_event_loop()
    transport, _ = loop.run_until_complete(loop.create_datagram_endpoint(
        lambda: _Echo(reply), local_addr=("127.0.0.1", 0)))
    import threading

    threading.Thread(target=loop.run_forever, daemon=True).start()
    return transport.get_extra_info("sockname")[1]


def test_udp_expect():
    port = udp_server(lambda d: b"pong:" + d)
    assert check("udp", port, expect="pong")[0]
    assert not check("udp", port, expect="nope")[0]
    assert not check("udp", free_port(socket.SOCK_DGRAM))[0]


def dns_reply(query: bytes, ancount: int, rcode: int = 0) -> bytes:
    qid = query[:2]
    flags = 0x8180 | rcode
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    return qid + struct.pack("!HHHHH", flags, 1, ancount, 0, 0) + query[12:] + answer * ancount


def test_dns_needs_an_answer():
    assert check("dns", udp_server(lambda q: dns_reply(q, 1)), name="www.example.test")[0]
    ok, detail = check("dns", udp_server(lambda q: dns_reply(q, 0)), name="www.example.test")
    assert not ok and "without answer" in detail
    ok, detail = check("dns", udp_server(lambda q: dns_reply(q, 0, rcode=3)), name="x.test")
    assert not ok and "rcode 3" in detail


def test_dns_query_wire_format():
    q = dns_query("www.example.test.", 0x1234)
    assert q[:12] == bytes.fromhex("123401000001000000000000")
    assert q[12:] == b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    assert dns_answered(dns_reply(q, 2), 0x1234) == (True, "DNS 2 answers")
    assert not dns_answered(dns_reply(q, 2), 0x9999)[0]


def test_exec_exit_code_and_env():
    # sh, and time to start: under ASan on a loaded machine a Python
    # interpreter once took longer than 500 ms to start.
    script = 'case "$NATLB_BACKEND" in *:7) exit 0;; *) exit 3;; esac'
    assert check("exec", 7, timeout_ms=5000, command=("/bin/sh", "-c", script))[0]
    assert check("exec", 8, timeout_ms=5000, command=("/bin/sh", "-c", script)) == (
        False, "exit 3")


def test_exec_timeout_kills_the_command():
    ok, detail = check("exec", 1, command=(sys.executable, "-c", "import time; time.sleep(30)"))
    assert not ok and "timeout" in detail


def test_http_body_after_the_headers_in_another_segment():
    """A server that flushes its headers before it writes the body (Python's
    http.server does): the body is still found."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"all good")
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            hc = HEALTH_KINDS["http"](timeout_ms=1000, expect_body="good")
            return await check_once("127.0.0.1", port, hc)

    assert asyncio.run(run()) == (True, "HTTP 200")
