"""Model names as unmodified frameworks send them: several served names, aliases (`gpt-4`), and
`accept_any_model`; through the official openai client."""

import pytest
from openai import NotFoundError, OpenAI

from scalesim import AsyncLLM
from scalesim.server.app import build_app
from scalesim.server.config import ServerConfig
from tests.server_util import running_server

MODEL = "tiny-random"
HI = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(MODEL, kv_cache_memory="8MiB", block_size_tokens=4)
    yield engine
    engine.shutdown()


def _client(base: str) -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def _reply(client: OpenAI, model: str) -> str:
    return client.chat.completions.create(model=model, messages=HI, max_tokens=3, temperature=0).model


def test_served_names_and_aliases_answer_and_others_are_a_404(llm):
    config = ServerConfig(MODEL, extra_model_names=["local-llm"], model_aliases={"gpt-4": MODEL, "gpt-4o": "local-llm"})
    with running_server(llm, config, shutdown_llm=False) as base:
        client = _client(base)
        for name in (MODEL, "local-llm", "gpt-4", "gpt-4o", "gpt-4@ada"):
            assert _reply(client, name) == name  # the reply names what was asked for, as OpenAI's do
        with pytest.raises(NotFoundError) as refused:
            _reply(client, "gpt-4o-2024-05-13")
        assert refused.value.body["code"] == "model_not_found"
        cards = {m.id: (m.kind, m.root) for m in client.models.list().data}
        assert cards == {MODEL: ("base", None), "local-llm": ("base", MODEL), "gpt-4": ("alias", MODEL),
                         "gpt-4o": ("alias", "local-llm")}


def test_accept_any_model_answers_every_name_but_an_unknown_adapter(llm):
    with running_server(llm, ServerConfig(MODEL, accept_any_model=True), shutdown_llm=False) as base:
        client = _client(base)
        assert _reply(client, "gpt-4o-2024-05-13") == "gpt-4o-2024-05-13"
        with pytest.raises(NotFoundError):
            _reply(client, f"{MODEL}:no-such-adapter")  # a typo of a served adapter is still told apart
        assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("aliases, message", [
    ({"gpt-4": "gpt-5"}, "not served"),
    ({"a": "b", "b": MODEL}, "another alias"),
    ({"gpt-4": "gpt-4"}, "maps a name to another"),
])
def test_an_alias_that_cannot_resolve_stops_the_start(llm, aliases, message):
    with pytest.raises(ValueError, match=message):
        build_app(llm, ServerConfig(MODEL, model_aliases=aliases))
