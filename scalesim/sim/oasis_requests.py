"""Requests shaped like the ones camel-oasis 0.2.5 sends (Reddit mode), per ../shared/WORKLOADS.md:
13 strict tools, a private profile as the system message, the feed as JSON, and a history that
grows with tool calls, Python-repr tool results and empty assistant turns. No max_tokens,
temperature, agent id or tool_choice; `logit_bias` is an empty object."""

import json


def _tool(name: str, description: str, **params: str) -> dict:
    properties = {p: {"type": kind, "description": f"The {p.replace('_', ' ')}."} for p, kind in params.items()}
    return {"type": "function", "function": {
        "name": name, "description": description, "strict": True,
        "parameters": {"type": "object", "properties": properties, "required": list(params),
                       "additionalProperties": False}}}


TOOLS = [
    _tool("create_post", "Create a new post with the given content.", content="string"),
    _tool("like_post", "Like the post with the given id.", post_id="integer"),
    _tool("dislike_post", "Dislike the post with the given id.", post_id="integer"),
    _tool("create_comment", "Comment on a post.", post_id="integer", content="string"),
    _tool("like_comment", "Like a comment.", comment_id="integer"),
    _tool("dislike_comment", "Dislike a comment.", comment_id="integer"),
    _tool("search_posts", "Search posts by a query.", query="string"),
    _tool("search_user", "Search users by a query.", query="string"),
    _tool("trend", "Get the trending posts."),
    _tool("refresh", "Refresh the feed."),
    _tool("do_nothing", "Do nothing this step."),
    _tool("follow", "Follow a user.", followee_id="integer"),
    _tool("mute", "Mute a user.", mutee_id="integer"),
]
NAMES = [t["function"]["name"] for t in TOOLS]


def profile(i: int) -> str:
    return (f"# OBJECTIVE\nYou're a Reddit user, and I'll present you with some posts. After you see the posts, "
            f"choose some actions from the following functions.\n\n# SELF-DESCRIPTION\nYour name is User{i}. "
            f"You are {20 + i} years old, work as a {['nurse', 'teacher', 'welder', 'chef'][i % 4]}, and care "
            f"about {['local news', 'science', 'football', 'cooking'][i % 4]}. Your MBTI is "
            f"{['INTJ', 'ENFP', 'ISTP', 'ESFJ'][i % 4]}.\n\n# RESPONSE METHOD\nPlease perform actions by tool calling.")


def feed(step: int, i: int) -> str:
    posts = [{"post_id": 10 * step + k, "user_id": (i + k) % 7, "content": f"Post {k} of step {step}: prices rise.",
              "num_likes": k, "num_dislikes": 0, "comments": []} for k in range(3)]
    return "After refreshing, you see some posts " + json.dumps(posts)


def request(messages: list[dict]) -> dict:
    return {"model": "smollm2-135m", "messages": messages, "tools": TOOLS, "logit_bias": {}}


def next_history(messages: list[dict], reply: dict, step: int, i: int) -> list[dict]:
    """The next step's messages, appended as OASIS appends them."""
    message = reply["choices"][0]["message"]
    calls = message.get("tool_calls") or [{"id": "call_x", "type": "function",
                                           "function": {"name": "do_nothing", "arguments": "{}"}}]
    return [*messages,
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{'success': True, 'post_id': 3}"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": feed(step, i)}]


def history_with_likes(i: int, posts: tuple[int, ...] = (11, 21)) -> list[dict]:
    """Agent i's messages after it liked `posts` in the steps after the first: a history in which
    the agent has called tools, so a small model calls them again."""
    messages = [{"role": "system", "content": profile(i)}, {"role": "user", "content": feed(1, i)}]
    for step, post in enumerate(posts, start=2):
        earlier = {"choices": [{"message": {"tool_calls": [{"id": f"call_{step}", "type": "function", "function": {
            "name": "like_post", "arguments": json.dumps({"post_id": post})}}]}}]}
        messages = next_history(messages, earlier, step, i)
    return messages
