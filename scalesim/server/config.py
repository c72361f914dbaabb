"""Settings of the HTTP server (the engine's own settings stay in `scalesim.config.EngineConfig`)."""

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_NBYTES = 16 * 2**20
DEFAULT_PORT = 8000
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 64
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0
DEFAULT_SEND_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 4096
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    """`served_model_name` is the name clients put in `model` (default: the engine's model);
    `extra_model_names` are more names for the same base model (`--served-model-name` takes
    several, as vLLM's does). `model_aliases` maps a name clients send (`gpt-4`) to one that is
    served: a served name, `served:adapter`, a private model or the embedder. `accept_any_model`
    answers every other name with the base model (an unknown `served:adapter` is still a 404).

    `api_key`: when set, every route but /health (and /metrics, unless `metrics_require_key`)
    needs `Authorization: Bearer <api_key>`; an empty key is refused (an unset `$KEY`).
    `allowed_hosts`: Host header values accepted (a port is ignored); None accepts any. Against
    DNS rebinding, `scalesim serve` on a loopback address accepts only local names by default.
    `infer_agents`: a request without an agent id gets one inferred from its prompt's private part.
    `default_max_tokens`: the completion cap when a request sets none (OASIS sends none).
    `max_sequences_per_request`: prompts x n of one request, at most.
    `request_read_timeout_s`: a request (headers and body) must arrive within this; else a 408.
    `send_timeout_s`: a client that takes none of its answer for this long is closed.
    `keep_alive_timeout_s`: an idle connection is closed after this.
    `max_connections`: requests beyond this many connections or requests in flight get a 503.
    `allowed_local_paths`: folders under which `POST /v1/agents` may name adapters and models.
    `state_dir`: where the agent registry's SQLite file lives; None keeps it in memory only.
    """

    served_model_name: str
    extra_model_names: list[str] = field(default_factory=list)
    model_aliases: dict[str, str] = field(default_factory=dict)
    accept_any_model: bool = False
    api_key: str | None = None
    allowed_hosts: list[str] | None = None
    metrics_require_key: bool = False
    infer_agents: bool = True
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_nbytes: int = DEFAULT_MAX_BODY_NBYTES
    max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST
    request_read_timeout_s: float = DEFAULT_REQUEST_READ_TIMEOUT_S
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allowed_local_paths: list[Path] = field(default_factory=list)
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty (an unset environment variable?); give a key or no --api-key")
        for name in ("default_max_tokens", "max_body_nbytes", "max_sequences_per_request", "max_connections",
                     "request_read_timeout_s", "send_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.allowed_hosts is not None:
            self.allowed_hosts = None if "*" in self.allowed_hosts else [h.lower() for h in self.allowed_hosts]
        self.allowed_local_paths = [Path(p).resolve() for p in self.allowed_local_paths]
        for alias, target in self.model_aliases.items():
            if not alias or not target or alias == target:
                raise ValueError(f"a model alias maps a name to another, got {alias!r}={target!r}")
            if target in self.model_aliases:
                raise ValueError(f"model alias {alias!r} names another alias, {target!r}; name what it serves")
        self.state_dir = Path(self.state_dir) if self.state_dir is not None else None

    @property
    def base_model_names(self) -> list[str]:
        """Every name the base model is served under, the first one first."""
        return [self.served_model_name, *(n for n in self.extra_model_names if n != self.served_model_name)]

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's Host header names this server (always, when any host is allowed)."""
        if self.allowed_hosts is None:
            return True
        if not host_header:
            return False
        host = host_header.lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        return host in self.allowed_hosts


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Local names only when bound to loopback; any host otherwise (it is reached by many names)."""
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    return sorted({bind_host.lower(), *LOCAL_HOSTS}) if loopback else None
