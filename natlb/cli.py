"""The ``natlb`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from natlb.config import LBConfig
from natlb.errors import EXIT_HOST, EXIT_USER, ConfigError, NatlbError, RequestError

EXIT_CONFIG = EXIT_USER


def _die(msg: str, code: int = 1) -> int:
    print(f"natlb: {msg}", file=sys.stderr)
    return code


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if args.config:
        from natlb.config import load

        return load(args.config).lb.control_socket
    return LBConfig().control_socket


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cmd_check(args: argparse.Namespace) -> int:
    from natlb.config import load

    cfg = load(args.config)
    n = sum(len(s.backends) for s in cfg.services)
    print(f"{args.config}: ok ({_count(len(cfg.services), 'service')}, "
          f"{_count(n, 'backend')})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from natlb.config import load

    cfg = load(args.config)  # before anything touches the system
    if os.geteuid() != 0:
        return _die("run needs root (NFQUEUE, nftables, addresses)")
    from natlb import logsetup
    from natlb.daemon import run

    logsetup.configure(args.verbose)

    return run(cfg, args.config, args.handover_fd)


def cmd_restart(args: argparse.Namespace) -> int:
    from natlb.config import load
    from natlb.control import request

    cfg = load(args.config)  # a bad config is refused here, exit 2, nothing changed
    reply = request(args.socket or cfg.lb.control_socket,
                    {"cmd": "restart", "config": os.path.abspath(args.config)}, timeout=90)
    if not reply.get("ok"):
        return _die(reply.get("error", "refused"), int(reply.get("exit", 1)))
    print(f"natlb pid {reply['pid']} serves, queues {reply['queues']['old']} -> "
          f"{reply['queues']['new']}")
    print(f"flows handed over: {reply['flows']} ({reply['store']} into max_flows "
          f"{reply['max_flows']}; {reply['flows_dropped']} dropped: expired or no longer "
          f"configured)")
    print(f"backends with their health, admin state and weight: {reply['backends']} of "
          f"{reply['backends_total']}")
    for name, c in reply["counters"].items():
        print(f"service {name} counters at handover: " +
              ", ".join(f"{k} {v}" for k, v in c.items()))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from natlb.control import request

    # As SIGHUP, but the outcome comes back: a refused reload exits 2 (the
    # config, an [lb] change) or 1 (the host refused its rules).
    reply = request(_socket_path(args), {"cmd": "reload"}, timeout=90)
    if not reply.get("ok"):
        return _die(reply.get("error", "refused"), int(reply.get("exit", 1)))
    print(f"reloaded {reply['config']} ({_count(reply['services'], 'service')}, "
          f"{_count(reply['backends'], 'backend')})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from natlb.control import request
    from natlb.gcpause import gc_paused
    from natlb.status import render

    # Decoding megabytes of JSON at 4,096 services; with 65,536 backends and
    # the fast path, the daemon takes seconds to read the kernel's counters.
    with gc_paused():
        reply = request(_socket_path(args), {"cmd": "status"}, timeout=60)
    if args.json:
        print(json.dumps(reply["status"], indent=2))
    elif args.rate:
        from natlb.rates import render as render_rates

        print(render_rates(reply["status"]))
    else:
        print(render(reply["status"]))
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    from natlb.control import request

    req = {"cmd": "backend", "action": args.action, "service": args.service,
           "backend": args.backend}
    if args.action == "weight":
        if args.weight is None:
            return _die("backend weight needs N", EXIT_CONFIG)
        req["weight"] = args.weight
    reply = request(_socket_path(args), req)
    if not reply.get("ok"):
        raise RequestError(reply.get("error", "refused"))
    print(f"{args.service} {reply['backend']}: admin {reply['admin']}, weight {reply['weight']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return _die("demo needs root (it builds network namespaces)")
    if args.cluster:
        from natlb_testbed.demo_cluster import main as cluster_main

        return cluster_main()
    from natlb_testbed.demo import main

    return main(connections=args.connections)


def parser() -> argparse.ArgumentParser:
    from natlb.version import natlb_version

    p = argparse.ArgumentParser(prog="natlb", description="NAT load balancer over NFQUEUE")
    p.add_argument("--version", action="version", version=f"natlb {natlb_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run in the foreground")
    r.add_argument("-c", "--config", required=True)
    r.add_argument("-v", "--verbose", action="store_true")
    r.add_argument("--handover-fd", type=int, help=argparse.SUPPRESS)
    r.set_defaults(fn=cmd_run)
    rs = sub.add_parser("restart", help="hand over to a new natlb (config re-read), "
                                        "keeping flows")
    rs.add_argument("-c", "--config", required=True)
    rs.add_argument("-s", "--socket", help="control socket path of the running natlb")
    rs.set_defaults(fn=cmd_restart)
    rl = sub.add_parser("reload", help="reload the running natlb's config file (as SIGHUP); "
                                       "exit 0, or 2 (1: the host) if it refused it")
    rl.add_argument("-c", "--config", help="read the control socket path from here")
    rl.add_argument("-s", "--socket", help="control socket path")
    rl.set_defaults(fn=cmd_reload)
    c = sub.add_parser("check", help="validate a config file (exit 0 or 2)")
    c.add_argument("-c", "--config", required=True)
    c.set_defaults(fn=cmd_check)
    for name, fn, helptext in (("status", cmd_status, "show services, backends, counters"),):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--json", action="store_true")
        s.add_argument("--rate", action="store_true",
                       help="connections, packets and bytes per second (like ipvsadm --rate)")
        s.add_argument("-c", "--config", help="read the control socket path from here")
        s.add_argument("-s", "--socket", help="control socket path")
        s.set_defaults(fn=fn)
    b = sub.add_parser("backend", help="drain, enable, disable or re-weight a backend")
    b.add_argument("action", choices=["drain", "enable", "disable", "weight"])
    b.add_argument("service")
    b.add_argument("backend", metavar="ADDRESS[:PORT]")
    b.add_argument("weight", nargs="?", type=int)
    b.add_argument("-c", "--config")
    b.add_argument("-s", "--socket")
    b.set_defaults(fn=cmd_backend)
    d = sub.add_parser("demo", help="build namespaces, run traffic through natlb, fail a backend")
    d.add_argument("--connections", type=int, default=300)
    d.add_argument("--cluster", action="store_true",
                   help="three natlb nodes behind ECMP routers (BIRD); one dies under traffic")
    d.set_defaults(fn=cmd_demo)
    return p


def _netlink_error(e: BaseException) -> bool:
    # pyroute2's NetlinkError, recognised without importing pyroute2 here.
    return type(e).__name__ == "NetlinkError" and type(e).__module__.startswith("pyroute2")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        return _die(f"config: {e}", EXIT_USER)
    except NatlbError as e:
        return _die(str(e), e.exit_code)
    except PermissionError as e:
        return _die(str(e), EXIT_HOST)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if _netlink_error(e):  # a host refusal no layer below translated
            return _die(f"netlink: {e.args[-1] if e.args else e}", EXIT_HOST)
        raise


if __name__ == "__main__":
    sys.exit(main())
