"""Build and load the C++ kernels of layers/kernels/ (torch operators under `torch.ops.scalesim`).

Each source is compiled on first use with the machine's compiler (`-O3 -march=native`, so the
build directory is per CPU model and flags, and per source) into ~/.cache/scalesim/kernels,
which takes about a minute once. Where a source cannot be built (no compiler), `load` returns
False, a warning says why, and the layers keep their plain-PyTorch path. `SCALESIM_NO_KERNELS=1`
turns every kernel off (the plain path, for comparisons).

Processes that start together (a server and its tests, several workers) build each source once:
they take an `flock` on the build directory, which the OS drops when its holder dies. torch's own
guard is a `lock` file that a process killed mid-build leaves behind, after which every later
build waits on it forever; under our flock no one else is building, so such a file is stale and
is removed.
"""

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
KERNELS = Path(__file__).parent / "kernels"
# -fno-trapping-math: without it GCC keeps a float-to-int conversion behind a comparison (an
# exp's clamp) as a branch and vectorizes none of the loop; the kernels never read FP exceptions.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def cpuinfo_lines() -> tuple[str, str]:
    """The first CPU's `model name` and `flags` lines of /proc/cpuinfo, whole; without that file,
    the platform's processor name and no flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor(), ""
    model = next((line for line in info if line.startswith("model name")), "")
    flags = next((line for line in info if line.startswith("flags")), "")
    return model, flags


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    model, flags = cpuinfo_lines()
    return hashlib.sha256((model + flags + torch.__version__).encode()).hexdigest()[:12]


def build_dir(source: str) -> Path:
    """Where `source` (a file name in layers/kernels/) is built: per source text (with the
    headers beside it), CPU and torch version."""
    root = Path(os.environ.get("SCALESIM_KERNEL_CACHE", Path.home() / ".cache" / "scalesim" / "kernels"))
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in [KERNELS / source, *sorted(KERNELS.glob("*.h"))]:
        digest.update(path.read_bytes())
    return root / f"{Path(source).stem}-{digest.hexdigest()[:12]}-{_cpu_signature()}"


def load(source: str) -> bool:
    """Build (once per machine on disk) and load layers/kernels/`source` into this process, once;
    False, with a warning, where it cannot be built here or kernels are turned off."""
    loaded = _loaded.get(source)  # the layers ask on every call: no lock once it is known
    if loaded is not None:
        return loaded
    with _lock:
        if source not in _loaded:
            _loaded[source] = _build(source)
        return _loaded[source]


def _build(source: str) -> bool:
    if os.environ.get("SCALESIM_NO_KERNELS"):
        return False
    try:
        import ninja
        from torch.utils.cpp_extension import load as cpp_load

        # torch finds ninja on PATH: add the pinned one (and this venv's bin) in case the venv is not activated
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        directory = build_dir(source)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "build.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # another process building this source: wait for it
            (directory / "lock").unlink(missing_ok=True)  # torch's baton, left by a build that was killed
            # Build from copies inside the (content-addressed) directory: torch's build file names the
            # source by its path, so compiling the checkout's own file made every other checkout of the
            # same text (a worktree, a fresh clone) rebuild, a minute each time.
            for path in [KERNELS / source, *KERNELS.glob("*.h")]:
                if not (directory / path.name).is_file() or (directory / path.name).read_bytes() != path.read_bytes():
                    shutil.copyfile(path, directory / path.name)
            cpp_load(name=f"scalesim_{Path(source).stem}", sources=[str(directory / source)], build_directory=str(directory),
                     extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                     is_python_module=False, verbose=False)
        return True
    except Exception as exc:  # no compiler, no ninja, a failed build: the plain path still works
        log.warning("kernel %s unavailable, its layers run in plain PyTorch: %s", source, exc)
        return False
