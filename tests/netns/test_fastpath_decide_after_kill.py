"""Review of kernel decisions (lb.fastpath_decide) on the whole host.

natlb killed (SIGKILL, a crash, the OOM killer): its tc filters stay for a
successor (the guardian's grace, restart_grace_ms), and its config map still
says decide = 1.  The kernel goes on placing new connections, installing
their entries and carrying their handshakes, with records no observer will
ever read.  The next natlb adopts the flow table file, which has none of
them, and replaces the filters (new maps): each such connection's next
packet is queued and refused (no flow).  With first packets queued, the
same SYN would have waited for the successor and been placed by it."""

import time

from natlb_testbed.testbed import VIP, Hold, basic_config


def test_a_connection_opened_while_natlb_is_dead_survives_the_next_start(testbed, natlb):
    cfg = basic_config(testbed, health="none", lb_extra="fastpath = true")
    first = natlb(cfg)
    first.kill()
    first.wait()
    p, lines = testbed.client_stream("hold", "--host", VIP, "--port", "80", "--timeout", "60",
                                     "--probe")
    try:
        time.sleep(1.0)      # the gap before a supervisor starts natlb again
        natlb(cfg)
        h = Hold(p, lines, next(lines)["backend"])
        r = h.probe()
        assert r["outcome"] == "answered", r
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        testbed.procs.remove(p)
