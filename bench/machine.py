"""What a benchmark ran on: the CPU's matmul instruction sets and its memory bandwidth, measured in the same run.

Machines differ: with AMX or AVX512-BF16, bfloat16 matmuls run several times faster than float32; without, they
run slower. VNNI (AVX512 or AVX) is what int8 dot products use. Every bench that compares precisions prints
`describe()` first, so a figure says which machine it needs.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

# the flags that decide low-precision matmul speed, as /proc/cpuinfo spells them
MATMUL_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not there."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_fast_bf16(flags: set[str] | None = None) -> bool:
    """AMX or AVX512-BF16: bfloat16 matmuls in hardware."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def bf16_worth_measuring(precisions: list[str], emulated: bool = False, flags: set[str] | None = None):
    """(the precisions to measure, a line to print or None). On a CPU without AMX or AVX512-BF16 a bf16 figure is a
    slowdown of emulated matmuls, not a result: those precisions are left out, and the line says so and recommends
    float32, unless `emulated` asks to measure the emulation anyway (the line then labels the figures)."""
    bf16 = [p for p in precisions if p.startswith("bf16")]
    if not bf16 or has_fast_bf16(flags):
        return list(precisions), None
    why = "this CPU has neither AMX nor AVX512-BF16: bfloat16 matmuls are emulated and slower than float32 here"
    if emulated:
        return list(precisions), f"{why}; the {' '.join(bf16)} figures below measure the emulation, not bf16"
    kept = [p for p in precisions if p not in bf16]
    return kept, (
        f"{why}, so train with trainer.precision=32-true on it; {' '.join(bf16)} not measured "
        "(--emulated-bf16 measures the emulation anyway)"
    )


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of a `megabytes` float32 buffer (read + write counted), with
    torch on `threads` threads: the most a step that streams its weights from memory can reach here. The buffer is
    larger than any CPU cache, so this is DRAM."""
    torch.set_num_threads(threads)
    n = megabytes * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def describe(threads: int) -> str:
    """One line: the CPU, the matmul flags it has and lacks, torch's version and thread count."""
    flags = cpu_flags()
    have = [f for f in MATMUL_FLAGS if f in flags]
    lacks = [f for f in MATMUL_FLAGS if f not in flags]
    return (
        f"cpu: {cpu_name()} | flags: {' '.join(have) or 'none of interest'}"
        f"{' | lacks: ' + ' '.join(lacks) if lacks else ''} | torch {torch.__version__} | threads {threads}"
    )
