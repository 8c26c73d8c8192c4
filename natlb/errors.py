"""natlb's errors, by who is to blame (h11's Local/RemoteProtocolError habit).

    NatlbError
    +-- UserError        the config or an operator's request is wrong: the
    |   |                CLI prints one line and exits 2; nothing changed.
    |   +-- ConfigError  names the key and the value
    |   +-- RequestError an operator request the running natlb refused
    +-- HostError        this host refused (netlink, nftables, queues, the
                         control socket): one line, exit 1, no traceback.

Subsystems subclass these (SteeringError, CoreError, ...), so the CLI
decides the exit code from the base alone.
"""

from __future__ import annotations

EXIT_USER = 2
EXIT_HOST = 1


class NatlbError(Exception):
    """Base of every error natlb reports to a person; the message is one line."""

    exit_code = EXIT_HOST


class UserError(NatlbError):
    exit_code = EXIT_USER


class ConfigError(UserError, ValueError):
    """The configuration is wrong (key path and value in the message)."""


class RequestError(UserError):
    """An operator's request was refused (no such service, bad weight...)."""


class HostError(NatlbError):
    exit_code = EXIT_HOST


def no_such_interface(key: str, name: str) -> ConfigError:
    """The one error for a configured interface this host does not have,
    whether found before starting or while setting up."""
    return ConfigError(f'{key} = "{name}": no such interface')
