"""Settings of the HTTP server (the engine's own settings stay in `scalesim.config.EngineConfig`)."""

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_NBYTES = 16 * 2**20
DEFAULT_PORT = 8000


@dataclass
class ServerConfig:
    """`served_model_name` is the name clients put in `model` (default: the engine's model).

    `api_key`: when set, every /v1 route needs `Authorization: Bearer <api_key>`.
    `infer_agents`: a chat request without an agent id gets one derived from its system message.
    `default_max_tokens`: the completion cap when a request sets none (OASIS sends none).
    `allowed_local_paths`: folders under which `POST /v1/agents` may name adapters and models.
    `state_dir`: where the agent registry's SQLite file lives; None keeps it in memory only.
    """

    served_model_name: str
    api_key: str | None = None
    infer_agents: bool = True
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_nbytes: int = DEFAULT_MAX_BODY_NBYTES
    allowed_local_paths: list[Path] = field(default_factory=list)
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.default_max_tokens <= 0 or self.max_body_nbytes <= 0:
            raise ValueError("default_max_tokens and max_body_nbytes must be positive")
        self.allowed_local_paths = [Path(p).resolve() for p in self.allowed_local_paths]
        self.state_dir = Path(self.state_dir) if self.state_dir is not None else None
