"""Workload generators, the runner and the side-by-side policy bench (CI-sized)."""

import json

import pytest

from scalesim.cli import main
from scalesim.sim.workloads import WORKLOADS, WorkloadConfig


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_generators_are_seeded_and_grounded(name):
    cfg = WorkloadConfig(agents=16, steps=4, seed=3, state="lora-cluster")
    first, again = WORKLOADS[name](cfg), WORKLOADS[name](cfg)
    assert first == again
    assert first != WORKLOADS[name](WorkloadConfig(agents=16, steps=4, seed=4, state="lora-cluster"))
    assert first.num_calls > 0 and len(first.steps) <= 4
    ids = {a.agent_id for a in first.agents}
    for step in first.steps:
        for i, call in enumerate(step.calls):
            assert call.agent_id in ids and all(j < i for j in call.after), "dependencies point backwards"
        assert step.hints, "a real simulation knows something about who calls next"
    assert {a.adapter_cluster for a in first.agents} <= set(range(cfg.clusters))
    future = first.future()
    assert sum(len(v) for v in future.values()) == first.num_calls


def test_feed_activates_a_sparse_share_of_agents_each_step():
    trace = WORKLOADS["feed"](WorkloadConfig(agents=200, steps=10))
    shares = [len({c.agent_id for c in s.calls}) / 200 for s in trace.steps]
    assert 0.02 < sum(shares) / len(shares) < 0.3


def test_quick_bench_completes_every_request_under_every_policy(tmp_path):
    out, plot = tmp_path / "results.json", tmp_path / "plot.png"
    assert main(["bench", "feed,rounds", "--quick", "--model", "tiny-random", "--policies", "ideal,scalesim,lru,oracle",
                 "--out", str(out), "--plot", str(plot)]) == 0
    results = json.loads(out.read_text())
    assert [r["workload"] for r in results] == ["feed", "rounds"]
    for result in results:
        assert set(result["ratios"]) == {"scalesim_vs_ideal", "lru_vs_scalesim"}
        for run in result["runs"]:
            assert run["requests"] == result["calls"], run["policy"]
            assert run["tokens_out"] == 4 * result["calls"]
            for key in ("makespan_s", "ttft_mean_s", "ttft_p90_s", "device_hit_rate", "device_hit_rate_per_kind",
                        "bytes_loaded", "stall_s", "recomputed_tokens", "prefetch_used", "prefetch_wasted"):
                assert key in run
    assert plot.stat().st_size > 10_000


def test_quick_bench_with_per_agent_adapters_and_repeats(tmp_path):
    out = tmp_path / "results.json"
    assert main(["bench", "town", "--quick", "--model", "tiny-random", "--state", "lora-cluster", "--repeats", "3",
                 "--policies", "scalesim,lru", "--out", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    run = result["runs"][0]
    assert run["policy"] == "scalesim" and "adapter" in run["device_hit_rate_per_kind"]
    assert len(run["makespans_s"]) == 3 and run["makespan_s"] == sorted(run["makespans_s"])[1]
    assert result["repeats"] == 3 and "lru_vs_scalesim" in result["ratios"]


def test_hint_noise_sweep_runs_scalesim_per_level_with_references(tmp_path):
    out, plot = tmp_path / "noise.json", tmp_path / "noise.png"
    assert main(["bench", "feed", "--quick", "--model", "tiny-random", "--hint-noise-sweep", "0,2,inf",
                 "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())[0]
    assert set(result["reference_makespan_s"]) == {"ideal", "lru"}
    assert [p["hint_noise_steps"] for p in result["sweep"]] == [0, 2, None]
    assert [p["hints"].split()[0] for p in result["sweep"]] == ["exact", "noisy", "withheld"]
    assert all(p["makespan_s"] > 0 for p in result["sweep"]) and plot.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["bench", "nope", "--quick"], "unknown workload"),
    (["bench", "feed", "--quick", "--hint-noise-sweep", "1,-2"], "--hint-noise-sweep"),
    (["bench", "feed", "--quick", "--policies", "ideal,fifo"], "unknown policy"),
    (["bench", "feed", "--quick", "--device-fraction", "0"], "--device-fraction"),
    (["bench", "feed", "--quick", "--host-fraction", "1.5"], "--host-fraction"),
])
def test_bad_bench_input_is_a_one_line_error_with_exit_code_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_gpu_projection_is_labelled_and_runs_the_real_policy_code(capsys):
    assert main(["project", "feed", "--agents", "200", "--steps", "4", "--policies", "ideal,scalesim,lru,oracle"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "PROJECTION" in result["label"] and result["is_measurement"] is False
    runs = {r["policy"]: r for r in result["runs"]}
    assert set(runs) == {"ideal", "scalesim", "lru", "oracle"}
    assert runs["ideal"]["stall_s"] == 0.0 and runs["ideal"]["recomputed_tokens"] == 0
    assert all(r["makespan_s"] >= runs["ideal"]["makespan_s"] * 0.999 for r in runs.values())


def test_a_target_url_that_does_not_answer_is_a_one_line_error(capsys):
    assert main(["bench", "feed", "--quick", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not answer" in err and "\n" not in err
