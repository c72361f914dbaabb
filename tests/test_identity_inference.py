"""Agent identity with zero client changes: on request sequences in the shapes of four real
frameworks and OASIS, the inferred ids keep each agent's calls together (splitting) and apart
from other agents' (purity); through the server, the id used comes back in X-Agent-Id."""

import random
from urllib.parse import unquote

import httpx
import pytest

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from scalesim.server.identity import message_texts
from scalesim.server.private_spans import PrivateSpans, segments
from scalesim.sim.framework_shapes import SHAPES, purity_and_splitting
from tests.server_util import running_server

MIN_PURITY, MAX_SPLITTING = 0.95, 0.05
STEPS = 8


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_inferred_ids_are_pure_and_rarely_split(shape):
    calls = SHAPES[shape](random.Random(0), STEPS)
    spans = PrivateSpans()
    inferred = [spans.agent_of(segments(message_texts(messages))) for _, messages in calls]
    truth = [agent for agent, _ in calls]
    purity, splitting = purity_and_splitting(truth, inferred)
    by_system = [next((text for role, text in message_texts(m) if role == "system"), None) for _, m in calls]
    old_purity, old_splitting = purity_and_splitting(truth, by_system)  # the rule before: the system message
    print(f"{shape}: {len(calls)} calls of {len(set(truth))} agents -> {len(set(inferred))} ids; "
          f"purity {purity:.3f}, splitting {splitting:.3f} (by system message: {old_purity:.3f}, {old_splitting:.3f})")
    assert purity >= MIN_PURITY and splitting <= MAX_SPLITTING


def test_shapes_sharing_one_server_with_stray_calls_keep_their_agents_apart():
    rng = random.Random(2)
    streams = [[(f"{shape}:{agent}", messages) for agent, messages in make(random.Random(3), STEPS)]
               for shape, make in SHAPES.items()]
    stray = [(f"stray{i}", [{"role": "user", "content": f"Summarize the day in one line. Day {i}."}])
             for i in range(20)]
    calls = []
    while any(streams):  # the shapes interleaved at random, each in its own order, strays among them
        stream = rng.choice([s for s in streams if s])
        calls.append(stream.pop(0))
        if rng.random() < 0.05 and stray:
            calls.append(stray.pop())
    spans = PrivateSpans()
    inferred = [spans.agent_of(segments(message_texts(messages))) for _, messages in calls]
    purity, splitting = purity_and_splitting([agent for agent, _ in calls], inferred)
    print(f"mixed: {len(calls)} calls -> purity {purity:.3f}, splitting {splitting:.3f}")
    assert purity >= MIN_PURITY and splitting <= MAX_SPLITTING


def test_one_agents_calls_keep_their_id_across_phases_once_a_second_agent_shows_the_fork():
    spans = PrivateSpans()
    ana = [("user", "Shared rules.\nYou are Ana.\nVote now.")]
    assert spans.agent_of(segments(ana)) == spans.agent_of(segments(ana))  # no fork yet: the first segment
    ben = spans.agent_of(segments([("user", "Shared rules.\nYou are Ben.\nVote now.")]))
    later_ana = spans.agent_of(segments([("user", "Shared rules.\nYou are Ana.\nSpeak now.\nTranscript: ...")]))
    assert len({ben, later_ana}) == 2
    assert later_ana == spans.agent_of(segments([("user", "Shared rules.\nYou are Ana.\nBid now.")]))


def test_purity_and_splitting_measure_what_they_say():
    assert purity_and_splitting(["a", "a", "b", "b"], ["x", "x", "y", "y"]) == (1.0, 0.0)
    assert purity_and_splitting(["a", "a", "b", "b"], ["x", "x", "x", "x"]) == (0.5, 0.0)  # merged
    assert purity_and_splitting(["a", "a", "b", "b"], ["x", "y", "z", "w"]) == (1.0, 0.5)  # split


def test_the_server_names_the_inferred_agent_in_x_agent_id_and_keeps_its_state():
    llm = AsyncLLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4)
    calls = SHAPES["werewolf"](random.Random(1), 2)[:12]
    with running_server(llm, ServerConfig("tiny-random")) as base:
        ids = {}
        for agent, messages in calls:
            reply = httpx.post(base + "/v1/chat/completions",
                               json={"model": "tiny-random", "messages": messages, "max_tokens": 1})
            assert reply.status_code == 200, reply.text
            ids.setdefault(agent, set()).add(reply.headers["x-agent-id"])
        named = reply.headers["x-agent-id"]
        assert httpx.get(f"{base}/v1/agents/{named}").status_code == 200
        explicit = httpx.post(base + "/v1/chat/completions", headers={"X-Agent-Id": "ana"},
                              json={"model": "tiny-random", "messages": calls[0][1], "max_tokens": 1})
        assert explicit.headers["x-agent-id"] == "ana"
        beyond_latin1 = httpx.post(base + "/v1/chat/completions",  # headers carry Latin-1: percent-encoded
                                   json={"model": "tiny-random", "messages": calls[0][1], "max_tokens": 1, "user": "用户"})
        assert beyond_latin1.status_code == 200 and unquote(beyond_latin1.headers["x-agent-id"]) == "用户"
    assert len(set.union(*ids.values())) >= len(ids) - 1  # distinct agents, distinct ids (one cold start)
    assert sum(len(v) for v in ids.values()) <= len(ids) + 1
