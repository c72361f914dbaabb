"""Chat messages as real frameworks send them, rendered by the model's template without rejection.

Tools, when the template cannot render them, are described in a system turn placed first, so
that the long tool text is a prefix shared by every agent. Accepted and normalised: `content` None or a list of text parts, empty assistant turns, tool
messages whose content is not JSON, assistant turns that carry `tool_calls`, and roles that do
not alternate. A strict template that still refuses (some raise on `[system, user, user]`) gets
the conversation with consecutive same-role turns merged; if it refuses that too, a plain ChatML
rendering is used, so such a request is never a 400.
"""

import logging

from scalesim.errors import InvalidRequestError
from scalesim.server.tool_calls import render_tool_calls, tools_system_text

logger = logging.getLogger(__name__)


def _text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{index}]: only text content parts are supported, "
                                      f"got {part.get('type')!r}")
        parts.append(part["text"])
    return "".join(parts)


def normalize(messages: list[dict], template_renders_tool_calls: bool) -> list[dict]:
    """Messages with string content; tool calls folded into the text unless the template renders them."""
    out = []
    for i, message in enumerate(messages):
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(f"messages[{i}]: unknown role {message['role']!r}")
        item = {"role": role, "content": _text(message.get("content"), i)}
        if message.get("tool_calls"):
            if template_renders_tool_calls:
                item["tool_calls"] = message["tool_calls"]
            else:
                item["content"] = "\n".join(filter(None, [item["content"], render_tool_calls(message["tool_calls"])]))
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
        out.append(item)
    return out


def _with_tools_first(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The tool text as the first system turn, before the agent's own system message: every agent
    of a simulation is offered the same tools, so this long part becomes a prefix they all share."""
    return [{"role": "system", "content": tools_system_text(tools)}, *messages]


def _merged(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"]:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + message["content"]}
        else:
            out.append(dict(message))
    return out


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  add_generation_prompt: bool = True) -> str:
    """The prompt text of a chat request (tools offered when given)."""
    template = tokenizer.chat_template or ""
    messages = normalize(messages, "tool_calls" in template)
    template_tools = tools if tools and "tools" in template else None
    if tools and template_tools is None:
        messages = _with_tools_first(messages, tools)
    for attempt in (messages, _merged(messages)):
        try:
            return tokenizer.apply_chat_template(attempt, add_generation_prompt=add_generation_prompt,
                                                 tools=template_tools)
        except Exception as exc:  # jinja raises TemplateError, TypeError, ... for input it dislikes
            logger.info("chat template refused the messages (%s); retrying", exc)
    return _chatml(_merged(messages), add_generation_prompt)
