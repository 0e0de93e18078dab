"""Where a benchmark ran: CPU, cores, commit, library versions and load, recorded in every report.

Numbers are only comparable with the machine and the code that produced them, so each report carries these.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
from pathlib import Path

#: Reports write here; their own edits must not mark the measured code as modified.
RESULTS_DIR = "perf/results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """Short HEAD, with " (+ uncommitted changes)" when tracked files outside perf/results/ differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RESULTS_DIR}"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" (+ uncommitted changes)" if dirty else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(threads: int, command: str) -> dict:
    import onnxruntime
    import torch

    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "host": socket.gethostname(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "load_avg_at_start": load_average(),
        "command": command,
    }
