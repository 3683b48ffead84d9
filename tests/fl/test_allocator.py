"""The allocator setting: freed tensor memory is reused instead of faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from fl.simulation import tune_allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

_SCRIPT = textwrap.dedent(
    """
    import ctypes, torch
    from fl.simulation.allocator import tune_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mapped_and_heap(mib):
        t = torch.empty(mib * 2**18)  # mib MiB of float32
        info = libc.mallinfo2()
        del t
        return info.hblkhd // 2**20, libc.mallinfo2().arena // 2**20

    print(*mapped_and_heap(24))  # mmapped; glibc then raises its threshold to 24 MiB
    assert tune_allocator()
    print(*mapped_and_heap(28))  # would be mmapped again with glibc's dynamic threshold
    """
)


def test_tuned_allocator_serves_tensors_from_the_reused_heap() -> None:
    """In a fresh process a 24 MiB tensor is a separate mmap with glibc's defaults (returned to
    the kernel when freed, faulted in again next time), and so would a 28 MiB one be after it;
    once tuned the 28 MiB tensor comes from the heap, which keeps the freed memory for the next
    tensor. Read from glibc's mallinfo2, not timed."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    (mapped_before, _), (mapped_after, heap_after) = (
        tuple(int(v) for v in line.split()) for line in out.stdout.strip().splitlines()
    )
    assert mapped_before >= 24, out.stdout
    assert mapped_after < 28, out.stdout
    assert heap_after >= 28, out.stdout


def test_tune_allocator_is_idempotent() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True
