"""Which agent sent a request: the first channel that names one wins.

Order: `agent_id` in the body (openai `extra_body`), the standard `user` field, the `X-Agent-Id`
header, the model alias `base@agent`. Frameworks send none of these, so when none is given the
agent is inferred from the request's private part: the first place where its prompt parts ways
with the prompts seen before (see private_spans). The id used is sent back in the `X-Agent-Id`
response header, so a simulation can see whom the server took each call for.
"""

from dataclasses import dataclass
from urllib.parse import quote

from scalesim.server.private_spans import PrivateSpans, segments

AGENT_ID_HEADER = "X-Agent-Id"


@dataclass
class Identity:
    agent_id: str | None
    source: str  # body, user, header, model_alias, inferred, none
    model: str  # the request's model name with any `@agent` alias removed

    def infer(self, spans: PrivateSpans | None, texts: list[tuple[str, str]]) -> None:
        """With no id named, take the one `spans` infers from the prompt (when inference is on)."""
        if self.agent_id is None and spans is not None and texts:
            self.agent_id = spans.agent_of(segments(texts))
            self.source = "inferred" if self.agent_id else "none"

    def headers(self) -> dict[str, str]:
        """The response header naming the agent; an id beyond ASCII is percent-encoded (UTF-8),
        as HTTP headers carry Latin-1 only."""
        if self.agent_id is None:
            return {}
        return {AGENT_ID_HEADER: self.agent_id if self.agent_id.isascii() else quote(self.agent_id, safe="")}


def split_model_alias(model: str) -> tuple[str, str | None]:
    """'base@agent' -> ('base', 'agent'); a name without '@' has no alias."""
    base, sep, agent = model.rpartition("@")
    return (base, agent) if sep and base and agent else (model, None)


def message_texts(messages: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of each chat message, text parts joined."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        out.append((str(message.get("role")), content if isinstance(content, str) else ""))
    return out


def resolve_identity(model: str, body_agent_id: str | None, user: str | None, header: str | None) -> Identity:
    """The agent a request names, if any (`Identity.infer` fills in the others)."""
    base, alias = split_model_alias(model)
    for agent_id, source in ((body_agent_id, "body"), (user, "user"), (header, "header"), (alias, "model_alias")):
        if agent_id:
            return Identity(agent_id, source, base)
    return Identity(None, "none", base)
