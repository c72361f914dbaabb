"""The SDK for simulation authors: register agents, send one hint batch per step, and talk to
the model through ordinary OpenAI clients that carry an agent's id.

>>> sim = Simulation("http://127.0.0.1:8000")
>>> sim.add_agent("ada", system="You are Ada, a baker.")
>>> sim.step(1, distances={"ada": 0, "bob": 3})
>>> sim.client("ada").chat.completions.create(model=sim.model, messages=[...])
"""

from urllib.parse import quote

import httpx
from openai import AsyncOpenAI, OpenAI

AGENT_HEADER = "X-Agent-Id"
DEFAULT_TIMEOUT_S = 600.0


class SimulationError(RuntimeError):
    """The server refused a registry or hint call; the message is the server's."""


class Simulation:
    def __init__(self, url: str, model: str | None = None, api_key: str = "EMPTY",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        root = url.rstrip("/")
        self.root = root[:-3] if root.endswith("/v1") else root
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.http = httpx.Client(base_url=self.root, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})
        self.model = model or self._call("GET", "/v1/models")["data"][0]["id"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # not an OpenAI error body: show what came back
                message = response.text
            raise SimulationError(f"{method} {path}: {response.status_code}: {message}")
        return response.json()

    # --- agents --------------------------------------------------------------------------------
    def add_agent(self, agent_id: str, system: str | None = None, prefix: str | None = None,
                  adapter_path: str | None = None, model_path: str | None = None) -> dict:
        """Register an agent. `system` (its persona as a system message) or `prefix` (raw prompt
        text) is pre-filled into the server's prefix cache now; adapter and model paths must lie
        under the server's --allowed-local-paths."""
        body = {"id": agent_id, "system": system, "prefix": prefix, "adapter_path": adapter_path,
                "model_path": model_path}
        return self._call("POST", "/v1/agents", {k: v for k, v in body.items() if v is not None})

    def agent(self, agent_id: str) -> dict:
        """Where each of the agent's objects lives now (device, host, disk)."""
        return self._call("GET", f"/v1/agents/{quote(agent_id, safe='')}")

    def remove_agent(self, agent_id: str) -> None:
        self._call("DELETE", f"/v1/agents/{quote(agent_id, safe='')}")

    # --- hints -------------------------------------------------------------------------------
    def step(self, n: int, **hints) -> dict:
        """Start simulation step `n` and send what is known about who calls next: distances,
        schedule, plans, probabilities/active, turn_order, frontier/graph, positions/speed/cooldowns."""
        return self._call("POST", "/v1/hints", {"step": n, **hints})

    def update(self, agent_data: dict[str, float] | None = None, timestep_data: dict[int, list[str]] | None = None,
               timestep_cnt: int | None = None) -> dict:
        """The ScaleSim paper's `/v1/update` call."""
        body = {"agent_data": agent_data, "timestep_data": {str(k): v for k, v in (timestep_data or {}).items()},
                "timestep_cnt": timestep_cnt}
        return self._call("POST", "/v1/update", body)

    # --- clients -----------------------------------------------------------------------------
    def client(self, agent_id: str) -> OpenAI:
        """An OpenAI client whose every request names `agent_id` (in the X-Agent-Id header)."""
        return OpenAI(base_url=self.root + "/v1", api_key=self.api_key, timeout=self.timeout_s,
                      default_headers={AGENT_HEADER: agent_id})

    def async_client(self, agent_id: str) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.root + "/v1", api_key=self.api_key, timeout=self.timeout_s,
                           default_headers={AGENT_HEADER: agent_id})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
