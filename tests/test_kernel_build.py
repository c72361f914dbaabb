"""Kernel builds survive a process killed mid-build: torch's `lock` file that it leaves behind
made every later start wait forever (a clean CI run hung in its first test on one)."""

import os
import shutil
import subprocess
import sys

import pytest

from scalesim.layers import fused, kernel_build

pytestmark = pytest.mark.skipif(not kernel_build.load(fused.SOURCE), reason="fused kernels cannot be built here")


def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_one(tmp_path):
    built = kernel_build.build_dir(fused.SOURCE)  # this process has just built or loaded it
    cache = tmp_path / "kernels"
    stale = cache / built.name
    shutil.copytree(built, stale)  # copy2 keeps mtimes: ninja finds it up to date
    (stale / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    env = {**os.environ, "SCALESIM_KERNEL_CACHE": str(cache)}
    probe = "from scalesim.layers import fused, kernel_build; print(kernel_build.load(fused.SOURCE))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert not (stale / "lock").exists()


def test_the_build_compiles_its_own_copy_so_another_checkout_of_the_same_text_reuses_it():
    built = kernel_build.build_dir(fused.SOURCE)
    ninja = (built / "build.ninja").read_text()
    # torch's build file names the source by path: the checkout's own path made every other
    # checkout (a worktree, a fresh clone) rebuild it
    assert str(built / fused.SOURCE) in ninja and str(kernel_build.KERNELS) not in ninja
    assert (built / fused.SOURCE).read_bytes() == (kernel_build.KERNELS / fused.SOURCE).read_bytes()
