"""`/v1/embeddings` on the built-in all-MiniLM-L6-v2, held to sentence-transformers' own output,
through the official openai client (which asks for base64 unless told otherwise)."""

import base64

import httpx
import numpy as np
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from scalesim import AsyncLLM
from scalesim.embeddings.sentence_embedder import SentenceEmbedder
from scalesim.models.registry import DEFAULT_EMBEDDER, resolve_embedder
from scalesim.server.config import ServerConfig
from tests.server_util import running_server

MODEL = "tiny-random"
TEXTS = ["Klaus is writing a paper on gentrification.",
         "Isabella plans a Valentine's Day party at Hobbs Cafe.",
         "I ate breakfast.",
         "A long memory. " + "The town square was busy with people going about their day. " * 60]  # > 256 tokens


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(resolve_embedder(DEFAULT_EMBEDDER), name=DEFAULT_EMBEDDER)


@pytest.fixture(scope="module")
def url(embedder):
    llm = AsyncLLM(MODEL, kv_cache_memory="8MiB", block_size_tokens=4)
    config = ServerConfig(MODEL, model_aliases={"text-embedding-3-small": DEFAULT_EMBEDDER})
    with running_server(llm, config, embedder=embedder) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_the_embedder_matches_sentence_transformers_within_1e_4(embedder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_embedder(DEFAULT_EMBEDDER)), device="cpu").encode(TEXTS)
    ours, tokens = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4, rtol=0)
    assert tokens[3] == embedder.max_tokens == 256  # truncated, as sentence-transformers does
    np.testing.assert_allclose(np.linalg.norm(ours.numpy(), axis=1), 1.0, atol=1e-5)


def test_one_text_a_batch_and_base64_agree(client, embedder):
    one = client.embeddings.create(model="text-embedding-3-small", input=TEXTS[0])  # base64 by default
    batch = client.embeddings.create(model=DEFAULT_EMBEDDER, input=TEXTS, encoding_format="float")
    expected, tokens = embedder.embed(TEXTS)
    assert [d.index for d in batch.data] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([d.embedding for d in batch.data]), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, expected[0].numpy(), atol=1e-6)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(tokens)


def test_base64_is_little_endian_float32(url, embedder):
    body = httpx.post(url + "/v1/embeddings", json={"model": DEFAULT_EMBEDDER, "input": ["hello", "world"],
                                                    "encoding_format": "base64"}).json()
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    np.testing.assert_allclose(np.stack(vectors), embedder.embed(["hello", "world"])[0].numpy(), atol=0)


def test_token_ids_are_embedded_as_the_text_they_tokenize_from(client, embedder):
    ids = embedder.tokenize(TEXTS[1])
    by_ids = client.embeddings.create(model=DEFAULT_EMBEDDER, input=[ids, ids[:5]], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, embedder.embed([TEXTS[1]])[0][0].numpy(), atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids) + 5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[5, 10**9]]}, "input"),
    ({"input": [list(range(1000, 1300))]}, "input"),  # 300 token ids: past the model's 256
    ({"input": "hi", "dimensions": 128}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": {"text": "hi"}}, "input"),
])
def test_bad_input_is_a_400_naming_the_field(url, body, param):
    reply = httpx.post(url + "/v1/embeddings", json={"model": DEFAULT_EMBEDDER, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_unknown_names_and_the_chat_model_are_refused_and_the_server_keeps_serving(client):
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="text-embedding-3-large", input="hi")
    with pytest.raises(BadRequestError, match="embedding model"):
        client.chat.completions.create(model=DEFAULT_EMBEDDER, messages=[{"role": "user", "content": "hi"}])
    assert len(client.embeddings.create(model=DEFAULT_EMBEDDER, input="still here").data[0].embedding) == 384
    kinds = {m.id: m.kind for m in client.models.list().data}
    assert kinds == {MODEL: "base", DEFAULT_EMBEDDER: "embedding", "text-embedding-3-small": "alias"}
