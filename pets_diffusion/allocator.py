"""Keep freed host memory in the process, so that each CPU step reuses the previous step's pages.

glibc's malloc serves large blocks with mmap and returns them (and the top of its heap) to the
kernel when they are freed. A UNet training step on CPU frees and reallocates gigabytes of
activations, so every step faults in and zeroes the same pages again (what that costs is measured
in benchmarks/README.md). Raising the mmap
threshold to glibc's maximum (32 MiB) and trimming only above 1 GiB keeps those pages for reuse.
"""

import ctypes
import os

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # give the heap's free top back to the kernel only above 1 GiB
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps rather than page by page


def retain_freed_memory() -> bool:
    """Tune glibc malloc to keep freed memory for reuse. Returns False (and changes nothing) off glibc."""
    if os.name != "posix":
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # macOS, musl: another allocator
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
