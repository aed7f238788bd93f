"""What the numbers were measured on: the machine, the packages, the code's commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

# Every distribution a suite measures or leans on; absent ones are reported as absent.
PACKAGES = (
    "hitl-triage", "numpy", "torch", "triton", "numba", "llvmlite", "faiss-cpu", "faiss-gpu",
    "pyarrow", "scipy", "scikit-learn", "netcal", "cleanlab", "pytorch-ood", "torchvision",
    "matplotlib", "rich", "pytest-benchmark",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD extensions that decide how fast the CPU kernels can be."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda_runtime": torch.version.cuda,
        "driver": None,
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            )
            info["driver"] = out.stdout.strip().splitlines()[0]
        except (subprocess.SubprocessError, OSError, IndexError):
            pass
    return info


def machine_info() -> dict:
    """CPU model, cores, memory, SIMD flags, OS, Python, and the GPU (name, driver) if any."""
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu(),
    }


def package_versions() -> dict[str, str | None]:
    """Installed version of each measured distribution (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path) -> str | None:
    """The commit the code under test is at, with ``+dirty`` when the working tree differs."""
    git = shutil.which("git")
    if not git:
        return None
    try:
        head = subprocess.run([git, "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run([git, "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_slug(info: dict) -> str:
    """A file-name-safe name for the machine: the GPU's when there is one, else CPU model and cores."""
    gpu = info.get("gpu")
    base = gpu["name"] if gpu else f"{info['cpu']}-{info['cores']}c"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return slug or "machine"
