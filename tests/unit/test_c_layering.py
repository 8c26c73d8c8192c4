"""The C core's files form layers: no two files call into each other, directly
or around a circle.  The call graph is read from the object files themselves
(``nm``: which file defines a symbol, which files use it), so a call through a
header, a macro or a new file counts as much as a written one."""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"

pytestmark = pytest.mark.skipif(not (shutil.which("cc") and shutil.which("nm")),
                                reason="needs cc and nm")


def symbols(obj: Path) -> tuple[set[str], set[str]]:
    """The external symbols an object file defines and the ones it uses."""
    out = subprocess.run(["nm", "-P", str(obj)], check=True, capture_output=True,
                         text=True).stdout
    defined, used = set(), set()
    for line in out.splitlines():
        name, kind = line.split()[:2]
        if kind == "U":
            used.add(name)
        elif kind.isupper():
            defined.add(name)
    return defined, used


def call_graph(objs: dict[str, Path]) -> dict[str, set[str]]:
    """file -> the other files whose functions (or data) it uses."""
    defined: dict[str, str] = {}
    used: dict[str, set[str]] = {}
    for name, obj in objs.items():
        d, u = symbols(obj)
        for sym in d:
            defined[sym] = name
        used[name] = u
    return {name: {defined[s] for s in u if s in defined} - {name}
            for name, u in used.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of files, first file repeated at the end, or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cobj")
    objs = {}
    for src in sorted(CSRC.glob("*.c")):
        obj = out / (src.stem + ".o")
        subprocess.run(["cc", "-c", "-O0", "-std=gnu11", "-I", str(CSRC), "-o", str(obj),
                        str(src)], check=True)
        objs[src.name] = obj
    return objs


def test_find_cycle_finds_one():
    assert find_cycle({"a.c": {"b.c"}, "b.c": {"c.c"}, "c.c": {"a.c"}}) == \
        ["a.c", "b.c", "c.c", "a.c"]
    assert find_cycle({"a.c": {"b.c", "c.c"}, "b.c": {"c.c"}, "c.c": set()}) is None


def test_c_files_call_each_other_one_way_only(objects):
    graph = call_graph(objects)
    # The graph is real: the packet path uses the layers below it.
    assert graph and any(graph.values())
    cycle = find_cycle(graph)
    assert cycle is None, "C files call around a circle: " + " -> ".join(cycle)


# System calls that move bytes in or out of the process, make descriptors or
# threads, or touch files.
IO_CALLS = {"read", "write", "send", "sendto", "sendmsg", "recv", "recvmsg", "recvmmsg",
            "socket", "bind", "setsockopt", "eventfd", "close", "pthread_create",
            "open", "mmap", "munmap", "ftruncate", "rename", "unlink"}
# The I/O layer: NFQUEUE workers, their sockets and the eventfd; the flow
# table's file (mapped once at start, never touched per packet); the tc fast
# path's loader and the thread that reads its ring buffer of carried FINs/RSTs.
IO_FILES = {"nfqueue.c", "ctstore.c", "tcfast.c"}


def test_only_the_io_layer_does_io(objects):
    """The core works on buffers (sans-IO); the I/O files own threads, sockets, files."""
    doing_io = {name: sorted(symbols(obj)[1] & IO_CALLS) for name, obj in objects.items()}
    assert doing_io["nfqueue.c"], "the I/O layer should show its system calls"
    assert {n: calls for n, calls in doing_io.items() if calls and n not in IO_FILES} == {}
