"""A radix tree of KV pages keyed by (namespace, token ids), shared across requests and agents.

Edges are whole pages: a node holds a run of tokens (a multiple of the page size) and the blocks
that hold their KV. The namespace (model + adapter) picks the root, so KV computed under one
namespace is never matched under another. The tree holds one pool reference per block it owns.

Contract: a node with lock_ref > 0 is in use by a running request (it or a descendant was matched
or inserted by it); it is never evicted. Eviction is the memory layer's: every node gets a
resident object through the observer, and the manager demotes or forgets it by policy.
"""

from typing import Protocol
from dataclasses import dataclass, field

from scalesim.engine.block_pool import BlockPool


@dataclass(eq=False)
class RadixNode:
    namespace: str
    tokens: tuple[int, ...] = ()
    blocks: list[int] = field(default_factory=list)
    parent: "RadixNode | None" = None
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict)
    lock_ref: int = 0
    resident: object | None = None  # the memory layer's object for these pages, when one is attached

    @property
    def on_device(self) -> bool:
        """Its pages are in the pool and staying there: a request may match them."""
        return self.resident is None or self.resident.ready_on_device

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass
class PrefixMatch:
    blocks: list[int]
    node: RadixNode

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class CacheObserver(Protocol):
    """What the memory layer hears about nodes (engine -> memory, never the other way)."""

    def node_created(self, node: RadixNode) -> None: ...
    def node_split(self, upper: RadixNode, lower: RadixNode) -> None: ...
    def node_revived(self, node: RadixNode, blocks: list[int]) -> None: ...
    def can_revive(self, node: RadixNode) -> bool: ...


class RadixCache:
    def __init__(self, pool: BlockPool, observer: CacheObserver | None = None) -> None:
        self.pool = pool
        self.page = pool.block_size
        self.observer = observer
        self.roots: dict[str, RadixNode] = {}

    def root(self, namespace: str) -> RadixNode:
        if namespace not in self.roots:
            self.roots[namespace] = RadixNode(namespace=namespace, lock_ref=1)
        return self.roots[namespace]

    def _pages(self, tokens: tuple[int, ...]) -> int:
        return len(tokens) // self.page

    def common_pages(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        pages = min(len(a), len(b)) // self.page
        for i in range(pages):
            lo, hi = i * self.page, (i + 1) * self.page
            if a[lo:hi] != b[lo:hi]:
                return i
        return pages

    def split(self, node: RadixNode, pages: int, notify: bool = True) -> RadixNode:
        """Cut `node`'s edge after `pages` pages; return the new upper node. `notify=False`: the
        caller gives the upper node its resident object itself (a node off the device)."""
        cut = pages * self.page
        upper = RadixNode(namespace=node.namespace, tokens=node.tokens[:cut], blocks=node.blocks[:pages],
                          parent=node.parent, lock_ref=node.lock_ref)
        node.parent.children[upper.tokens[:self.page]] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[pages:], upper
        upper.children[node.tokens[:self.page]] = node
        if self.observer is not None and notify:
            self.observer.node_split(upper, node)
        return upper

    def match_prefix(self, namespace: str, tokens: list[int] | tuple[int, ...]) -> PrefixMatch:
        """Longest cached run of whole pages that prefixes `tokens` (pages on the device only)."""
        key = tuple(tokens[: self._pages(tuple(tokens)) * self.page])
        node, blocks = self.root(namespace), []
        while key:
            child = node.children.get(key[: self.page])
            if child is None or not child.on_device:
                break
            pages = self.common_pages(child.tokens, key)
            if pages < self._pages(child.tokens):
                child = self.split(child, pages)
            blocks.extend(child.blocks)
            node, key = child, key[pages * self.page:]
        return PrefixMatch(blocks=blocks, node=node)

    def insert(self, namespace: str, tokens: list[int] | tuple[int, ...], blocks: list[int]) -> RadixNode:
        """Cache the whole pages of `tokens`, whose KV lives in `blocks`; return the deepest node.

        Pages already cached keep their existing blocks (the caller's duplicates stay the caller's);
        new pages take one pool reference each for the tree.
        """
        pages = min(self._pages(tuple(tokens)), len(blocks))
        key, blocks = tuple(tokens[: pages * self.page]), list(blocks[:pages])
        node = self.root(namespace)
        while key:
            child = node.children.get(key[: self.page])
            if child is None:
                child = RadixNode(namespace=namespace, tokens=key, blocks=blocks, parent=node)
                node.children[key[: self.page]] = child
                self.pool.incref(blocks)
                if self.observer is not None:
                    self.observer.node_created(child)
                return child
            common = self.common_pages(child.tokens, key)
            if not child.on_device:
                if common < self._pages(child.tokens) or child.lock_ref or not self.observer.can_revive(child):
                    return node  # partly overlaps pages kept off the device (or moving): leave them be
                self.pool.incref(blocks[: common])
                self.observer.node_revived(child, blocks[: common])
            if common < self._pages(child.tokens):
                child = self.split(child, common)
            node, key, blocks = child, key[common * self.page:], blocks[common:]
        return node

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None:
            assert node.lock_ref > 0, "unlock of an unlocked radix node"
            node.lock_ref -= 1
            node = node.parent

    @property
    def num_cached_blocks(self) -> int:
        """Pages the tree holds on the device (a scan: for statistics, not decisions)."""
        return sum(len(n.blocks) for n in self.nodes())

    def nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.roots.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def attach_offline(self, parent: RadixNode, tokens: tuple[int, ...]) -> RadixNode:
        """Add a node whose pages are kept off the device (restored from disk)."""
        node = RadixNode(namespace=parent.namespace, tokens=tokens, parent=parent)
        parent.children[tokens[: self.page]] = node
        return node

    def remove_leaf(self, node: RadixNode) -> None:
        """Unlink an unlocked leaf whose pages the memory layer has already released."""
        assert not node.children and node.lock_ref == 0 and not node.is_root
        del node.parent.children[node.tokens[: self.page]]
