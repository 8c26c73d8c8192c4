"""Client load for the cluster test, bench and demo (``python -m natlb_testbed.cluster_load``):
keep-alive connections kept busy, plus a new connection every few ms, for a
bounded time.  Prints one JSON summary line at the end.

A keep-alive connection is *lost* if a request on it fails, times out, or is
answered by another backend than its first answer (its flow moved).  A new
connection *fails* if it does not complete within the timeout; it is
*delayed* if it took more than a second (a SYN retransmitted)."""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time


def keepalive(host: str, port: int, stop: float, pause: float, timeout: float,
              out: dict) -> None:
    first = None
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        while time.monotonic() < stop:
            t0 = time.monotonic()
            c.request("GET", "/")
            body = c.getresponse().read().decode().strip()
            out["max_ms"] = max(out["max_ms"], (time.monotonic() - t0) * 1000)
            first = first or body
            if body != first:
                raise RuntimeError(f"answered by {body}, began with {first}")
            out["requests"] += 1
            time.sleep(pause)
        c.close()
        out["ok"] = True
    except (OSError, http.client.HTTPException, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["backend"] = first


def one_new(host: str, port: int, timeout: float, out: list, start: float) -> None:
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("GET", "/", headers={"Connection": "close"})
        c.getresponse().read()
        c.close()
        out.append((True, time.monotonic() - t0, t0 - start, ""))
    except (OSError, http.client.HTTPException) as e:
        out.append((False, time.monotonic() - t0, t0 - start, type(e).__name__))


def run(host: str, port: int, conns: int, interval_ms: float, seconds: float,
        timeout: float, pause_ms: float = 100) -> dict:
    start = time.monotonic()
    stop = start + seconds
    ka = [{"ok": False, "requests": 0, "max_ms": 0.0} for _ in range(conns)]
    pause = pause_ms / 1000
    threads = [threading.Thread(target=keepalive, args=(host, port, stop, pause, timeout, k),
                                daemon=True) for k in ka]
    for t in threads:
        t.start()
    news: list = []
    n = 0
    while True:
        due = start + n * interval_ms / 1000
        if due >= stop:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        t = threading.Thread(target=one_new, args=(host, port, timeout, news, start),
                             daemon=True)
        t.start()
        threads.append(t)
        n += 1
    for t in threads:
        t.join(timeout + seconds)
    return {
        "established": conns,
        "established_lost": sum(not k["ok"] for k in ka),
        "keepalive_requests": sum(k["requests"] for k in ka),
        "keepalive_max_ms": round(max(k["max_ms"] for k in ka), 1),
        "keepalive_backends": sorted({k["backend"] for k in ka if k.get("backend")}),
        "errors": [k["error"] for k in ka if "error" in k][:5],
        "new": len(news),
        "new_failed": sum(not ok for ok, _, _, _ in news),
        "new_delayed": sum(ok and s > 1.0 for ok, s, _, _ in news),
        "new_max_ms": round(max((s for _, s, _, _ in news), default=0) * 1000, 1),
        # When the slow or failed ones began (s after the start), took, error.
        "slow": sorted((round(t, 2), round(s, 2), e) for ok, s, t, e in news
                       if not ok or s > 1.0)[:50],
        "start_wall": time.time() - (time.monotonic() - start),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--interval-ms", type=float, default=15)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--timeout", type=float, default=8)
    ap.add_argument("--pause-ms", type=float, default=100,
                    help="between a keep-alive connection's requests")
    a = ap.parse_args()
    print(json.dumps(run(a.host, a.port, a.conns, a.interval_ms, a.seconds, a.timeout,
                          a.pause_ms)),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
