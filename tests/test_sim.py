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
    """Every policy completes every request with the tiers it is meant to have (and `ideal`,
    which the bench checks moved nothing, ran without raising)."""
    out, plot = tmp_path / "results.json", tmp_path / "plot.png"
    assert main(["bench", "feed,rounds", "--quick", "--model", "tiny-random", "--regime", "tiered", "--policies",
                 "ideal,scalesim,lru,oracle,sglang,sglang-hicache,vllm,scalesim-evict-only,scalesim-prefetch-only",
                 "--out", str(out),
                 "--plot", str(plot)]) == 0
    results = json.loads(out.read_text())
    assert [r["workload"] for r in results] == ["feed", "rounds"]
    for result in results:
        assert set(result["ratios"]) == {"scalesim_vs_ideal", "lru_vs_scalesim", "oracle_vs_scalesim",
                                         "sglang_vs_scalesim", "sglang_hicache_vs_scalesim", "vllm_vs_scalesim",
                                         "scalesim_evict_only_vs_scalesim", "scalesim_prefetch_only_vs_scalesim"}
        assert result["measured_on"]["cpu"]["cores"] >= 1 and result["measured_on"]["date_utc"]
        assert result["regime"]["name"] == "tiered" and result["verdicts"] == {}  # one run each: no verdicts
        tiers = {r["policy"]: (r["device_nbytes"], r["host_nbytes"], r["disk"]) for r in result["runs"]}
        device, host = result["device_nbytes"], result["host_nbytes"]
        assert device == int(0.25 * result["total_state_nbytes"]) and host == int(0.25 * result["total_state_nbytes"])
        assert tiers["scalesim"] == tiers["lru"] == tiers["oracle"] == (device, host, True)
        assert tiers["sglang"] == tiers["vllm"] == (device, 0, False)
        assert tiers["sglang-hicache"] == (device, 2 * device, False)
        assert tiers["scalesim-evict-only"] == tiers["scalesim-prefetch-only"] == tiers["scalesim"]
        assert tiers["ideal"][0] > result["total_state_nbytes"] and tiers["ideal"][1:] == (0, False)
        ideal = next(r for r in result["runs"] if r["policy"] == "ideal")
        assert ideal["bytes_loaded"] == 0 and ideal["recomputed_tokens"] == 0
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
                 "--policies", "ideal,scalesim,lru", "--out", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    run = result["runs"][1]
    assert run["policy"] == "scalesim" and "adapter" in run["device_hit_rate_per_kind"]
    assert len(run["makespans_s"]) == 3 and run["makespan_s"] == sorted(run["makespans_s"])[1]
    assert result["repeats"] == 3 and "lru_vs_scalesim" in result["ratios"]
    assert result["order"] == ["ideal", "scalesim", "lru", "scalesim", "lru", "ideal", "lru", "ideal", "scalesim"]
    ideal = result["runs"][0]["makespans_s"]
    assert result["noise_floor"] == pytest.approx((max(ideal) - min(ideal)) / sorted(ideal)[1], abs=1e-4)
    assert result["verdicts"]["lru_vs_scalesim"] in ("parity", "scalesim faster", "scalesim slower")


def test_hint_noise_sweep_runs_scalesim_per_level_with_references(tmp_path):
    out, plot = tmp_path / "noise.json", tmp_path / "noise.png"
    assert main(["bench", "feed", "--quick", "--model", "tiny-random", "--hint-noise-sweep", "0,2,inf",
                 "--repeats", "2", "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())[0]
    assert set(result["reference_makespan_s"]) == {"ideal", "oracle", "lru"}
    assert all(len(v) == 2 for v in result["reference_makespans_s"].values())
    assert all(len(p["makespans_s"]) == 2 for p in result["sweep"]) and result["noise_floor"] is not None
    assert result["order"][:8] != result["order"][8:]  # the second round starts one run later
    assert [p["hint_noise_steps"] for p in result["sweep"]] == [0, 2, None]
    breakdowns = [b for p in result["sweep"] for b in p["breakdowns"]] + \
        [b for runs in result["reference_breakdowns"].values() for b in runs]
    assert len(breakdowns) == 12 and all(b["forward_s"] > 0 for b in breakdowns)
    assert [p["hints"].split()[0] for p in result["sweep"]] == ["exact", "noisy", "withheld"]
    assert all(p["makespan_s"] > 0 for p in result["sweep"]) and plot.stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["bench", "nope", "--quick"], "unknown workload"),
    (["bench", "feed", "--quick", "--hint-noise-sweep", "1,-2"], "--hint-noise-sweep"),
    (["bench", "feed", "--quick", "--policies", "ideal,fifo"], "unknown policy"),
    (["bench", "feed", "--quick", "--device-fraction", "0"], "--device-fraction"),
    (["bench", "feed", "--quick", "--host-fraction", "1.5"], "--host-fraction"),
    (["bench", "feed", "--quick", "--regime", "cloud"], "--regime"),
    (["project", "feed", "--replicas", "0"], "--replicas must be at least 1"),
    (["project", "feed", "--replicas", "2", "--routing", "affine,hash"], "unknown routing"),
    (["project", "feed", "--replicas", "2", "--policy", "fifo"], "unknown policy"),
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


def test_the_projection_runs_calls_that_find_no_room_in_later_waves_and_its_tracker_on_projected_time(monkeypatch):
    from scalesim.bench import costmodel
    from scalesim.sim.workloads import WORKLOADS, WorkloadConfig

    seen_s: list[float] = []

    class Recording(costmodel.DistanceTracker):
        def on_request(self, agent_id, *args, **kwargs):
            seen_s.append(self.clock())
            return super().on_request(agent_id, *args, **kwargs)

    monkeypatch.setattr(costmodel, "DistanceTracker", Recording)
    trace = WORKLOADS["feed"](WorkloadConfig(agents=60, steps=4, state="lora-agent", output_tokens=64))
    tight = costmodel.project(trace, "lru", device_fraction=0.02, host_fraction=0.0, disk=False)
    tight_seen_s = list(seen_s)
    roomy = costmodel.project(trace, "lru", device_fraction=1.0, host_fraction=0.0, disk=False)
    # with no host and no disk, what is evicted is recomputed; calls wait for room in more waves
    assert tight["recomputed_tokens"] > roomy["recomputed_tokens"] == 0
    assert tight["batch_waves"] > roomy["batch_waves"] == len(trace.steps)
    assert tight["makespan_s"] > roomy["makespan_s"] and tight["prefill_s"] > roomy["prefill_s"]
    with_disk = costmodel.project(trace, "lru", device_fraction=0.02, host_fraction=0.0)
    # reloaded from disk instead (only a context larger than the whole device is still recomputed)
    assert with_disk["recomputed_tokens"] < tight["recomputed_tokens"] and with_disk["loaded_bytes"] > 0
    # the tracker's clock is the projected time: it starts at 0 and moves on with every step
    assert tight_seen_s[0] == 0.0 and tight_seen_s[-1] > 0.0 and tight_seen_s == sorted(tight_seen_s)


def test_the_projection_recomputes_a_context_that_never_fit_once_per_call():
    from scalesim.bench import costmodel
    from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace

    words = " ".join(["word"] * 200)
    trace = Trace("two", [AgentSpec("a", words), AgentSpec("b", words)],
                  [Step(0, [Call("a", words, 8), Call("b", words, 8)]), Step(1, [Call("a", words, 8)])])
    run = costmodel.project(trace, "lru", device_fraction=1e-6, host_fraction=0.0)  # no context ever fits
    assert run["recomputed_tokens"] == costmodel.context_tokens(trace)["a"]  # a's second call, once
    assert run["failed_loads"] == 0  # a context that is gone is recomputed, not a load that failed


def test_a_target_url_that_does_not_answer_is_a_one_line_error(capsys):
    assert main(["bench", "feed", "--quick", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not answer" in err and "\n" not in err


def test_rotated_rounds_run_every_policy_once_per_round_from_a_new_start():
    from scalesim.bench.sim_bench import rotated_order

    order = rotated_order(("a", "b", "c"), 4)
    rounds = [order[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]


def test_a_ratio_inside_the_noise_floor_is_parity():
    from scalesim.bench.sim_bench import verdict

    assert verdict(1.10, 0.12) == "parity" and verdict(0.90, 0.12) == "parity"
    assert verdict(1.30, 0.12) == "scalesim faster" and verdict(0.70, 0.12) == "scalesim slower"


def test_the_limit_refuses_a_run_that_moved_state():
    from scalesim.bench.sim_bench import check_ideal

    check_ideal({"bytes_in": 4096, "bytes_in.adapter.disk": 4096, "hit.kv.device": 10})  # an adapter's first read
    with pytest.raises(RuntimeError, match="bytes_in.kv"):
        check_ideal({"bytes_in.kv.host": 4096})
    with pytest.raises(RuntimeError, match="dropped"):
        check_ideal({"bytes_in": 0, "dropped": 3})


@pytest.mark.parametrize("regime, host, disk", [("hbm-only", 0.0, False), ("hicache", 0.5, False),
                                                ("tiered", 0.25, True), ("roomy", 1.0, False)])
def test_regimes_set_the_tiers_and_baselines_keep_their_own(regime, host, disk):
    from scalesim.bench.regimes import REGIMES, resolve_regime
    from scalesim.bench.sim_bench import BenchSetup, Budgets, policy_budgets

    r = REGIMES[regime]
    assert (r.device_fraction, r.host_fraction, r.disk) == (0.25, host, disk)
    setup = BenchSetup(None, {}, 1000, r, 250, int(1000 * host), 5000, 1, {})
    assert policy_budgets(setup, "scalesim") == policy_budgets(setup, "lru") == Budgets(250, int(1000 * host), disk)
    assert policy_budgets(setup, "sglang") == Budgets(250, 0, False)
    assert policy_budgets(setup, "sglang-hicache") == Budgets(250, 500, False)
    assert policy_budgets(setup, "ideal") == Budgets(5000, 0, False)
    assert resolve_regime(regime, host_fraction=0.1).name == regime + "*"


def test_peer_counts_read_the_servers_own_metrics():
    """`bench --peer` reads prompt and cached tokens from each server's /metrics: on a real
    ScaleSim server, a prompt sent twice counts twice, and the second finds its prefix cached."""
    import httpx

    from scalesim.async_llm import AsyncLLM
    from scalesim.bench.peer_bench import Server
    from scalesim.bench.peer_sim import scalesim_counts, scrape, vllm_counts
    from scalesim.server.config import ServerConfig
    from tests.server_util import running_server

    llm = AsyncLLM("tiny-random", dtype="fp32", kv_cache_memory="4MiB", block_size_tokens=4, host_memory=0)
    with running_server(llm, ServerConfig("tiny-random")) as base:
        server = Server("scalesim", None, base, "tiny-random", "-")
        before = scrape(server)
        body = {"model": "tiny-random", "prompt": list(range(10, 50)), "max_tokens": 1, "temperature": 0}
        usage = [httpx.post(base + "/v1/completions", json=body, timeout=60).json()["usage"] for _ in range(2)]
        counts = scalesim_counts(before, scrape(server))
    assert counts["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage) == 80
    assert 0 < counts["cached_prompt_tokens"] < 40 and counts["computed_prompt_tokens"] == 80 - counts["cached_prompt_tokens"]
    assert counts["kv_hit_tokens"]["device"] == counts["cached_prompt_tokens"]
    theirs = vllm_counts({"vllm:prompt_tokens_total": 5.0}, {"vllm:prompt_tokens_total": 105.0,
                                                              "vllm:prefix_cache_hits_total": 30.0,
                                                              "vllm:prefix_cache_queries_total": 100.0})
    assert theirs["computed_prompt_tokens"] == 70 and theirs["prefix_cache_hit_rate"] == 0.3
    assert theirs["cached_share"] == 0.3 and counts["cached_share"] == round(counts["cached_prompt_tokens"] / 80, 4)


def test_the_n_replica_projection_routes_with_the_placement_code_and_charges_split_histories():
    """A model projection (bench/cluster_projection.py), checked for its bookkeeping: one replica
    is the same whatever the routing; over 4 replicas, affinity keeps one engine's hit rate while
    spreading the calls splits histories, which are recomputed."""
    from scalesim.bench.cluster_projection import project_replicas
    from scalesim.sim.workloads import WORKLOADS, WorkloadConfig

    def trace():
        return WORKLOADS["feed"](WorkloadConfig(agents=300, steps=8, output_tokens=64))

    one = {r: project_replicas(trace(), r, 1) for r in ("affine", "random", "power-of-two")}
    assert len({(r["makespan_s"], r["prefill_tokens"]) for r in one.values()}) == 1
    four = {r: project_replicas(trace(), r, 4) for r in ("affine", "random")}
    assert abs(four["affine"]["prefix_hit_rate"] - one["affine"]["prefix_hit_rate"]) < 0.05
    assert four["random"]["prefix_hit_rate"] < 0.6 * four["affine"]["prefix_hit_rate"]
    assert four["random"]["prefill_tokens"] > four["affine"]["prefill_tokens"]
    assert four["affine"]["prompt_tokens"] == four["random"]["prompt_tokens"], "the same calls, charged per call"
    assert four["affine"]["max_over_mean_calls"] <= 1.25 + 0.05


def test_the_projection_runs_a_step_that_does_not_fit_the_device_in_waves_that_reread_the_weights():
    from scalesim.bench import costmodel
    from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace

    words = " ".join(["word"] * 200)
    trace = Trace("two", [AgentSpec("a", words), AgentSpec("b", words)],
                  [Step(0, [Call("a", words, 8), Call("b", words, 8)]), Step(1, [Call("a", words, 8)])])
    half = costmodel.project(trace, "lru", device_fraction=0.65, host_fraction=1.0)  # a (796 tokens), not a and b (1,324)
    roomy = costmodel.project(trace, "lru", device_fraction=1.0, host_fraction=1.0)
    assert (half["batch_waves"], roomy["batch_waves"]) == (3, 2)  # step 0 in two waves, then one
    model, hardware = costmodel.ModelProfile(), costmodel.HardwareProfile()
    weights_per_token_s = model.params * model.bytes_per_param / hardware.hbm_bytes_per_s
    # one more read of the weights per decode token of step 0 (the result keeps 4 decimals)
    assert half["decode_s"] - roomy["decode_s"] == pytest.approx(8 * weights_per_token_s, abs=2e-4)


RANKING_MARGIN = 0.25  # the projection's gaps smaller than this are not read as a ranking (noise is about 20%)
MEASURED_NOISE = 0.20  # one measured run each: a reversal smaller than this is parity, not the other order


@pytest.mark.slow
def test_the_projection_ranks_the_policies_as_a_measured_run_does(tmp_path):
    """The cost model (bench/costmodel.py), given what a measured quick run on SmolLM2-135M ran
    (the survey, where every agent calls in a phase: the model separates the policies there; on
    the quick town it puts all three within 18% of each other), orders every pair of policies it
    separates by more than RANKING_MARGIN as the measurement does, or at parity with it (one
    measured run each: within MEASURED_NOISE); at least one pair apart from
    the unbounded limit is separated, so the check is about the memory policies and can fail."""
    from scalesim.bench.costmodel import CPU_2CORE, project_measured

    out = tmp_path / "measured.json"
    assert main(["bench", "survey", "--quick", "--model", "smollm2-135m", "--state", "lora-agent", "--regime",
                 "tiered", "--policies", "ideal,scalesim,sglang", "--out", str(out)]) == 0
    measured = json.loads(out.read_text())[0]
    projected = project_measured(measured, CPU_2CORE)
    assert projected["is_measurement"] is False
    measured_runs = {r["policy"]: r for r in measured["runs"]}
    projected_runs = {r["policy"]: r for r in projected["runs"]}
    projected_s = {p: r["makespan_s"] for p, r in projected_runs.items()}
    separated = [(a, b) for a in projected_s for b in projected_s if projected_s[b] > (1 + RANKING_MARGIN) * projected_s[a]]
    assert any("ideal" not in pair for pair in separated), projected_s
    for faster, slower in separated:  # the measurement does not order them the other way beyond its noise
        assert measured_runs[faster]["makespan_s"] < (1 + MEASURED_NOISE) * measured_runs[slower]["makespan_s"], \
            (faster, slower, projected_s, {p: r["makespan_s"] for p, r in measured_runs.items()})


@pytest.mark.parametrize("content, message", [
    (None, "cannot read --measured"),
    ("{not json", "Expecting property name"),
    ('{"a": 1}', "not a `scalesim bench` result"),
    ('[{"workload": "town", "runs": []}]', "lacks state_sizes"),
])
def test_projecting_a_file_that_is_not_a_bench_result_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    assert main(["project", "--measured", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
