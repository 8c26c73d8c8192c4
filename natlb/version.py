"""natlb's version: the one in setup.py, read from the installed package's
metadata, so there is a single place to change it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def natlb_version() -> str:
    try:
        return version("natlb")
    except PackageNotFoundError:  # a source tree that was never pip-installed
        return "unknown"
