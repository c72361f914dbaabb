"""What a chat request's reply must look like, and the grammar that enforces it (as vLLM does):

- `response_format` `json_object`: any JSON object; `json_schema`: JSON valid against the schema.
- `tool_choice` a named function: the reply is that function's arguments, valid against its
  parameters, returned as one call of it.
- `tool_choice` "required": a JSON list of one or more calls of offered functions, each with
  arguments valid against its parameters.
- `tool_choice` "auto" (the default with tools): free text, but once the model writes
  `<tool_call>` (the format the tools are described in), what follows is a valid call.
- "none", or no tools: no tools are offered.

A reply cut by max_tokens inside a call is returned as text with finish_reason "length", never
as a call.
"""

import json
import logging
from dataclasses import dataclass, field

from scalesim.engine.grammar import ANY_OBJECT_SCHEMA, json_object_grammar, json_schema_grammar, tagged_json_grammar
from scalesim.errors import InvalidRequestError
from scalesim.outputs import CompletionOutput
from scalesim.server.errors import APIError
from scalesim.server.protocol import ChatCompletionRequest
from scalesim.server.tool_calls import TOOL_CALL_BEGIN, TOOL_CALL_END, ToolCall, function_names, new_call_id, \
    parse_tool_calls

logger = logging.getLogger(__name__)


@dataclass
class OutputFormat:
    """`tools`: offered to the model (rendered into the prompt); `calls`: the names its calls may
    use; `forced`: the one function the reply is the arguments of; `grammar`: llguidance's."""

    tools: list[dict] | None = None
    calls: list[str] = field(default_factory=list)
    forced: str | None = None
    grammar: str | None = None
    forces_call: bool = False  # named or required: stop strings do not apply, the grammar ends the reply

    def message(self, output: CompletionOutput) -> tuple[dict, str | None]:
        """The assistant message of a finished completion, and its finish_reason: a complete call
        is a call even when its last token was the last one allowed; a cut one is text."""
        if self.forced is not None:
            try:
                arguments = json.loads(output.text)
            except json.JSONDecodeError:  # cut by max_tokens
                arguments = None
            if isinstance(arguments, dict):
                call = ToolCall(self.forced, json.dumps(arguments, ensure_ascii=False), new_call_id())
                return {"role": "assistant", "content": None, "tool_calls": [call.as_openai()]}, "tool_calls"
        elif self.calls:
            calls, content = parse_tool_calls(output.text, self.calls)
            if calls:
                return {"role": "assistant", "content": content,
                        "tool_calls": [c.as_openai() for c in calls]}, "tool_calls"
        return {"role": "assistant", "content": output.text}, output.finish_reason


def _parameters(tool: dict) -> dict:
    parameters = tool["function"].get("parameters") or ANY_OBJECT_SCHEMA
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"the parameters of {tool['function']['name']!r} must be a JSON schema object")
    return parameters


def _response_format_grammar(response_format: dict | None) -> str | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        try:
            return json_schema_grammar(spec.get("schema", ANY_OBJECT_SCHEMA))
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param="response_format")
    raise APIError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format")


def _required_calls_schema(tools: list[dict]) -> dict:
    """A list of one or more calls, each naming an offered function with valid arguments."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": _parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def _auto_calls_grammar(tools: list[dict]) -> str | None:
    tags = [(f'{TOOL_CALL_BEGIN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ', _parameters(t),
             f"}}\n{TOOL_CALL_END}") for t in tools]
    try:
        return tagged_json_grammar(TOOL_CALL_BEGIN, tags)
    except (InvalidRequestError, ValueError) as exc:  # a schema llguidance cannot enforce: calls stay unchecked
        logger.warning("tool calls under tool_choice auto are not enforced: %s", exc)
        return None


def output_format(req: ChatCompletionRequest) -> OutputFormat:
    """The reply's format and grammar for a chat request; a 400 naming the field for a bad one."""
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    try:
        names = function_names(req.tools or [])
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="tools")
    grammar = _response_format_grammar(req.response_format)
    if not req.tools and choice not in ("auto", "none"):
        raise APIError(400, "tool_choice forces a tool call, but no tools are offered", param="tool_choice")
    if not req.tools or choice == "none":
        return OutputFormat(grammar=grammar)
    try:
        if choice == "auto":
            return OutputFormat(req.tools, names, grammar=grammar or _auto_calls_grammar(req.tools))
        if choice == "required":
            return OutputFormat(req.tools, names, grammar=json_schema_grammar(_required_calls_schema(req.tools)),
                                forces_call=True)
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                                "{'name': ...}}", param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools offered: {names}",
                           param="tool_choice")
        tool = req.tools[names.index(name)]
        return OutputFormat(req.tools, [name], forced=name, grammar=json_schema_grammar(_parameters(tool)),
                            forces_call=True)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="tools")
