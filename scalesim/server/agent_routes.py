"""The ScaleSim extensions: the agent registry (`/v1/agents`) and hints (`/v1/hints`, `/v1/update`)."""

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from scalesim.server.agent_store import AgentRecord
from scalesim.server.chat_render import render_prompt
from scalesim.server.errors import APIError
from scalesim.server.protocol import AgentCreate, HintBatch, PaperUpdate
from scalesim.server.state import ServerState, server_state

router = APIRouter()
logger = logging.getLogger(__name__)
MAX_HINT_STEP = 2**53  # steps are exact as floats up to here


def _agent_view(state: ServerState, agent_id: str) -> dict:
    record = state.agents.get(agent_id)
    registered = state.llm.engine.agents.get(agent_id)
    objects = state.llm.agent_state(agent_id)
    distance = state.llm.engine.tracker.distance(agent_id)
    if record is None and registered is None and not objects:
        raise APIError(404, f"no agent {agent_id!r}", param="id", code="agent_not_found")
    by_tier: dict[str, int] = {}
    for obj in objects:
        by_tier[obj["tier"] or "dropped"] = by_tier.get(obj["tier"] or "dropped", 0) + obj["nbytes"]
    return {"id": agent_id, "object": "agent", "registered": record is not None,
            "adapter": registered.adapter if registered else None, "model": registered.model if registered else None,
            "adapter_path": record.adapter_path if record else None,
            "model_path": record.model_path if record else None,
            "distance_steps": distance if distance != float("inf") else None,
            "nbytes_by_tier": by_tier, "objects": objects}


@router.post("/v1/agents")
async def create_agent(body: AgentCreate, request: Request, prefill: bool = True):
    """Register an agent: its adapter / private model (folders under --allowed-local-paths) and a
    persona prefix pre-filled into the prefix cache now: `prefix` (raw prompt text) or `system`
    (its system message, rendered as the first turn of its chats). `?prefill=false` registers it
    without pre-filling (a scale-out ingress registers agents on replicas that do not own them)."""
    state = server_state(request)
    if body.prefix and body.system:
        raise APIError(400, "give either prefix or system, not both", param="system")
    prefix = body.prefix
    if body.system:
        prefix = render_prompt(state.llm.tokenizer, [{"role": "system", "content": body.system}],
                               add_generation_prompt=False)
    record = AgentRecord(body.id, body.adapter_path, body.model_path, prefix, adapter=body.adapter, model=body.model)
    await run_in_threadpool(state.register, record, False)
    try:
        prefilled = await state.llm.prefill(body.id, prefix) if prefix and prefill else 0
    except Exception:
        await run_in_threadpool(state.llm.unregister_agent, body.id)
        raise
    await run_in_threadpool(state.agents.put, record)  # persisted only once it is known to work
    return {**await run_in_threadpool(_agent_view, state, body.id), "prefilled_tokens": prefilled}


@router.get("/v1/agents/{agent_id:path}")
def get_agent(agent_id: str, request: Request):
    """Where each of the agent's objects lives now (device, host, disk)."""
    return _agent_view(server_state(request), agent_id)


@router.delete("/v1/agents/{agent_id:path}")
def delete_agent(agent_id: str, request: Request):
    state = server_state(request)
    removed = state.agents.delete(agent_id)
    if agent_id in state.llm.engine.agents:
        state.llm.unregister_agent(agent_id)
        removed = True
    if not removed:
        raise APIError(404, f"no agent {agent_id!r}", param="id", code="agent_not_found")
    return {"id": agent_id, "object": "agent", "deleted": True}


def hint_agents(state: ServerState, step: int | None, hints: dict) -> dict:
    """Feed `hints` (the keyword arguments of LLM.hint) to the engine; a 400 for values out of range."""
    if step is not None and not 0 <= step <= MAX_HINT_STEP:
        raise APIError(400, f"step must be in [0, {MAX_HINT_STEP}]", param="step")
    try:
        accepted = state.llm.hint(step, **{k: v for k, v in hints.items() if v is not None})
    except ArithmeticError as exc:  # e.g. a speed so small that a distance overflows
        raise APIError(400, f"hint values out of range: {exc}")
    state.metrics.unknown_hinted_agents.inc(accepted["unknown"])
    return {"object": "hint_result", **accepted}


def parse_hint_batch(raw: bytes) -> HintBatch:
    """The body of POST /v1/hints, parsed and validated in one pass (a hint may name a million
    agents: this runs off the event loop, and without copying the maps again)."""
    try:
        return HintBatch.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


@router.post("/v1/hints", openapi_extra={"requestBody": {"content": {"application/json": {
    "schema": HintBatch.model_json_schema()}}, "required": True}})
async def hints(request: Request):
    """Invocation-distance hints for the coming steps (see scalesim.distance.hints). Agents the
    server does not know yet are accepted and counted: they may call later."""
    body = await run_in_threadpool(parse_hint_batch, await request.body())
    fields = {name: getattr(body, name) for name in body.model_fields_set if name != "step"}
    return await run_in_threadpool(hint_agents, server_state(request), body.step, fields)


@router.post("/v1/update")
async def paper_update(body: PaperUpdate, request: Request):
    """The ScaleSim paper's shape: agent_data {agent: distance}, timestep_data {distance: [agents]}."""
    fields = body.model_dump(exclude={"timestep_cnt"})
    return await run_in_threadpool(hint_agents, server_state(request), body.timestep_cnt, fields)


async def prefill_registered(state: ServerState) -> None:
    """After a restart: pre-fill the persona prefixes of the restored agents."""
    records = [r for r in state.agents.all() if r.prefix and r.agent_id in state.llm.engine.agents
               and state.prefills_on_restore(r.agent_id)]
    results = await asyncio.gather(*(state.llm.prefill(r.agent_id, r.prefix) for r in records), return_exceptions=True)
    for record, result in zip(records, results):
        if isinstance(result, Exception):
            logger.warning("agent %s: persona prefix not pre-filled: %s", record.agent_id, result)
