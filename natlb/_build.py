"""cffi builder for natlb's C core (named in setup.py's cffi_modules).

The cdef is csrc/natlb.h itself, so the API is declared in exactly one place.
"""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent.parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "natlb.h").read_text())
ffibuilder.set_source(
    "natlb._natlb_core",
    '#include "internal.h"',
    sources=[str(p) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
