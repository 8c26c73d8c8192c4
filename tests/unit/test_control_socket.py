"""The control socket's path across `natlb restart`: the successor binds it
while the predecessor is still on its way out, and neither may trip over or
remove the other's socket."""

import asyncio
import os
import socket

from natlb.control import ControlServer


def server(path: str) -> ControlServer:
    return ControlServer(path, pool=None, status=dict)  # type: ignore[arg-type]


def test_predecessor_leaves_the_successors_socket_in_place(tmp_path):
    path = str(tmp_path / "natlb.sock")

    async def run() -> None:
        old = server(path)
        await old.start()
        os.unlink(path)              # the successor found it dead and cleared it...
        new = server(path)
        await new.start()            # ... and bound its own
        await old.stop()
        assert os.path.exists(path)  # still the successor's
        await new.stop()
        assert not os.path.exists(path)

    asyncio.run(run())


def test_a_dead_socket_that_vanishes_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    path = str(tmp_path / "natlb.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)                 # a socket file nobody listens on

    def refused_after_the_predecessor_removed_it(self, address):
        os.unlink(path)
        raise ConnectionRefusedError

    monkeypatch.setattr(socket.socket, "connect", refused_after_the_predecessor_removed_it)
    assert ControlServer.check_free(path) is True
