"""Another program that owns an NFQUEUE number: binds it (nfnetlink, as any
NFQUEUE reader does), prints "ready", and holds it until stdin closes.

    ip netns exec NS python -m natlb_testbed.queue_holder QUEUE
"""

from __future__ import annotations

import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQNL_CFG_CMD_BIND = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def bind(queue: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    cmd = struct.pack("=BxH", NFQNL_CFG_CMD_BIND, socket.htons(socket.AF_INET))
    attr = struct.pack("=HH", 4 + len(cmd), NFQA_CFG_CMD) + cmd
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attr
    s.send(struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)
    reply = s.recv(4096)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    err = -struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0
    if err:
        raise OSError(err, f"bind NFQUEUE {queue}")
    return s


def main() -> int:
    held = bind(int(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.read()
    held.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
