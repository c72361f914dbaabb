"""Decode attention that reads the paged KV cache in place, by a small C++ kernel
(kernels/paged_decode.cpp), as vLLM's CPU backend does with its own.

The plain-PyTorch path gathers every decoding sequence's whole context out of the cache with
`index_select` in every layer, then runs SDPA over the copy. At batch 16 and 1,024 cached tokens
that was 4.4 ms of gather and 8.6 ms of SDPA per layer on this 2-core machine (development
measurement), about 390 ms of a decode step against 70 ms of matmuls. The kernel reads each key
and value row once for the group of query heads that share it.

The kernel is compiled on first use with the machine's compiler (`-O3 -march=native`, so the
build directory is per CPU model and flags) into ~/.cache/scalesim/kernels, which takes about a
minute once. Where it cannot be built (no compiler), `available()` is False, a warning says why,
and attention keeps the gather path.
"""

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "kernels" / "paged_decode.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        model, flags = platform.processor(), ""
    return hashlib.sha256((model + flags + torch.__version__).encode()).hexdigest()[:12]


def build_dir() -> Path:
    root = Path(os.environ.get("SCALESIM_KERNEL_CACHE", Path.home() / ".cache" / "scalesim" / "kernels"))
    source_hash = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return root / f"paged_decode-{source_hash}-{_cpu_signature()}"


def available() -> bool:
    """Build (once per process, and once per machine on disk) and load the kernel; False if it
    cannot be built here."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return bool(_state["ok"])


def _load() -> bool:
    if os.environ.get("SCALESIM_NO_KERNELS"):
        return False
    if hasattr(torch.ops, "scalesim") and hasattr(torch.ops.scalesim, "paged_decode"):
        return True
    try:
        import sys

        import ninja
        from torch.utils.cpp_extension import load

        # torch finds ninja on PATH: add the pinned one (and this venv's bin) in case the venv is not activated
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        load(name="scalesim_paged_decode", sources=[str(SOURCE)], build_directory=str(directory),
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return True
    except Exception as exc:  # no compiler, no ninja, a failed build: the gather path still works
        log.warning("paged decode kernel unavailable, decode attention gathers contexts instead: %s", exc)
        return False


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] against each sequence's first context_lens[b] cached tokens, found
    through block_tables [B, blocks] (int64); q float32, the caches float32 or bfloat16; returns
    [B, heads, head_dim] in float32."""
    return torch.ops.scalesim.paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
