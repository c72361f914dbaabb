"""Where a benchmark result was measured: the commit, the CPU and its vector units, the date.

Results are committed as JSON and quoted in the README; a figure must say which code and which
machine gave it (these machines differ: AVX-512 with bf16, AVX2 only, or AMX), and the result itself
is where that belongs, not the prose around it.
"""

import datetime
import os
import subprocess
from pathlib import Path

from scalesim.layers.kernel_build import cpuinfo_lines

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _commit() -> str | None:
    """The source tree's commit, with `+dirty` when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu() -> dict:
    model, flags = cpuinfo_lines()
    present = set(flags.split(":", 1)[1].split()) if ":" in flags else set()
    return {"model": model.split(":", 1)[1].strip() if ":" in model else model or None,
            "vector_flags": [f for f in VECTOR_FLAGS if f in present], "cores": os.cpu_count()}


def provenance() -> dict:
    """The commit (None outside git), the CPU, and the UTC date of the measurement."""
    return {"commit": _commit(), "cpu": _cpu(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
