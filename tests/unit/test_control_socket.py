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


def test_a_passed_listening_socket_answers_for_the_successor_and_stays(tmp_path):
    """`natlb restart`: the successor serves the predecessor's listening
    socket (same path, never unbound); the predecessor gives it away without
    removing the path, and a request made in between waits in the backlog
    and is answered by the successor."""
    from natlb.control import request

    path = str(tmp_path / "natlb.sock")

    async def run() -> None:
        old = ControlServer(path, pool=None, status=lambda: {"who": "old"})  # type: ignore[arg-type]
        await old.start()
        sock = ControlServer.inherited(os.dup(old.fileno()), path)
        assert sock is not None
        old.give_away()
        assert os.path.exists(path)
        loop = asyncio.get_running_loop()
        asked = loop.run_in_executor(None, request, path, {"cmd": "status"})
        await asyncio.sleep(0.2)     # nobody accepts yet: it waits
        new = ControlServer(path, pool=None, status=lambda: {"who": "new"})  # type: ignore[arg-type]
        await new.adopt(sock)
        assert (await asked)["status"] == {"who": "new"}
        await old.stop()
        assert os.path.exists(path)  # the predecessor's stop leaves it
        await new.stop()
        assert not os.path.exists(path)

    asyncio.run(run())


def test_only_a_listening_socket_on_the_path_is_taken(tmp_path):
    path = str(tmp_path / "natlb.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(tmp_path / "other.sock"))
    other.listen()
    r, w = os.pipe()
    try:
        for fd in (other.fileno(), r):
            assert ControlServer.inherited(fd, path) is None
            os.fstat(fd)             # still open: not ours to close
    finally:
        other.close()
        os.close(r)
        os.close(w)
