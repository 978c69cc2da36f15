"""What this machine computes fast: bfloat16 where the chip runs it natively, the memory layout each device runs
fastest in, and a CPU allocator that keeps freed activation memory for reuse.

bf16 pays on a CPU only where the matrix units take it natively: Intel's AMX (Sapphire Rapids and
later), AVX512-BF16 (Cooper Lake, AMD Zen 4 and later) and Arm's BF16 extension (Graviton 3,
Neoverse V1/N2, Apple M2 and later). Elsewhere oneDNN converts to fp32 and bf16 runs slower
(benchmarks/README.md has the measurements). Also: where float64 arithmetic can run.
"""

import ctypes
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

# CPU flag (as Linux's /proc/cpuinfo names it) -> the name we report, best first.
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}
# Device types whose kernels have no float64.
NO_FLOAT64 = ("mps",)
# macOS names the same features in sysctl: x86 `machdep.cpu.*features`, Apple silicon `hw.optional.arm.FEAT_*`.
MACOS_FLAGS = {"AMX_BF16": "amx_bf16", "AVX512BF16": "avx512_bf16", "FEAT_BF16": "bf16"}


def bf16_cpu_instructions(flags: set[str] | None = None) -> str | None:
    """The instructions this CPU runs bf16 matmuls with (AMX, AVX512-BF16, Arm BF16), or None if it has none.

    `flags` are the CPU's feature flags in Linux's spelling (default: this machine's). Where the
    operating system does not list them, torch's own CPU probes decide.
    """
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return _torch_probe()
    return next((name for flag, name in BF16_FLAGS.items() if flag in flags), None)


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 matmuls natively: a CUDA GPU that supports bf16, or such a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bf16_cpu_instructions() is not None


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where `device` runs it natively, else float32: the faster choice for sampling."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 arithmetic for a model on `device` runs: that device, or the CPU where it has no float64
    (Apple's MPS). The bound's terms and the weight checksums are float64."""
    device = torch.device(device)
    return torch.device("cpu") if device.type in NO_FLOAT64 else device


def describe_cpu() -> str:
    """The CPU's model name and its bf16 kind, for benchmark headers: e.g. 'AMD EPYC (AVX512-BF16)'."""
    kind = bf16_cpu_instructions()
    return f"{_cpu_model_name() or platform.processor() or platform.machine()} ({kind or 'no native bf16'})"


def preferred_memory_format(device: torch.device | str) -> torch.memory_format:
    """Channels-last on CPU, contiguous elsewhere.

    On CPU, oneDNN's convolutions want channels-last, and the attention's tokens become a free view;
    on CUDA, contiguous trains and samples faster (both measured: benchmarks/RESULTS.md).
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def chosen_memory_format(channels_last: bool | None, device: torch.device | str) -> torch.memory_format:
    """--channels_last/--no-channels_last when given, else the device's preferred layout."""
    if channels_last is None:
        return preferred_memory_format(device)
    return torch.channels_last if channels_last else torch.contiguous_format


# glibc's malloc serves large blocks with mmap and returns them (and the top of its heap) to the kernel when they are
# freed. A UNet training step on CPU frees and reallocates gigabytes of activations, so every step would fault in and
# zero the same pages again. Raising the mmap threshold to glibc's maximum and trimming only above 1 GiB keeps them.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, from glibc's malloc.h
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


@functools.cache
def cpu_flags() -> set[str]:
    """This CPU's feature flags in Linux's spelling (lower case); empty where the system does not say."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    if platform.system() == "Darwin":
        return _macos_flags()
    return set()


def parse_cpuinfo(text: str) -> set[str]:
    """The flags of /proc/cpuinfo: x86's `flags` line, or Arm's `Features` line."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.lower().split())
    return set()


def _macos_flags() -> set[str]:
    keys = ["machdep.cpu.features", "machdep.cpu.leaf7_features", "hw.optional.arm.FEAT_BF16"]
    flags = set()
    for key in keys:
        result = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True)
        if result.returncode != 0:
            continue
        if key.startswith("hw.optional."):
            if result.stdout.strip() == "1":
                flags.add(MACOS_FLAGS[key.rsplit(".", 1)[1]])
        else:
            flags |= {MACOS_FLAGS.get(word, word.lower()) for word in result.stdout.split()}
    return flags


def _cpu_model_name() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def _torch_probe() -> str | None:
    probes = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return next((name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()), None)
