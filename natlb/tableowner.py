"""Whether this natlb may take the host: one natlb per network namespace,
and `lb.table` its own.

Two natlb in one namespace, whatever their tables, queues and control
sockets, change the same sysctls (the first to stop puts `ip_forward` back
under the other), the same interfaces' tc filters (the fast path's have
one handle) and, with one table name, each other's rules.  And natlb
replaces the table named `lb.table` when it starts and deletes it when it
stops, so a table of the operator's that bears the name is not its to take.

natlb writes its control socket into its tables' comment (`nft list
table ip natlb` shows it) and reads every table's at start:

* a comment naming a control socket where a natlb still answers (this
  natlb's own too: started twice), or another control socket whose natlb's
  guardian waits (it undoes that natlb's changes when its grace ends):
  another natlb runs here, refused;
* one naming this natlb's control socket where nobody answers (a
  predecessor that crashed or was killed), or another socket nobody answers
  on any more: left over, taken;
* a table named `lb.table` without natlb's comment: not natlb's, refused
  (unless this natlb's own guardian waits: a crashed predecessor from
  before the comment).

A refusal is a user error (exit 2) found before anything changes.
"""

from __future__ import annotations

import os

from natlb.errors import ConfigError, UserError
from natlb.netlink import printable
from natlb.nftlist import FAMILIES, tables
from natlb.ownfile import answers

PREFIX = "natlb control socket "


def mark(control_socket: str) -> str:
    """The comment natlb gives its tables."""
    return PREFIX + os.path.abspath(control_socket)


def owner_of(comment: str) -> str | None:
    """The control socket a natlb wrote into a table's comment, or None."""
    return comment[len(PREFIX):] if comment.startswith(PREFIX) else None


def check(table: str, control_socket: str) -> None:
    """Raise a UserError (exit 2) if another natlb runs in this network
    namespace, or if a table named `table` is not this natlb's to take
    (see the module's doc)."""
    mine = os.path.abspath(control_socket)
    for family, name, comment in tables():
        if family not in (2, 10):        # natlb's tables are ip and ip6
            continue
        owner = owner_of(comment)
        # A guardian waiting on our own socket's path is a crashed
        # predecessor's, whose host this natlb is about to claim.
        if owner is not None and (answers(owner) or (owner != mine
                                                      and answers(owner + ".guardian"))):
            raise UserError(
                f"another natlb runs in this network namespace (control socket "
                f"{printable(owner)}, table {FAMILIES.get(family, family)} {printable(name)}); "
                f"both would change the same sysctls, interfaces and tc filters, and "
                f"the first to stop would undo them under the other: one natlb per "
                f"network namespace")
        if (name == table and owner is None
                and not answers(mine + ".guardian")):
            # (this natlb's own guardian waiting: a crashed predecessor's
            # table, from a natlb that wrote no comment)
            fname = FAMILIES[family]
            raise ConfigError(
                f'lb.table = "{table}": the host has a table {fname} {table} that natlb did '
                f"not make, and natlb replaces its table and deletes it on exit: choose "
                f"another lb.table, or delete that table if it is left over "
                f"(nft delete table {fname} {table})")
