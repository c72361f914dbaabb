"""Tools in, tool calls out: describe offered functions to the model, then find its calls.

When the model's chat template has no tool support, the offered functions are described in the
system message in the widespread `<tool_call>` format. The reply is searched for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, then for a bare JSON object
naming an offered function; anything else is plain text (the agent did not call a tool).
"""

import json
import re
import uuid
from dataclasses import dataclass

from scalesim.errors import InvalidRequestError

TOOL_CALL_BEGIN, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(f"{TOOL_CALL_BEGIN}\\s*(.*?)\\s*(?:{TOOL_CALL_END}|$)", re.DOTALL)
_CODE_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as the OpenAI API sends it
    id: str

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_names(tools: list[dict]) -> list[str]:
    """The names of the offered functions; InvalidRequestError if a tool is malformed."""
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {'name': ..., ...}}")
        names.append(function["name"])
    return names


def tools_system_text(tools: list[dict]) -> str:
    """Instructions that offer `tools` to a model whose template does not."""
    signatures = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more of these functions. Their signatures, one JSON object a line:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "To call a function, answer with a JSON object of its name and arguments inside tags:\n"
            f'{TOOL_CALL_BEGIN}\n{{"name": <function-name>, "arguments": <arguments-object>}}\n{TOOL_CALL_END}')


def render_tool_calls(tool_calls: list[dict]) -> str:
    """An assistant turn's earlier tool calls as text, for templates that cannot render them."""
    blocks = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequestError("each tool call must be {'type': 'function', 'function': {'name': ..., "
                                      "'arguments': ...}}")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        blocks.append("<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": arguments},
                                                   ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(blocks)


def _as_call(obj, offered: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in offered:
        return None  # (a name that is a list or an object is not a call: and not hashable)
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


def _bare_json_calls(text: str, offered: set[str]) -> tuple[list[ToolCall], str]:
    decoder = json.JSONDecoder()
    stripped = _CODE_FENCE.sub("", text.strip())
    for start in [i for i, ch in enumerate(stripped) if ch in "{["]:
        try:
            obj, end = decoder.raw_decode(stripped, start)
        except json.JSONDecodeError:
            continue
        calls = [c for c in (_as_call(o, offered) for o in (obj if isinstance(obj, list) else [obj])) if c]
        if calls:
            return calls, (stripped[:start] + stripped[end:]).strip()
    return [], text


def parse_tool_calls(text: str, offered: list[str]) -> tuple[list[ToolCall], str | None]:
    """(tool calls, remaining content or None) found in a model reply; no calls means plain text."""
    names = set(offered)
    calls = []
    for block in _TOOL_CALL_BLOCK.findall(text):
        try:
            call = _as_call(json.loads(block), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            calls.append(call)
    if calls:
        rest = _TOOL_CALL_BLOCK.sub("", text).strip()
        return calls, rest or None
    calls, rest = _bare_json_calls(text, names)
    return (calls, rest or None) if calls else ([], text)
