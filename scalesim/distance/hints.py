"""Turn the hint arguments of `hint()` / `POST /v1/hints` into one distance per agent.

Accepted (all optional): distances {agent: steps}, schedule {agent: absolute step},
plans {agent: remaining steps}, probabilities {agent: p} with active [agents],
turn_order [agents], frontier [agents] with graph {agent: [neighbours]}, positions
{agent: [x, y]} with speed (and cooldowns {agent: steps}), and the ScaleSim paper's shape
agent_data {agent: d}, timestep_data {d: [agents]} (timestep_cnt is the step).
"""

from scalesim.distance import estimators
from scalesim.errors import InvalidRequestError

DEFAULT_SPEED_PER_STEP = 1.0


_NUMBERS = (int, float)


def _mapping(name: str, value) -> dict:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"hint {name!r} must be an object of agent ids")
    # two tight passes, not one loop of several checks: a hint may name a million agents
    if not all(type(agent) is str for agent in value) or not all(
            type(number) in _NUMBERS and number >= 0 for number in value.values()):
        raise InvalidRequestError(f"hint {name!r} must map agent ids to non-negative numbers")
    return value


def _agents(name: str, value) -> list[str]:
    if not isinstance(value, (list, tuple)) or any(not isinstance(a, str) for a in value):
        raise InvalidRequestError(f"hint {name!r} must be a list of agent ids")
    return list(value)


def estimate_distances(step: int, distances=None, schedule=None, plans=None, probabilities=None, active=None,
                       turn_order=None, frontier=None, graph=None, positions=None,
                       speed: float = DEFAULT_SPEED_PER_STEP, cooldowns=None, agent_data=None,
                       timestep_data=None, timestep_cnt=None) -> dict[str, float]:
    """The minimum over every estimator the hints feed."""
    parts = []
    if distances is not None:
        parts.append(estimators.explicit(_mapping("distances", distances)))
    if schedule is not None:
        parts.append(estimators.schedule(_mapping("schedule", schedule), step))
    if plans is not None:
        parts.append(estimators.plans(_mapping("plans", plans)))
    if probabilities is not None or active is not None:
        probabilities = _mapping("probabilities", probabilities or {})
        if any(p > 1 for p in probabilities.values()):
            raise InvalidRequestError("hint 'probabilities' must lie in [0, 1]")
        parts.append(estimators.random_activation(probabilities, _agents("active", active or [])))
    if turn_order is not None:
        parts.append(estimators.turn_order(_agents("turn_order", turn_order)))
    if frontier is not None:
        graph = graph or {}
        if not isinstance(graph, dict):
            raise InvalidRequestError("hint 'graph' must map agent ids to lists of agent ids")
        parts.append(estimators.activation_path(_agents("frontier", frontier),
                                                {a: _agents("graph", n) for a, n in graph.items()}))
    if positions is not None:
        if not isinstance(positions, dict) or any(
                not isinstance(p, (list, tuple)) or len(p) != 2 for p in positions.values()):
            raise InvalidRequestError("hint 'positions' must map agent ids to [x, y]")
        parts.append(estimators.interaction({a: (float(p[0]), float(p[1])) for a, p in positions.items()},
                                            float(speed), _mapping("cooldowns", cooldowns or {})))
    if agent_data is not None or timestep_data is not None:
        if timestep_data is not None and not isinstance(timestep_data, dict):
            raise InvalidRequestError("'timestep_data' must map distances to lists of agent ids")
        parts.append(estimators.paper_update(_mapping("agent_data", agent_data or {}),
                                             {d: _agents("timestep_data", a) for d, a in (timestep_data or {}).items()}))
    return parts[0] if len(parts) == 1 else estimators.combine(*parts)
