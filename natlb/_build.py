"""cffi builder for natlb's C core (named in setup.py's cffi_modules).

The cdef is csrc/natlb.h itself, so the API is declared in exactly one place,
followed by csrc/natlb_test.h, the hooks only tests and fuzzers call.
``make_builder`` lets the sanitizer build (tests/sanitize) compile the same
module with other flags into another directory.
"""

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
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
