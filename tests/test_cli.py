"""The `scalesim` command: help for every flag, generation, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from scalesim.bench.amx_linear_bench import CHAIN_ROWS as AMX_CHAIN_ROWS
from scalesim.bench.int8_bench import CASE_LABELS, markdown_table
from scalesim.layers import amx_linear
from scalesim.cli import build_parser, main
from scalesim.layers.weight_only import available as weight_only_available


def test_generate_help_explains_every_flag():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_generate_prints_a_completion(capsys):
    assert main(["generate", "tiny-random", "hello world", "--max-tokens", "5", "--kv-cache-memory", "4MiB"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_unknown_model_is_a_one_line_error_with_exit_code_2(capsys):
    assert main(["generate", "no-such-model", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scalesim: error: unknown model") and "\n" not in err


def test_bad_flag_value_is_exit_code_2(capsys):
    assert main(["generate", "tiny-random", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_as_a_process():
    done = subprocess.run([sys.executable, "-m", "scalesim.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "generate" in done.stdout


def test_memory_flags_reach_the_engine(capsys):
    assert main(["generate", "tiny-random", "hi", "--max-tokens", "2", "--policy", "lru", "--device-memory", "1MiB",
                 "--host-memory", "2MiB"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "tiny-random", "hi", "--device-memory", "lots"]) == 2
    assert "not a byte size" in capsys.readouterr().err


def test_unknown_policy_is_rejected_by_the_parser():
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "tiny-random", "hi", "--policy", "nope"])
    assert exit_info.value.code == 2


def test_memory_microbench_writes_the_decision_percentiles(tmp_path, capsys):
    import json
    out = tmp_path / "memory.json"
    assert main(["microbench", "memory", "--agents", "200", "--objects", "2000", "--steps", "100",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["objects"] == 2000 and result["decision_ms_p99"] >= result["decision_ms_p50"] > 0


def test_engine_microbench_runs_transformers_on_the_engines_device(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert main(["microbench", "engine", "--model", "tiny-random", "--batch", "2", "--prompt-len", "8",
                 "--gen-len", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")  # the device `auto` picks
    assert result["scalesim_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0


def test_transfer_microbench_measures_both_directions_and_the_overlap(tmp_path, capsys):
    """Page-locked host memory exists only beside CUDA: on a CPU the copies are pageable alone."""
    out = tmp_path / "transfer.json"
    assert main(["microbench", "transfer", "--nbytes", "4MiB", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    memories = ["pageable", "pinned"] if torch.cuda.is_available() else ["pageable"]
    assert sorted(result["gb_per_s"]) == sorted(f"{d}.{m}" for d in ("host_to_device", "device_to_host")
                                                  for m in memories)
    assert all(rate > 0 for rate in result["gb_per_s"].values())
    assert all(len(seconds) == 2 for seconds in result["seconds"].values())
    assert result["both_s"] > 0 and result["overlap_ratio"] > 0 and result["compute_slowdown"] > 0


@pytest.mark.skipif(not weight_only_available(), reason="the weight-only kernel needs an x86 CPU with AVX2, FMA and F16C")
def test_int8_microbench_times_both_kinds_in_every_case(tmp_path, capsys):
    out = tmp_path / "int8.json"
    assert main(["microbench", "int8", "--model", "tiny-random", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cases"]) == set(CASE_LABELS)
    for case in result["cases"].values():  # (tiny-random's speeds mean nothing: its steps are all overhead)
        assert all(len(case["values"][kind]) == 2 and min(case["values"][kind]) > 0 for kind in ("fp32", "int8"))
    assert markdown_table(result).count("\n") == len(CASE_LABELS) + 1


@pytest.mark.skipif(not amx_linear.available(), reason="the AMX tile linear needs AMX-BF16")
def test_amx_linears_microbench_times_both_kernels_in_every_case(tmp_path, capsys):
    out = tmp_path / "amx.json"
    assert main(["microbench", "amx-linears", "--model", "tiny-random", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {f"linears_{rows}_rows" for rows in AMX_CHAIN_ROWS} | {
        "prefill_8x512", "decode_b1", "decode_b16"}
    for case in result["cases"].values():
        assert all(len(case["values"][kind]) == 2 and min(case["values"][kind]) > 0 for kind in ("onednn", "tiles"))


@pytest.mark.parametrize("formats", ["auto", "fp16,fp16", "int4", ","])
def test_peer_bench_refuses_arms_it_cannot_name_before_starting_anything(formats, capsys):
    """The bench names ScaleSim's dtype, so an `auto` arm would only repeat `none`."""
    assert main(["microbench", "peer", "--scalesim-quantization", formats, "--peer-python", "/no/such/python"]) == 2
    assert "--scalesim-quantization takes distinct formats" in capsys.readouterr().err
