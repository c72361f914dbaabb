"""Anonymous agent ids from where prompts part ways.

Frameworks that send no agent id still put each agent's private part (a profile, a role, an
interview) at the same place in every call, after text that all agents share (rules, tool
descriptions, few-shot turns) and before text that grows (history, transcript, feed). So the
prompts seen form trees of text segments (sentences and lines, each tagged with its message's
role), one tree per first segment: a prompt shape (a framework's template, a stray call of another
kind) grows its own tree and cannot merge the agents of another. Within a tree, the first point
where the prompts seen part ways is where the private part begins, and the segment that follows it
names the agent. Later calls of the same agent follow the same path past that point (their
history only extends it), so they get the same id; another agent leaves the path there and gets
its own. A tree whose prompts never part ways (each agent's first segment is already its own, as
OASIS's profiles are) names its agent by that first segment.

Limits: until a second agent's prompt arrives in a tree, nothing shows where the shared part ends,
so the first agent's calls are named by the first segment and then, if its own calls part ways
(a new phase, a new question), by where they do. Text that varies between calls before the private
part (a clock in a shared header, a different task template ahead of the persona, as in
Smallville), or a history that slides instead of growing behind a private first segment (as in
EconAgent), parts the paths there instead: agents merge or calls split.
"""

import hashlib
import re
import threading
from dataclasses import dataclass, field

INFERRED_PREFIX = "anon-"
INFERRED_HASH_CHARS = 16
MAX_DEPTH_SEGMENTS = 256  # the private part begins within this many segments of a prompt's start
MAX_NODES = 200_000  # past this the trees start afresh (about 50 MB; ids are hashes of text and stay the same)
_SEGMENT_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(slots=True)
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)  # by hash() of the segment


def segments(messages: list[tuple[str, str]]) -> list[str]:
    """Sentences and lines of (role, text) messages, each tagged with its role."""
    return [f"{role}: {part.strip()}" for role, text in messages
            for part in _SEGMENT_END.split(text) if part.strip()]


def _agent_id(segment: str) -> str:
    return INFERRED_PREFIX + hashlib.sha256(segment.encode()).hexdigest()[:INFERRED_HASH_CHARS]


class PrivateSpans:
    """`agent_of(segments)`: the id of the agent whose prompt this is, learning from every call."""

    def __init__(self, max_depth: int = MAX_DEPTH_SEGMENTS, max_nodes: int = MAX_NODES) -> None:
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self._root, self._nodes = _Node(), 0
        self._lock = threading.Lock()

    def agent_of(self, prompt_segments: list[str]) -> str | None:
        """The id named by the segment after the first fork in this prompt's tree (a fork this
        prompt may create); with no fork yet, the prompt's first segment. None for no text."""
        path = prompt_segments[:self.max_depth]
        if not path:
            return None
        with self._lock:
            if self._nodes > self.max_nodes:
                self._root, self._nodes = _Node(), 0
            node = self._child(self._root, hash(path[0]))
            for segment in path[1:]:
                key = hash(segment)
                forks = len(node.children) > 1 or (len(node.children) == 1 and key not in node.children)
                node = self._child(node, key)
                if forks:
                    return _agent_id(segment)  # nothing deeper is needed to name this prompt again
            return _agent_id(path[0])

    def _child(self, node: _Node, key: int) -> _Node:
        child = node.children.get(key)
        if child is None:
            child = node.children[key] = _Node()
            self._nodes += 1
        return child
