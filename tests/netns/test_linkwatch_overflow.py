"""natlb's link watch (natlb/linkwatch.py) when the kernel drops link
notifications: its socket's buffer overflows while links come and go
faster than the thread reads.  The kernel says so with ENOBUFS; the watch
must tell its owner (on_lost, after which natlb lists the links again)
and go on watching.  A namespace of the test's own, real links (veth
pairs), the watch's socket made small so that a few notifications fill it."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pytest

import natlb.netlink
from natlb.linkwatch import Link, LinkWatch

from .test_fastpath_bpf import runner_in


@pytest.fixture
def ns():
    name = f"nllw{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def veth(ns: str, name: str) -> None:
    subprocess.run(["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name",
                    f"{name}p"], check=True)


def wait_for(pred, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_an_overflowed_link_watch_says_so_and_keeps_watching(ns, monkeypatch):
    # The kernel's floor for a receive buffer (a few KiB): two or three
    # link notifications, each with all its attributes, fill it.
    monkeypatch.setattr(natlb.netlink, "RCVBUF", 1)
    added: list[str] = []
    lost = threading.Event()
    watch = LinkWatch(lambda link: added.append(link.name), lambda link: None, lost.set)
    with runner_in(ns) as inside:
        inside(watch.open)          # the socket belongs to the namespace it was made in
    try:
        # Opened, not yet read: notifications wait in the socket, as while
        # natlb lists the links at start, and these overflow it.
        for i in range(30):
            veth(ns, f"ov{i}")
        watch.start()
        assert lost.wait(10), "the overflow was not reported"
        # Still watching: a link added after the overflow is announced.
        veth(ns, "after0")
        assert wait_for(lambda: "after0" in added), added[-5:]
    finally:
        watch.close()
    # Dropped notifications are dropped: not every one of the 60 links
    # made before the start was announced (else nothing overflowed).
    assert len([n for n in added if n.startswith("ov")]) < 60


def test_a_link_watch_reads_every_notification_when_it_keeps_up(ns):
    """The reference: the same links with natlb's own buffer size are all
    announced and nothing is reported lost."""
    added: list[Link] = []
    lost = threading.Event()
    watch = LinkWatch(added.append, lambda link: None, lost.set)
    with runner_in(ns) as inside:
        inside(watch.open)
    try:
        watch.start()
        for i in range(30):
            veth(ns, f"ok{i}")
        names = {f"ok{i}" for i in range(30)} | {f"ok{i}p" for i in range(30)}
        assert wait_for(lambda: names <= {link.name for link in added})
        assert not lost.is_set()
    finally:
        watch.close()
