"""`scalesim serve --replicas N`: bad input is one line and exit code 2, never a hang."""

import subprocess
import sys

import pytest

from scalesim.cli import main


def _serve_error(capsys, *flags: str) -> str:
    assert main(["serve", "tiny-random", *flags]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_zero_replicas_is_refused_before_anything_starts(capsys):
    assert _serve_error(capsys, "--replicas", "0") == "scalesim: error: --replicas must be at least 1, got 0"


def test_without_ray_installed_scale_out_says_how_to_get_it():
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from scalesim.cli import main; sys.exit(main(['serve', 'tiny-random', '--replicas', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("scalesim: error: --replicas over 1 and --ray-address need Ray Serve: "
                                   "pip install 'scalesim[ray]'")


def test_one_engine_imports_nothing_of_ray():
    code = ("import sys; from scalesim.cli import build_parser, _engine_args; from scalesim.server import serve\n"
            "args = build_parser().parse_args(['serve', 'tiny-random', '--embedding-model', 'none'])\n"
            "serve.build_server(args, _engine_args(args))\n"
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr


@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_clear_line(capsys):
    pytest.importorskip("ray")
    line = _serve_error(capsys, "--replicas", "2", "--ray-address", "127.0.0.1:9")
    assert line.startswith("scalesim: error: cannot start or reach Ray at 127.0.0.1:9")


@pytest.mark.slow
def test_a_replica_that_cannot_load_its_model_fails_start_up_with_its_error(capsys):
    pytest.importorskip("ray")
    import ray
    assert main(["serve", "/no/such/model", "--replicas", "2", "--replica-cpus", "0.5"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    ray.shutdown()
    assert line.startswith("scalesim: error: the engine replicas did not start: engine: ")
    assert "unknown model '/no/such/model'" in line


def test_replicas_reserve_a_gpu_only_where_they_will_use_it():
    from scalesim.cluster.launch import replica_gpus
    assert replica_gpus("cuda", "none", lambda: 0) == 1
    assert replica_gpus("auto", "none", lambda: 2) == 1
    assert replica_gpus("auto", "none", lambda: 0) == 0
    assert replica_gpus("auto", "int8", lambda: 2) == 0  # int8 runs on the CPU: `auto` means the CPU there
    assert replica_gpus("cpu", "none", lambda: 2) == 0
