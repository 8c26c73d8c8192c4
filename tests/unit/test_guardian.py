"""The guardian's grace period, without root: a successor claims the journal
of a natlb that died, or the guardian undoes it once the grace is over."""

import os
import socket
import time

from natlb.undo import Journal, claim


def died(journal):
    """What SIGKILL does to the guardian's pipe: it closes without "done"."""
    g = journal._guardian
    g.stdin.close()
    return g


def test_successor_claims_the_journal_and_nothing_is_undone(tmp_path):
    sock = str(tmp_path / "natlb.sock.guardian")
    table = tmp_path / "natlb-x.flows"
    table.write_bytes(b"flows")
    j = Journal(guardian=True, grace_ms=5000, socket_path=sock)
    j.record("flow_table", path=str(table))
    g = died(j)
    entries = claim(sock)
    assert entries == [{"kind": "flow_table", "module": "natlb.undo", "path": str(table)}]
    assert g.wait(timeout=5) == 0
    assert table.exists()


def test_alive_natlb_is_not_claimed(tmp_path):
    sock = str(tmp_path / "natlb.sock.guardian")
    j = Journal(guardian=True, grace_ms=5000, socket_path=sock)
    j.record("flow_table", path=str(tmp_path / "f"))
    time.sleep(0.3)
    # The guardian listens only once its natlb is gone.
    assert claim(sock, wait_s=0.3) is None and not os.path.exists(sock)
    j.undo()


def test_no_successor_means_undo_after_the_grace(tmp_path):
    sock = str(tmp_path / "natlb.sock.guardian")
    table = tmp_path / "natlb-x.flows"
    table.write_bytes(b"flows")
    j = Journal(guardian=True, grace_ms=300, socket_path=sock)
    j.record("flow_table", path=str(table))
    g = died(j)
    time.sleep(0.1)
    assert table.exists()          # waiting for a successor
    assert g.wait(timeout=5) == 0
    assert not table.exists()
    assert claim(sock) is None


def test_socket_directory_gone_means_undo_at_once(tmp_path):
    """`systemctl stop` removes the RuntimeDirectory; a guardian whose natlb
    was killed there cleans up at once instead of dying with the host dirty."""
    run = tmp_path / "run"
    run.mkdir()
    sock = str(run / "natlb.sock.guardian")
    table = tmp_path / "natlb-x.flows"
    table.write_bytes(b"flows")
    j = Journal(guardian=True, grace_ms=60_000, socket_path=sock)
    j.record("flow_table", path=str(table))
    run.rmdir()
    g = died(j)
    assert g.wait(timeout=5) == 0    # well before the 60 s grace
    assert not table.exists()


def test_guardian_leaves_a_socket_bound_after_its_own(tmp_path):
    """Its grace over, the guardian removes its own socket only: a file bound
    at the path since (a successor's guardian after `natlb restart`) stays."""
    sock = str(tmp_path / "natlb.sock.guardian")
    j = Journal(guardian=True, grace_ms=400, socket_path=sock)
    j.record("flow_table", path=str(tmp_path / "f"))
    g = died(j)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.01)
    # The guardian knows its file just after binding it; replacing the file
    # in that gap would make the test's socket the guardian's own.
    time.sleep(0.3)
    os.unlink(sock)
    other = socket.socket(socket.AF_UNIX)
    other.bind(sock)
    try:
        assert g.wait(timeout=5) == 0
        assert os.path.exists(sock)
    finally:
        other.close()


def test_a_forgotten_change_is_not_undone_by_the_guardian_nor_handed_on(tmp_path):
    """A change that went away by itself (a deleted interface's filters):
    forgotten, it leaves natlb's journal and the guardian's copy."""
    sock = str(tmp_path / "natlb.sock.guardian")
    gone, kept = tmp_path / "gone.flows", tmp_path / "kept.flows"
    j = Journal(guardian=True, grace_ms=5000, socket_path=sock)
    j.record("flow_table", path=str(gone))
    j.record("flow_table", path=str(kept))
    assert j.forget("flow_table", path=str(gone)) == 1
    assert j.forget("flow_table", path=str(gone)) == 0
    assert not j.has("flow_table", path=str(gone)) and j.has("flow_table", path=str(kept))
    g = died(j)
    entries = claim(sock)
    assert entries == [{"kind": "flow_table", "module": "natlb.undo", "path": str(kept)}]
    assert g.wait(timeout=5) == 0
