"""sd_notify: the datagram systemd reads, and silence outside systemd."""

import os
import socket

from natlb import sdnotify


def test_ready_names_this_process(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.ready("running")
        assert s.recv(256).decode() == f"READY=1\nSTATUS=running\nMAINPID={os.getpid()}"


def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("running")
