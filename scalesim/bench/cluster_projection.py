"""`scalesim project --replicas N`: the GPU cost model over N replicas behind a routing. A MODEL
PROJECTION, not a measurement (the measured comparison is `scalesim microbench routing`).

Each replica is one GPU of the hardware profile running the real memory manager and policy
(as in costmodel.py) over its own budgets: the N devices together hold `device_fraction` of all
agent state, the N hosts `host_fraction` (`ideal`: each device could hold it all). Calls are
routed by the code the Serve router runs:
`affine` is cluster/placement.py's AffinePlacement (slot owner, warm agents stay, cold agents
spill past c x the mean queue), `random` any replica, `power-of-two` the shorter queue of two
random replicas; the queue is the calls already routed to a replica in the step. Hints go where
the ingress sends them (placement.target): under random and power-of-two routing, which place
nothing, that is the agent's slot owner.

Unlike costmodel.py, which sizes each agent's KV at its final length, every call is charged
with the context it has at that call: the agent's persona and its turns so far (a sliding window
where the workload keeps one). A replica's KV of an agent covers the history as it was at the
agent's last call there, so a history split between replicas costs what it costs: the call
recomputes whatever its replica does not hold. Per step, each replica's time is its stalls,
its prefill (uncached prompt tokens x 2 x params FLOPs) and its decode (weights and its batch's
KV read once per generated token); the step takes as long as the slowest replica.
"""

import random
from dataclasses import asdict, dataclass, field

from scalesim.bench.costmodel import (ALLOCATION_UNIT_BYTES, PROJECTION_LABEL, CountingPool, HardwareProfile,
                                      ModelProfile, StandIn, adapter_clusters, context_tokens, text_tokens)
from scalesim.cluster.placement import ROUTING_NAMES, AffinePlacement
from scalesim.distance.hints import estimate_distances
from scalesim.distance.tracker import DistanceTracker
from scalesim.memory.manager import MemoryManager, PrefetchSettings
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import TierBandwidth
from scalesim.sim.workloads import WORKLOADS, Trace, WorkloadConfig



@dataclass
class _History:
    """An agent's prompt context: persona tokens and its finished turns (user + reply)."""

    system_tokens: int
    window_turns: int | None
    turns: list[int] = field(default_factory=list)

    @property
    def window_start(self) -> int:
        return max(0, len(self.turns) - self.window_turns) if self.window_turns else 0

    @property
    def context_tokens(self) -> int:
        return self.system_tokens + sum(self.turns[self.window_start:])


@dataclass
class _HeldKV:
    """A replica's KV of an agent: the object, and the context it covers (window start, tokens)."""

    obj: StandIn
    window_start: int
    tokens: int


class _Replica:
    def __init__(self, device_nbytes: int, host_nbytes: int, policy: str, hw: HardwareProfile, clock,
                 future: dict) -> None:
        self.manager = MemoryManager(CountingPool(device_nbytes), DistanceTracker(clock=clock), POLICIES[policy],
                                     host_nbytes, None, TierBandwidth(host=hw.pcie_bytes_per_s, disk=hw.disk_bytes_per_s))
        self.manager.set_future(future)
        self.kv: dict[str, _HeldKV] = {}
        self.adapters: dict[int, StandIn] = {}
        self.calls = 0

    def adapter(self, cluster: int, owners: set[str], nbytes: int) -> StandIn:
        """This replica's copy of a cluster's adapter (read from disk the first time it is used)."""
        if cluster not in self.adapters:
            self.adapters[cluster] = StandIn(f"lora:{cluster}", "adapter", nbytes, set(owners), "disk")
            self.manager.add(self.adapters[cluster])
        return self.adapters[cluster]


@dataclass
class _StepCost:
    stall_s: float = 0.0
    prefill_tokens: int = 0
    kv_bytes: int = 0  # the batch's KV, read per decoded token
    outputs: list[int] = field(default_factory=list)
    calls_per_agent: dict[str, int] = field(default_factory=dict)
    pinned: list[StandIn] = field(default_factory=list)


def _route(routing: str, placement: AffinePlacement, agent: str, queue: dict[int, int],
           rng: random.Random) -> tuple[int, bool]:
    """(replica, whether a cold agent spilled past its owner)."""
    if routing == "affine":
        decision = placement.decide(agent, queue)
        return decision.order[0], decision.spilled
    if routing == "random":
        return rng.choice(sorted(queue)), False
    first, second = rng.sample(sorted(queue), 2) if len(queue) > 1 else (0, 0)
    return (first if queue[first] <= queue[second] else second), False


def _load(replica: _Replica, obj: StandIn, cost: _StepCost, hw: HardwareProfile) -> bool:
    """Bring `obj` to the replica's device for a call (a stall over its link); False if no room."""
    if obj.tier == "device":
        return True
    link_bytes_per_s = hw.pcie_bytes_per_s if obj.tier == "host" else hw.disk_bytes_per_s
    if not replica.manager.promote(obj):
        return False
    cost.stall_s += obj.nbytes / link_bytes_per_s
    return True


def project_replicas(trace: Trace, routing: str, replicas: int, policy: str = "scalesim",
                     device_fraction: float = 0.25, host_fraction: float = 0.5, seed: int = 0,
                     hardware: HardwareProfile | None = None, model: ModelProfile | None = None) -> dict:
    """Projected makespan, prefix hit rate and load of `trace` on `replicas` GPUs behind `routing`."""
    if routing not in ROUTING_NAMES:
        raise ValueError(f"routing must be one of {', '.join(ROUTING_NAMES)}, got {routing!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    hw, mp, rng = hardware or HardwareProfile(), model or ModelProfile(), random.Random(seed)
    history = {a.agent_id: _History(text_tokens(a.system), a.history_turns) for a in trace.agents}
    final_tokens, clusters = context_tokens(trace), adapter_clusters(trace)
    cluster_of = {a.agent_id: a.adapter_cluster for a in trace.agents}
    total = sum(final_tokens.values()) * mp.kv_bytes_per_token + len(clusters) * mp.lora_bytes
    clock_s = [0.0]
    ranks = list(range(replicas))
    if POLICIES[policy].unbounded_device:  # the limit of unbounded memory: every replica could hold everything
        device_fraction, host_fraction = 2.0 * replicas, 0.0
    nodes = [_Replica(int(device_fraction * total / replicas) + ALLOCATION_UNIT_BYTES,
                      int(host_fraction * total / replicas), policy, hw, lambda: clock_s[0], trace.future())
             for _ in ranks]
    placement = AffinePlacement()
    makespan = stall = 0.0
    spills = 0
    prompt_tokens = cached_tokens = prefill_tokens = 0
    step_s = [0.0] * replicas
    for step in trace.steps:
        clock_s[0] = makespan
        distances = estimate_distances(step.index, **step.hints)
        shares: dict[int, dict[str, float]] = {r: {} for r in ranks}
        for agent, distance in distances.items():
            shares[placement.target(agent, ranks)][agent] = distance
        for rank, node in enumerate(nodes):
            node.manager.advance(step.index)
            node.manager.hint(shares[rank])
            node.manager.prefetcher.settings = PrefetchSettings(max_bytes_in_flight=int(step_s[rank] * hw.pcie_bytes_per_s))
            node.manager.prefetch_once()  # overlapped with the previous step's compute
        queue = {r: 0 for r in ranks}
        costs, routed = [_StepCost() for _ in ranks], []
        for call in step.calls:
            agent = call.agent_id
            rank, spilled = _route(routing, placement, agent, queue, rng)
            spills += spilled
            queue[rank] += 1
            routed.append((rank, agent))
            node, cost = nodes[rank], costs[rank]
            node.calls += 1
            clock_s[0] = makespan + cost.stall_s
            node.manager.on_request(agent)
            if cluster_of[agent] is not None:
                adapter = node.adapter(cluster_of[agent], clusters[cluster_of[agent]], mp.lora_bytes)
                if not _load(node, adapter, cost, hw):  # no room: its weights are read for this call
                    cost.stall_s += adapter.nbytes / hw.pcie_bytes_per_s
                else:
                    adapter.pins += 1
                    cost.pinned.append(adapter)
            past, held = history[agent], node.kv.get(agent)
            cached = 0
            if held is not None and held.obj.tier is not None and _load(node, held.obj, cost, hw):
                cached = held.tokens if held.window_start == past.window_start else past.system_tokens
            if held is not None:
                if held.obj in cost.pinned:  # the agent's earlier call of this step on this replica
                    held.obj.pins -= 1
                    cost.pinned.remove(held.obj)
                node.manager.remove(held.obj)  # replaced below by the KV of the longer context
            prompt, window_start = past.context_tokens + text_tokens(call.user), past.window_start
            prompt_tokens, cached_tokens = prompt_tokens + prompt, cached_tokens + cached
            cost.prefill_tokens += prompt - cached
            cost.kv_bytes += prompt * mp.kv_bytes_per_token
            cost.outputs.append(call.max_tokens)
            cost.calls_per_agent[agent] = cost.calls_per_agent.get(agent, 0) + 1
            past.turns.append(text_tokens(call.user) + call.max_tokens)
            grown = StandIn(f"kv:{agent}", "kv", (prompt + call.max_tokens) * mp.kv_bytes_per_token, {agent}, None)
            node.manager.add(grown)
            node.kv[agent] = _HeldKV(grown, window_start, prompt + call.max_tokens)
            if node.manager.promote(grown):
                grown.pins += 1
                cost.pinned.append(grown)
        for rank, (node, cost) in enumerate(zip(nodes, costs)):
            for obj in cost.pinned:
                obj.pins -= 1
            prefill_s = cost.prefill_tokens * 2 * mp.params / hw.flops_per_s
            chain = max(cost.calls_per_agent.values(), default=0)
            decode_s = max(cost.outputs, default=0) * chain * (mp.params * mp.bytes_per_param + cost.kv_bytes) \
                / hw.hbm_bytes_per_s
            step_s[rank] = cost.stall_s + prefill_s + decode_s
            prefill_tokens += cost.prefill_tokens
        clock_s[0] = makespan + max(step_s)
        for rank, agent in routed:
            nodes[rank].manager.on_finish(agent)
        makespan += max(step_s)
        stall += max(c.stall_s for c in costs)
    calls = [n.calls for n in nodes]
    return {"label": PROJECTION_LABEL, "routing": routing, "replicas": replicas, "policy": policy,
            "makespan_s": round(makespan, 4), "prefix_hit_rate": round(cached_tokens / max(prompt_tokens, 1), 4),
            "prompt_tokens": prompt_tokens, "prefill_tokens": prefill_tokens, "slowest_stall_s": round(stall, 4),
            "calls_per_replica": calls, "max_over_mean_calls": round(max(calls) * replicas / max(sum(calls), 1), 4),
            "spills": spills, "total_state_bytes": total}


def project_cluster(workload: str, agents: int, steps: int, replicas: int, routings: tuple[str, ...] = ROUTING_NAMES,
                    state: str = "none", policy: str = "scalesim", device_fraction: float = 0.25,
                    host_fraction: float = 0.5) -> dict:
    trace = WORKLOADS[workload](WorkloadConfig(agents=agents, steps=steps, state=state, output_tokens=64))
    runs = [project_replicas(trace, r, replicas, policy, device_fraction, host_fraction) for r in routings]
    makespan = {r["routing"]: r["makespan_s"] for r in runs}
    ratios = {f"{r}_vs_affine": round(makespan[r] / makespan["affine"], 4)
              for r in makespan if r != "affine" and makespan.get("affine")}
    return {"label": PROJECTION_LABEL, "workload": workload, "agents": agents, "steps": steps, "state": state,
            "replicas": replicas, "policy": policy, "hardware": asdict(HardwareProfile()), "model": asdict(ModelProfile()),
            "runs": runs, "ratios": ratios, "is_measurement": False,
            "note": "a model projection over N GPUs; see bench/cluster_projection.py for what it charges"}
