"""Anonymous agent ids from where prompts part ways.

Frameworks that send no agent id still put each agent's private part (a profile, a role, an
interview) at the same place in every call, after text that all agents share (rules, tool
descriptions, few-shot turns) and before text that grows (history, transcript, feed). So the
prompts seen form a tree of text segments (sentences and lines, each tagged with its message's
role); the first point on a prompt's path where seen prompts part ways is where the private part
begins, and the segment that follows it names the agent. Later calls of the same agent follow the
same path past that point (their history only extends it), so they get the same id; another agent
leaves the path there and gets its own.

Limits: the first prompt of a new shape has nothing to part from, and is named by its first
segment until a second agent's prompt shows where the shared part ends (one call mis-named per
shape). Text that varies between calls before the private part (a clock in a shared header, a
different task template per call ahead of the identity, as Smallville's prompts have) parts the
paths there instead, and the agents of one variant collapse into one id.
"""

import hashlib
import re
import threading
from dataclasses import dataclass, field

INFERRED_PREFIX = "anon-"
INFERRED_HASH_CHARS = 16
MAX_DEPTH_SEGMENTS = 256  # the private part begins within this many segments of a prompt's start
MAX_NODES = 1_000_000  # past this the tree starts afresh (ids are hashes of text, so they stay the same)
_SEGMENT_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
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
        """The id named by the segment after the first fork on this prompt's path (a fork this
        prompt may create); with no fork yet, the prompt's first segment. None for no text."""
        path = prompt_segments[:self.max_depth]
        if not path:
            return None
        with self._lock:
            if self._nodes > self.max_nodes:
                self._root, self._nodes = _Node(), 0
            node = self._root
            for segment in path:
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
