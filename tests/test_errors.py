"""Bad input gets a clear error, and the engine keeps serving afterwards."""

import pytest

from scalesim import LLM, SamplingParams
from scalesim.errors import InvalidRequestError, ModelLoadError, RequestTooLargeError
from scalesim.models.registry import resolve_model


def _still_serves(llm: LLM) -> None:
    out = llm.generate([[10, 11, 12]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        LLM("no-such-model")


def _copy_model(tmp_path):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-random"), folder)
    return folder


def test_missing_weight_file(tmp_path):
    folder = _copy_model(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(folder))


def test_corrupt_weight_file(tmp_path):
    folder = _copy_model(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt weight file"):
        LLM(str(folder))


def test_weight_file_of_another_shape(tmp_path):
    import json
    folder = _copy_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        LLM(str(folder))


def test_prompt_longer_than_the_context():
    llm = LLM("tiny-random", kv_cache_memory="4MiB", max_model_len=64)
    with pytest.raises(RequestTooLargeError, match="context is 64 tokens"):
        llm.generate([list(range(10, 80))], SamplingParams(max_tokens=4))
    _still_serves(llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"stop": ["x"] * 17}, "stop strings"),
    ({"stop": [""]}, "stop string"),
    ({"n": 0}, "n must"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("agent_id", [42, b"bytes", "", "x" * 1000])
def test_agent_id_must_be_a_short_string(tiny_llm, agent_id):
    with pytest.raises(InvalidRequestError, match="agent_id"):
        tiny_llm.generate([[10, 11]], SamplingParams(max_tokens=2), agent_ids=[agent_id])
    _still_serves(tiny_llm)


@pytest.mark.parametrize("prompt", ["", [], [10, 10**9], [10, -1], [1.5]])
def test_bad_prompts(tiny_llm, prompt):
    with pytest.raises(InvalidRequestError, match="prompt"):
        tiny_llm.engine.add_request(prompt, SamplingParams(max_tokens=2))
    assert not tiny_llm.engine.has_unfinished()
    _still_serves(tiny_llm)


def test_bad_chat_messages(tiny_llm):
    with pytest.raises(InvalidRequestError):
        tiny_llm.chat([{"content": "no role"}])
    _still_serves(tiny_llm)
