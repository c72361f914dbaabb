"""What every route shares: the engine, the settings, the agent registry and the metrics."""

import hashlib
import itertools
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scalesim.async_llm import AsyncLLM
from scalesim.embeddings.sentence_embedder import SentenceEmbedder
from scalesim.server.agent_store import AgentRecord, AgentStore
from scalesim.server.config import ServerConfig
from scalesim.server.errors import APIError
from scalesim.server.private_spans import PrivateSpans
from scalesim.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
MAX_FOLDER_ENTRIES = 10_000


def server_state(request) -> "ServerState":
    """The state of the app serving `request`."""
    return request.app.state.scalesim


@dataclass
class ServerState:
    llm: AsyncLLM
    config: ServerConfig
    agents: AgentStore
    metrics: ServerMetrics
    embedder: SentenceEmbedder | None = None
    private_spans: PrivateSpans | None = None  # agent inference; None when it is off
    weight_names: dict[str, str] = field(default_factory=dict)  # resolved folder -> registered name
    weights_lock: threading.Lock = field(default_factory=threading.Lock)
    prefills_on_restore: Callable[[str], bool] = lambda agent_id: True  # which restored agents to pre-fill

    def __post_init__(self) -> None:
        if self.config.infer_agents and self.private_spans is None:
            self.private_spans = PrivateSpans()

    @property
    def base_name(self) -> str:
        return self.llm.engine.weights.base_name

    def model_names(self) -> list[str]:
        """What `/v1/models` lists: the served names, 'served:adapter' per adapter, private models,
        then the aliases."""
        weights = self.llm.engine.weights
        served = self.config.served_model_name
        embedders = [self.embedder.name] if self.embedder else []
        return (self.config.base_model_names + [f"{served}:{a}" for a in weights.adapters] + list(weights.models)
                + embedders + list(self.config.model_aliases))

    def model_cards(self) -> list[dict]:
        """`/v1/models`' entries: each name with its kind and, where it stands for another, its root."""
        weights, served, aliases = self.llm.engine.weights, self.config.served_model_name, self.config.model_aliases

        def card(name: str) -> dict:
            embedding = self.embedder is not None and name == self.embedder.name
            kind = ("alias" if name in aliases else "private_model" if name in weights.models
                    else "adapter" if name.startswith(f"{served}:") else "embedding" if embedding else "base")
            root = aliases.get(name) or (None if name == served or embedding else served)
            return {"id": name, "object": "model", "created": 0, "owned_by": "scalesim", "root": root, "kind": kind}

        return [card(name) for name in self.model_names()]

    def check_aliases(self) -> None:
        """A ValueError at start-up for an alias whose target is not served."""
        for alias, target in self.config.model_aliases.items():
            if self.embedder is not None and target == self.embedder.name:
                continue
            try:
                self.resolve_model(target)
            except APIError:
                raise ValueError(f"--model-aliases {alias}={target}: {target!r} is not served "
                                 f"(served: {self.model_names()[:-len(self.config.model_aliases)]})") from None

    def resolve_model(self, name: str) -> tuple[str | None, str | None]:
        """(adapter, private model) that a request's `model` names, after its alias; 404 for an
        unknown name unless any name is accepted."""
        weights = self.llm.engine.weights
        name = self.config.model_aliases.get(name, name)
        if self.embedder is not None and name == self.embedder.name:
            raise APIError(400, f"{name!r} is an embedding model: send it to /v1/embeddings", param="model")
        bases = (*self.config.base_model_names, self.base_name)
        if name in bases:
            return None, None
        base, sep, adapter = name.partition(":")
        if sep and base in bases:
            if adapter in weights.adapters:
                return adapter, None
        elif name in weights.models:
            return None, name
        elif self.config.accept_any_model:
            return None, None
        raise APIError(404, f"the model {name!r} does not exist; served: {self.model_names()}", param="model",
                       code="model_not_found")

    def resolve_embedder(self, name: str) -> SentenceEmbedder:
        """The embedder, if `name` (after its alias) is its name or any name is accepted; else a 404."""
        if self.embedder is None:
            raise APIError(404, "this server has no embedding model (start it with --embedding-model)",
                           param="model", code="model_not_found")
        if self.config.model_aliases.get(name, name) == self.embedder.name or self.config.accept_any_model:
            return self.embedder
        raise APIError(404, f"the embedding model {name!r} does not exist; served: {self.embedder.name!r} (map "
                            f"other names with --model-aliases NAME={self.embedder.name})", param="model",
                       code="model_not_found")

    # --- the agent registry ------------------------------------------------------------------
    def allowed_path(self, path: str, what: str) -> Path:
        """`path` resolved, if it is a folder under one of the allowed directories and every file in
        it (what the loaders read) resolves under them too; else a 400 naming the path."""
        resolved = self._resolve(path, what)
        try:
            if not resolved.is_dir():
                raise APIError(400, f"{what} {path!r} is not a folder", param=what)
            entries = list(itertools.islice(resolved.iterdir(), MAX_FOLDER_ENTRIES + 1))
        except OSError as exc:
            raise APIError(400, f"{what} {path!r} cannot be read: {exc.strerror or exc}", param=what)
        if len(entries) > MAX_FOLDER_ENTRIES:
            raise APIError(400, f"{what} {path!r} holds over {MAX_FOLDER_ENTRIES} entries", param=what)
        for entry in entries:
            self._resolve(str(entry), what)
        return resolved

    def _resolve(self, path: str, what: str) -> Path:
        try:
            resolved = Path(path).resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # NUL bytes, names over 255 bytes, symlink loops
            raise APIError(400, f"{what} {path!r} is not a usable path: {exc}", param=what)
        if not any(resolved.is_relative_to(root) for root in self.config.allowed_local_paths):
            raise APIError(400, f"{what} {path!r} is outside the allowed directories "
                                f"(start the server with --allowed-local-paths)", param=what)
        return resolved

    def _weight_name(self, folder: Path, kind: str) -> str:
        """Register the folder's weights once, under a readable name; agents sharing it share one copy."""
        key = str(folder)
        with self.weights_lock:
            if key in self.weight_names:
                return self.weight_names[key]
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', folder.name)[:100]}-{digest}"
            (self.llm.add_adapter if kind == "adapter" else self.llm.add_private_model)(name, key)
            self.weight_names[key] = name
            return name

    def register(self, record: AgentRecord, persist: bool = True) -> None:
        """Register weights and the agent with the engine (and the SQLite registry when `persist`)."""
        if (record.adapter and record.adapter_path) or (record.model and record.model_path):
            raise APIError(400, "name an adapter or model either by name or by path, not both")
        adapter = self._weight_name(self.allowed_path(record.adapter_path, "adapter_path"), "adapter") \
            if record.adapter_path else record.adapter
        model = self._weight_name(self.allowed_path(record.model_path, "model_path"), "model") \
            if record.model_path else record.model
        self.llm.register_agent(record.agent_id, adapter=adapter, model=model, prefix=record.prefix)
        if persist:
            self.agents.put(record)

    def restore_agents(self) -> int:
        """Re-register every agent of the SQLite registry (after a restart); return how many."""
        restored = 0
        for record in self.agents.all():
            try:
                self.register(record, persist=False)
                restored += 1
            except Exception as exc:  # a folder that went away must not stop the server
                logger.warning("agent %s not restored: %s", record.agent_id, exc)
        return restored
