"""GPU projection: a discrete-event model of a workload on a hardware profile. A MODEL
PROJECTION, not a measurement: it never replaces the measured numbers of `scalesim bench`.

It replays a workload trace step by step through the real memory manager and policy code
(`memory/manager.py`, `memory/policies.py`) with byte-sized stand-ins for each agent's KV
context and adapter, and charges time from a hardware profile:
- prefill: new (uncached or recomputed) tokens x 2 x params FLOPs at the profile's FLOP rate;
- decode: per generated token of the step's batch, the weights plus the batch's KV read from HBM;
- on-demand loads: bytes over PCIe (host) or from disk, on the critical path (stall);
- a call whose state finds no room on the device while other calls hold theirs waits for the
  next wave (as a request waits for its loads in the engine); alone on the device, a load that
  still finds no room is not free: a KV context is recomputed (its tokens charged as prefill and
  counted), an adapter is read over its link for the call (a stall);
- the tiers are the regime's, and a baseline that copies a deployment keeps its own (as in
  `scalesim bench`): without a disk tier an evicted context below the host is recomputed;
- prefetch: loads issued by the policy while the previous step computed, free up to the bytes
  PCIe moves in that time.
- so a step whose calls' state does not fit the device together runs in waves, each as large
  as the device holds: every wave reads the weights once per decode token (a smaller batch costs
  more weight traffic per token), so waves count in the decode time and are reported. As
  everywhere in this model, a context is the agent's final one, so early steps are charged a
  little more than they hold, and the device's room counts the adapters' share too.
The distance tracker runs on the simulated clock (seconds of projected makespan), so the gaps it
learns between an agent's calls are the projected ones.
"""

from dataclasses import asdict, dataclass, field

from scalesim.bench.regimes import below_device
from scalesim.distance.tracker import DistanceTracker
from scalesim.distance.hints import estimate_distances
from scalesim.memory.manager import MemoryManager, PrefetchSettings
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import ResidentObject, TierBandwidth
from scalesim.sim.workloads import WORKLOADS, Trace, WorkloadConfig

PROJECTION_LABEL = "MODEL PROJECTION (discrete-event cost model, not a measurement)"
WORDS_TO_TOKENS = 1.3
ALLOCATION_UNIT_BYTES = 2**20


@dataclass
class HardwareProfile:
    name: str = "H100-SXM-80GB"
    flops_per_s: float = 989e12 * 0.5     # bf16 dense at 50% utilisation
    hbm_bytes_per_s: float = 3.35e12 * 0.8
    pcie_bytes_per_s: float = 25e9        # PCIe 5.0 x16, effective
    disk_bytes_per_s: float = 5e9         # NVMe


# The 2-core machine the measured benches run on: prefill of SmolLM2-135M (fp32) at about 410
# tokens/s (../shared/PEERS.md, measured there), memory copies (its host-to-device "link") and a
# decode step's weight reads at about 10 GB/s (the machine's facts), disk reads with the page
# cache dropped at 0.27 GB/s (benchmarks/results/disk.json). For ranking policies against a
# measured run (`project_measured`), not for GPUs.
CPU_2CORE = HardwareProfile(name="2-core CPU (this project's measuring machine)",
                            flops_per_s=410 * 2 * 134.5e6, hbm_bytes_per_s=10e9, pcie_bytes_per_s=10e9,
                            disk_bytes_per_s=0.27e9)


@dataclass
class ModelProfile:
    name: str = "8B, Llama-3-8B shape (GQA), bf16"
    params: float = 8.0e9
    bytes_per_param: float = 2
    kv_bytes_per_token: int = 2 * 32 * 8 * 128 * 2
    lora_bytes: int = 32 * 81920 * 16 * 2  # rank 16 on all seven projections


class CountingPool:
    """Only the bookkeeping of a KV pool: units of ALLOCATION_UNIT_BYTES, no tensor."""

    device = "cpu"  # nothing is copied: moves are free

    def __init__(self, nbytes: int) -> None:
        self.block_nbytes = ALLOCATION_UNIT_BYTES
        self.block_size = 1
        self.num_blocks = nbytes // ALLOCATION_UNIT_BYTES
        self.num_kv_blocks = 0  # stand-ins reserve their room instead of allocating pages
        self.reserved_blocks = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_kv_blocks - self.reserved_blocks

    def reserve(self, count: int) -> bool:
        if count > self.num_free:
            return False
        self.reserved_blocks += count
        return True

    def unreserve(self, count: int) -> None:
        self.reserved_blocks -= count


class StandIn(ResidentObject):
    """A byte-sized stand-in for a piece of agent state (KV context or adapter) in the projection.
    With `disk`, a KV context goes to disk for free when evicted below the host; without, it needs
    a file write that has no store to go to, so it is forgotten (and recomputed), as in a run
    without a disk tier."""

    def __init__(self, key: str, kind: str, nbytes: int, owners: set[str], tier: str | None,
                 disk: bool = True) -> None:
        super().__init__()
        self._key, self.kind, self._nbytes, self._tier, self.owners = key, kind, nbytes, tier, owners
        self.pins = 0
        self.writes_to_disk = kind == "kv" and not disk

    key = property(lambda self: self._key)
    nbytes = property(lambda self: self._nbytes)
    tier = property(lambda self: self._tier)
    pin_count = property(lambda self: self.pins)

    def move_to(self, tier: str) -> None:
        self._tier = tier

    def droppable(self) -> bool:
        return self.kind == "kv" and self.pins == 0 and self.moving_to is None

    def forget(self) -> None:
        self._tier = None


def text_tokens(text: str) -> int:
    """Tokens of a trace's text, estimated from its words."""
    return int(len(text.split()) * WORDS_TO_TOKENS)


def context_tokens(trace: Trace) -> dict[str, int]:
    """Each agent's final context: its persona, and every call's message and reply."""
    tokens = {a.agent_id: text_tokens(a.system) for a in trace.agents}
    for step in trace.steps:
        for call in step.calls:
            tokens[call.agent_id] += text_tokens(call.user) + call.max_tokens
    return tokens


def adapter_clusters(trace: Trace) -> dict[int, set[str]]:
    """The agents of each adapter cluster (agents of one cluster share a LoRA)."""
    clusters: dict[int, set[str]] = {}
    for agent in trace.agents:
        if agent.adapter_cluster is not None:
            clusters.setdefault(agent.adapter_cluster, set()).add(agent.agent_id)
    return clusters


@dataclass
class _Tally:
    stall_s: float = 0.0
    loaded_bytes: int = 0
    recomputed_tokens: int = 0
    failed_loads: int = 0
    waves: int = 0


@dataclass
class _Calls:
    """What admitting a call needs: the manager, each agent's state, the sizes, the tally."""

    manager: MemoryManager
    hw: HardwareProfile
    context: dict[str, int]                   # each agent's final context, tokens
    kv_nbytes: dict[str, int]
    agent_adapter: dict[str, "StandIn | None"]
    disk: bool
    tally: _Tally = field(default_factory=_Tally)
    kv: dict[str, "StandIn"] = field(default_factory=dict)

    def admit(self, call, alone: bool) -> tuple[list["StandIn"], int] | None:
        """Bring the call's adapter and KV context to the device and pin them; return them and
        the tokens its prefill computes, or None when they find no room while other calls run
        (it waits for the next wave, as a request waits for its loads in the engine). Alone on
        the device, a load that still finds no room is not free: a KV context is computed again
        for the call, an adapter's weights are read over their link for it. A load is paid when
        it is made (a call that then waits keeps it on the device, unpinned)."""
        agent, manager, tally, kv = call.agent_id, self.manager, self.tally, self.kv
        pinned: list[StandIn] = []
        new_tokens = text_tokens(call.user) + call.max_tokens
        # a KV context that was dropped is not loaded: it is computed again below
        for obj in (o for o in (self.agent_adapter[agent], kv.get(agent)) if o is not None and o.tier is not None):
            source = obj.tier
            if source != "device":
                if not manager.promote(obj):  # no room on the device
                    if not alone:
                        return self._wait(pinned)
                    tally.failed_loads += 1
                    if obj.kind == "kv":      # the context is computed again for this call
                        tally.recomputed_tokens += self.context[agent]
                        new_tokens += self.context[agent] // 2  # half of it exists by now
                    else:                     # the adapter's weights are read for this call
                        self._charge(obj, source)
                    continue
                self._charge(obj, source)
            obj.pins += 1
            pinned.append(obj)
        if agent not in kv or kv[agent].tier is None:
            fresh = StandIn(f"kv:{agent}", "kv", self.kv_nbytes[agent], {agent}, None, self.disk)  # computed now
            manager.add(fresh)
            if manager.promote(fresh):
                fresh.pins += 1
                pinned.append(fresh)
            elif not alone:
                manager.remove(fresh)
                return self._wait(pinned)
            tally.recomputed_tokens += self.context[agent] if agent in kv else 0
            new_tokens += self.context[agent] // 2  # on average half of the final context exists by now
            kv[agent] = fresh
        return pinned, new_tokens

    def _charge(self, obj: "StandIn", source: str) -> None:
        link_bytes_per_s = self.hw.pcie_bytes_per_s if source == "host" else self.hw.disk_bytes_per_s
        self.tally.stall_s += obj.nbytes / link_bytes_per_s
        self.tally.loaded_bytes += obj.nbytes

    @staticmethod
    def _wait(pinned: list["StandIn"]) -> None:
        for obj in pinned:
            obj.pins -= 1
        return None


def project(trace: Trace, policy: str, device_fraction: float, host_fraction: float,
            hardware: HardwareProfile | None = None, model: ModelProfile | None = None, disk: bool = True) -> dict:
    """Projected makespan and its parts for `trace` under `policy` (see the module docstring).
    The tiers are the regime's (`device_fraction`, `host_fraction`, `disk`) except where the
    policy copies a deployment with tiers of its own, as in `scalesim bench`."""
    hw, mp = hardware or HardwareProfile(), model or ModelProfile()
    context = context_tokens(trace)
    kv_nbytes = {a: t * mp.kv_bytes_per_token for a, t in context.items()}
    clusters = adapter_clusters(trace)
    total = sum(kv_nbytes.values()) + len(clusters) * mp.lora_bytes
    p = POLICIES[policy]
    unbounded = p.unbounded_device
    pool = CountingPool(int(2 * total if unbounded else device_fraction * total) + ALLOCATION_UNIT_BYTES)
    device_nbytes = pool.num_blocks * pool.block_nbytes
    host_nbytes, disk = below_device(p, int(device_fraction * total), int(host_fraction * total), disk)
    clock_s = [0.0]  # the simulated clock: projected seconds so far
    tracker = DistanceTracker(clock=lambda: clock_s[0])
    manager = MemoryManager(pool, tracker, p, host_nbytes, None,
                            TierBandwidth(host=hw.pcie_bytes_per_s, disk=hw.disk_bytes_per_s))
    manager.set_future(trace.future())
    adapters = {c: StandIn(f"lora:{c}", "adapter", mp.lora_bytes, owners, "disk") for c, owners in clusters.items()}
    for obj in adapters.values():
        manager.add(obj)
        if unbounded:
            manager.promote(obj)  # the limit of unbounded memory: everything is resident from the start
    calls = _Calls(manager, hw, context, kv_nbytes, {a.agent_id: adapters.get(a.adapter_cluster) for a in trace.agents},
                   disk)
    tally = calls.tally
    makespan = prefill = decode = 0.0
    previous_step_s = 0.0
    for step in trace.steps:
        clock_s[0] = makespan
        manager.advance(step.index)
        manager.hint(estimate_distances(step.index, **step.hints))
        manager.prefetcher.settings = PrefetchSettings(max_bytes_in_flight=int(previous_step_s * hw.pcie_bytes_per_s))
        manager.prefetch_once()  # overlapped with the previous step's compute
        step_stall_before, step_prefill_tokens = tally.stall_s, 0
        for call in step.calls:
            manager.on_request(call.agent_id)
        pending, step_waves = list(step.calls), 0
        while pending:  # waves: a call whose state finds no room waits for the calls running now
            step_waves += 1
            running, waiting = [], []
            for call in pending:
                clock_s[0] = makespan + tally.stall_s - step_stall_before
                admitted = calls.admit(call, alone=not running)
                if admitted is None:
                    waiting.append(call)
                    continue
                pinned, new_tokens = admitted
                running.append((call, pinned))
                step_prefill_tokens += new_tokens
            clock_s[0] = makespan + tally.stall_s - step_stall_before + step_prefill_tokens * 2 * mp.params / hw.flops_per_s
            for call, pinned in running:
                for obj in pinned:
                    obj.pins -= 1
                manager.on_finish(call.agent_id)
            pending = waiting
        step_stall = tally.stall_s - step_stall_before
        batch_kv_bytes = sum(kv_nbytes[c.agent_id] for c in step.calls)
        max_output = max((c.max_tokens for c in step.calls), default=0)
        chain = max((sum(1 for c in step.calls if c.agent_id == a) for a in {c.agent_id for c in step.calls}),
                    default=0)
        step_decode = (max_output * chain * (step_waves * mp.params * mp.bytes_per_param + batch_kv_bytes)
                       / hw.hbm_bytes_per_s)
        tally.waves += step_waves
        step_prefill = step_prefill_tokens * 2 * mp.params / hw.flops_per_s
        previous_step_s = step_prefill + step_decode
        makespan += previous_step_s + step_stall
        prefill, decode = prefill + step_prefill, decode + step_decode
    return {"label": PROJECTION_LABEL, "policy": policy, "makespan_s": round(makespan, 4),
            "stall_s": round(tally.stall_s, 4), "prefill_s": round(prefill, 4), "decode_s": round(decode, 4),
            "loaded_bytes": tally.loaded_bytes, "recomputed_tokens": tally.recomputed_tokens,
            "failed_loads": tally.failed_loads, "batch_waves": tally.waves, "total_state_bytes": total}


def project_workload(workload: str, agents: int, steps: int, state: str = "lora-agent",
                     policies: tuple[str, ...] = ("ideal", "scalesim", "lru"), device_fraction: float = 0.25,
                     host_fraction: float = 0.5) -> dict:
    trace = WORKLOADS[workload](WorkloadConfig(agents=agents, steps=steps, state=state, output_tokens=64))
    runs = [project(trace, p, device_fraction, host_fraction) for p in policies]
    makespan = {r["policy"]: r["makespan_s"] for r in runs}
    ratios = {}
    if "scalesim" in makespan and "ideal" in makespan:
        ratios["scalesim_vs_ideal"] = round(makespan["scalesim"] / makespan["ideal"], 4)
    if "scalesim" in makespan and "lru" in makespan and makespan["scalesim"] > 0:
        ratios["lru_vs_scalesim"] = round(makespan["lru"] / makespan["scalesim"], 4)
    return {"label": PROJECTION_LABEL, "workload": workload, "agents": agents, "steps": steps, "state": state,
            "hardware": asdict(HardwareProfile()), "model": asdict(ModelProfile()), "runs": runs, "ratios": ratios,
            "is_measurement": False, "note": "a model projection; see bench/costmodel.py for what it charges"}


def project_measured(result: dict, hardware: HardwareProfile = CPU_2CORE) -> dict:
    """Project what a `scalesim bench` result measured: the same trace (regenerated from its
    seeded config), regime, policies and state sizes (its `state_sizes`), on `hardware`. For
    checking that the model ranks the policies as the measurement did. ValueError for a result
    that does not say what it ran (not a bench result, or one written before `state_sizes`)."""
    missing = [k for k in ("state_sizes", "regime", "workload", "config", "runs", "model")
               if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"not a `scalesim bench` result this can project (it lacks {', '.join(missing)}; "
                         "results written before state_sizes was recorded must be run again)")
    sizes, regime = result["state_sizes"], result["regime"]
    model = ModelProfile(name=result["model"], params=sizes["model_params"], bytes_per_param=sizes["bytes_per_param"],
                         kv_bytes_per_token=sizes["kv_bytes_per_token"], lora_bytes=sizes["adapter_nbytes"])
    trace = WORKLOADS[result["workload"]](WorkloadConfig(**result["config"]))
    runs = [project(trace, run["policy"], regime["device_fraction"], regime["host_fraction"], hardware, model,
                    regime["disk"]) for run in result["runs"]]
    return {"label": PROJECTION_LABEL, "workload": result["workload"], "hardware": asdict(hardware),
            "model": asdict(model), "runs": runs, "is_measurement": False}


__all__ = ["project", "project_measured", "project_workload", "CPU_2CORE", "HardwareProfile", "ModelProfile", "PROJECTION_LABEL"]
