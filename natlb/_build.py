"""cffi builder for natlb's C core (named in setup.py's cffi_modules).

The cdef is csrc/natlb.h itself, so the API is declared in exactly one place,
followed by csrc/natlb_test.h, the hooks only tests and fuzzers call.
``make_builder`` lets the sanitizer build (tests/sanitize) compile the same
module with other flags into another directory.

``build_bpf`` compiles the tc fast path (csrc/bpf/fastpath.bpf.c) into the
package as _fastpath.bpf.o, which natlb.core loads when lb.fastpath is on.
setup.py runs it after the C core (build_ext).
"""

import subprocess
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADERS = ("natlb.h", "natlb_test.h")
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]


def make_builder(cflags: list[str] = CFLAGS, ldflags: list[str] | None = None) -> FFI:
    builder = FFI()
    builder.cdef("\n".join((CSRC / h).read_text() for h in HEADERS))
    builder.set_source(
        "natlb._natlb_core",
        '#include "internal.h"\n#include "natlb_test.h"',
        sources=[str(p) for p in sorted(CSRC.glob("*.c"))],
        include_dirs=[str(CSRC)],
        extra_compile_args=cflags,
        extra_link_args=ldflags or [],
        libraries=["pthread", "bpf"],
    )
    return builder


BPF_SOURCE = CSRC / "bpf" / "fastpath.bpf.c"
BPF_OBJECT = "_fastpath.bpf.o"


def build_bpf(package_dir: Path) -> Path:
    """clang -target bpf: the kernel's headers (linux-libc-dev) and libbpf's
    (libbpf-dev).  Debian keeps asm/ under the multiarch directory."""
    out = package_dir / BPF_OBJECT
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                               text=True).stdout.strip() or "x86_64-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                    # v3: fetching atomics (rr's cursor); Linux >= 5.12 loads it.
                    "-mcpu=v3",
                    f"-I/usr/include/{multiarch}", f"-I{BPF_SOURCE.parent}",
                    "-c", str(BPF_SOURCE), "-o", str(out)], check=True)
    return out


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
    build_bpf(Path(__file__).resolve().parent)
