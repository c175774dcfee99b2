"""Give back the compiler's memory once every probe is loaded.

bcc links LLVM and Clang into the daemon; their code pages (≈ 75 MB resident
after compiling the probes) are needed only while probes compile, yet keep
counting against the daemon's memory limit. Once loading is done the
executable mappings of those libraries are dropped with ``MADV_DONTNEED``:
they are private, never written (position-independent code has no text
relocations), so the kernel simply re-reads a page from the library file if a
probe is ever compiled again. Writable and read-only data mappings (RELRO
holds relocated pointers) are left alone: dropping those would lose state.

The compiler's heap is freed by bcc (``bcc_free_memory``) but stays in the
C allocator's arenas; ``malloc_trim`` hands those pages back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4
COMPILER_LIBRARIES = ("libLLVM", "libclang-cpp", "libclang.so")


def _code_mappings(libraries: tuple[str, ...], maps_path: str) -> list[tuple[int, int, str]]:
    out = []
    try:
        with open(maps_path) as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or parts[1] != "r-xp":
                    continue
                path = parts[5].strip()
                if any(lib in path for lib in libraries):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, path))
    except OSError:
        pass
    return out


def release_compiler_pages(libraries: tuple[str, ...] = COMPILER_LIBRARIES,
                           maps_path: str = "/proc/self/maps") -> int:
    """Drop the resident code pages of the compiler libraries and trim the C heap.

    Returns:
        Bytes of address space released (resident or not).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for lo, hi, path in _code_mappings(libraries, maps_path):
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            released += hi - lo
        else:
            logger.debug("madvise(MADV_DONTNEED) on %s failed: errno %d", path, ctypes.get_errno())
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
    return released
