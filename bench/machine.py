"""What the numbers were measured on: the CPU and its flags, memory, load, and each environment's versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# CPU features that decide how fast fp32 and bf16 matmuls can be.
FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
)


def cpu() -> dict:
    """Model name, cores, memory and the matmul-relevant flags (Linux /proc; elsewhere what platform says)."""
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = [f for f in FLAGS_OF_INTEREST if f in flags]
                info["missing_flags"] = [f for f in FLAGS_OF_INTEREST if f not in flags]
                break
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    return info


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def git_commit(root: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment(libs: list[str], device: str) -> dict:
    """Worker side: this environment's Python, torch (and its CPU kernels), and library versions."""
    from bench.libraries import version

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "libraries": {lib: version(lib) for lib in libs},
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def rss_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: "VmRSS" (resident now) or "VmHWM" (its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Set VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
