"""Facts about the machine and the installed stack, for ``doge env`` and run metadata."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = ["doge-cli", "torch", "transformers", "datasets", "accelerate", "trl", "deepspeed", "lighteval",
            "tokenizers", "triton", "typer", "pydantic"]


def package_versions() -> dict[str, str]:
    """Installed versions read from package metadata (nothing is imported)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_features() -> list[str]:
    """Vector and matrix extensions that matter for CPU training speed."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def offline_status() -> str:
    from doge_cli.offline import offline_flags

    flags = offline_flags()
    return f"offline ({', '.join(flags)})" if flags else "online allowed (set HF_HUB_OFFLINE=1 to forbid hub access)"


def gpus() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {prop.name} {prop.total_memory / 2**30:.1f} GiB (sm_{prop.major}{prop.minor})")
    return out


def collect_env() -> dict[str, object]:
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu cores": os.cpu_count(),
        "cpu features": cpu_features(),
    }
    info.update(package_versions())
    info["gpus"] = gpus()
    info["hub"] = offline_status()
    info["HF_HOME"] = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return info


def git_state() -> dict[str, object] | None:
    """The commit of the doge source tree and whether it has uncommitted changes; None when doge is not
    installed from a git checkout (or git is missing)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def run_environment(device: str, processes: int) -> dict[str, object]:
    """What a run records about where it ran (doge_run.json; shown by doge report)."""
    import time

    versions = package_versions()
    if device.startswith("cuda"):
        found = gpus()
        hardware = found[0].split(" ", 1)[1] if found else device
    else:
        hardware = f"{cpu_model()} ({os.cpu_count()} cores)"
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
            "doge": versions["doge-cli"], "torch": versions["torch"], "transformers": versions["transformers"],
            "git": git_state(), "device": device, "hardware": hardware, "processes": processes}
