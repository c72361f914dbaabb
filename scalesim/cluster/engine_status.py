"""What Serve's controller says about the engine deployment (a blocking call: run it in a thread)."""

from enum import Enum

ENGINE_DEPLOYMENT = "engine"


def engine_replica_states() -> tuple[str, dict[str, int]]:
    """(the engine deployment's status, its replicas by state: RUNNING, STARTING, ...), as the
    controller reports them to `serve status`; ("MISSING", {}) before it is deployed. Called from
    the ingress, whose application the engine deployment belongs to."""
    from ray import serve

    app = serve.status().applications.get(serve.get_replica_context().app_name)
    engine = app.deployments.get(ENGINE_DEPLOYMENT) if app is not None else None
    if engine is None:
        return "MISSING", {}
    return _name(engine.status), {_name(state): count for state, count in engine.replica_states.items()}


def _name(state) -> str:
    return state.value if isinstance(state, Enum) else str(state)


def settled_at(live_replicas: int) -> bool:
    """Whether Serve runs exactly `live_replicas` engine replicas and starts none: then a replica
    that is gone was removed (a scale-down), not dying on its way to a restart."""
    status, states = engine_replica_states()
    return status == "HEALTHY" and states.get("RUNNING", 0) == sum(states.values()) == live_replicas
