"""scripts/device_check.sh, the one prepared GPU run, works before device time is spent on it: its
smoke mode runs every step at toy sizes on this CPU, with the packages the GPU machine lacks
(the server's and the openai client) made unimportable, and reports each step's result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("fastapi", "uvicorn", "starlette", "sse_starlette", "openai", "ray")
BLOCKER = f'''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"no module named {{name!r}} on the GPU machine", name=name)
sys.meta_path.insert(0, _Absent())
'''


@pytest.mark.slow
def test_the_device_check_runs_every_step_without_the_packages_the_gpu_machine_lacks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE_CHECK_SMOKE": "1", "PYTHON": sys.executable, "OUT": str(out),
           "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "device-check.json").read_text())
    failed = {name: step["exit_code"] for name, step in report["steps"].items() if step["exit_code"] != 0}
    assert not failed, (failed, (out / "device-check.log").read_text()[-5000:])
    assert set(report["steps"]) == {"env", "cuda-tests", "tests", "transfer", "engine-batch-1", "engine-batch-4", "adapters",
                                    "memory", "bench-tiered", "bench-hicache"}
    assert all(report["steps"][name]["result"] for name in report["steps"] if name not in ("env", "cuda-tests", "tests"))
    assert "no module named 'openai' on the GPU machine" not in (out / "device-check.log").read_text()
