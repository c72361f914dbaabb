"""Finding tool calls in a model's reply, and rendering chats that strict templates would refuse."""

import json

import jinja2
import pytest

from scalesim.errors import InvalidRequestError
from scalesim.server.chat_render import render_prompt
from scalesim.server.tool_calls import function_names, parse_tool_calls

OFFERED = ["like_post", "create_post", "do_nothing"]


def test_a_tagged_tool_call_is_found_with_its_arguments_as_json_text():
    calls, rest = parse_tool_calls('<tool_call>\n{"name": "like_post", "arguments": {"post_id": 3}}\n</tool_call>',
                                   OFFERED)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("like_post", {"post_id": 3})]
    assert rest is None and calls[0].id.startswith("call_")


def test_several_tagged_calls_and_surrounding_text():
    text = ('I will act.\n<tool_call>{"name": "like_post", "arguments": {"post_id": 1}}</tool_call>\n'
            '<tool_call>{"name": "create_post", "arguments": "{\\"content\\": \\"hi\\"}"}</tool_call>')
    calls, rest = parse_tool_calls(text, OFFERED)
    assert [c.name for c in calls] == ["like_post", "create_post"]
    assert json.loads(calls[1].arguments) == {"content": "hi"} and rest == "I will act."


def test_an_unterminated_block_at_the_end_still_counts():
    calls, _ = parse_tool_calls('<tool_call>\n{"name": "do_nothing", "arguments": {}}', OFFERED)
    assert [c.name for c in calls] == ["do_nothing"]


@pytest.mark.parametrize("text", ['{"name": "like_post", "arguments": {"post_id": 5}}',
                                  '```json\n{"name": "like_post", "parameters": {"post_id": 5}}\n```',
                                  'Sure: {"name": "like_post", "arguments": {"post_id": 5}}'])
def test_a_bare_json_object_naming_an_offered_function_is_a_call(text):
    calls, _ = parse_tool_calls(text, OFFERED)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("like_post", {"post_id": 5})]


@pytest.mark.parametrize("text", ["I like this post.", '{"name": "delete_everything", "arguments": {}}',
                                  '<tool_call>{"name": "like_post", "arguments": {"post_id": </tool_call>',
                                  '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>',
                                  # a name that is not a string (seen from SmolLM2 in bf16): once a TypeError, a 500
                                  '<tool_call>{"name": ["like_post"], "arguments": {}}</tool_call>',
                                  '{"name": {"like_post": 1}, "arguments": {}}'])
def test_anything_else_is_plain_text(text):
    calls, rest = parse_tool_calls(text, OFFERED)
    assert calls == [] and rest == text


def test_malformed_tools_are_rejected():
    with pytest.raises(InvalidRequestError):
        function_names([{"type": "function", "function": {"description": "no name"}}])


class _StrictTokenizer:
    """A template that, like some real ones, raises unless roles alternate user/assistant."""

    chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                     "{{ raise_exception('roles must alternate') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}"
                     "{% endfor %}")

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None):
        env = jinja2.Environment()
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(jinja2.TemplateError(msg))
        return env.from_string(self.chat_template).render(messages=messages)


def test_a_strict_template_never_rejects_what_frameworks_send():
    messages = [{"role": "user", "content": "feed 1"}, {"role": "user", "content": "feed 2"}]
    assert render_prompt(_StrictTokenizer(), messages) == "[user]feed 1\n\nfeed 2"
    with_system = [{"role": "system", "content": "profile"}, {"role": "user", "content": None},
                   {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
                       "name": "like_post", "arguments": '{"post_id": 1}'}}]},
                   {"role": "tool", "content": "{'success': True}"}]
    text = render_prompt(_StrictTokenizer(), with_system)
    assert "profile" in text and '"name": "like_post"' in text and "{'success': True}" in text
