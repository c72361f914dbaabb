"""Which agent sent a request: the first channel that names one wins.

Order: `agent_id` in the body (openai `extra_body`), the standard `user` field, the `X-Agent-Id`
header, the model alias `base@agent`. No framework sends any of these today, so when none is
given the agent is inferred from the request's private part: in a chat, the system message
(in OASIS it is the agent's profile, unique per agent and constant across steps). Its hash is a
stable anonymous id, so an unmodified simulation still gets per-agent memory management through
the learned-fallback distance.
"""

import hashlib
from dataclasses import dataclass

INFERRED_PREFIX = "anon-"
INFERRED_HASH_CHARS = 16


@dataclass
class Identity:
    agent_id: str | None
    source: str  # body, user, header, model_alias, system_message, none
    model: str  # the request's model name with any `@agent` alias removed


def split_model_alias(model: str) -> tuple[str, str | None]:
    """'base@agent' -> ('base', 'agent'); a name without '@' has no alias."""
    base, sep, agent = model.rpartition("@")
    return (base, agent) if sep and base and agent else (model, None)


def infer_from_system_message(messages: list[dict] | None) -> str | None:
    """A stable id from the first system message's text, or None when there is none."""
    for message in messages or ():
        if message.get("role") in ("system", "developer"):
            text = message.get("content")
            if isinstance(text, list):
                text = "".join(p["text"] for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
            if isinstance(text, str) and text:
                return INFERRED_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:INFERRED_HASH_CHARS]
            return None
    return None


def resolve_identity(model: str, body_agent_id: str | None, user: str | None, header: str | None,
                     messages: list[dict] | None, infer: bool) -> Identity:
    base, alias = split_model_alias(model)
    for agent_id, source in ((body_agent_id, "body"), (user, "user"), (header, "header"), (alias, "model_alias")):
        if agent_id:
            return Identity(agent_id, source, base)
    inferred = infer_from_system_message(messages) if infer else None
    return Identity(inferred, "system_message" if inferred else "none", base)
