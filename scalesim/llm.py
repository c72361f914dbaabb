"""`LLM`: the offline, synchronous entry point (generate a list of prompts to completion)."""

import time
import weakref
from pathlib import Path
from collections.abc import Sequence as SequenceABC

import torch
from tqdm import tqdm

from scalesim.config import EngineConfig
from scalesim.engine.llm_engine import LLMEngine
from scalesim.errors import InvalidRequestError
from scalesim.outputs import CompletionOutput, RequestOutput, SequenceDelta
from scalesim.sampling_params import SamplingParams
from scalesim.text import check_text

Prompt = str | list[int]
Messages = list[dict]


def _as_list(value, count: int, name: str) -> list:
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise InvalidRequestError(f"{name} has {len(value)} entries for {count} prompts")
    return list(value)


def render_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` under the model's chat template."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError("each message must be an object with a string 'role'")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own kinds for templates that reject input
        raise InvalidRequestError(f"the chat template rejected these messages: {exc}") from exc
    check_text(text, "messages")
    return tokenizer.encode(text, add_special_tokens=False)


class LLM:
    """A model ready to generate. Keyword arguments are `EngineConfig` fields.

    >>> with LLM("smollm2-135m") as llm:
    ...     llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._close = weakref.finalize(self, LLMEngine.shutdown, self.engine)

    def close(self) -> None:
        """Stop the engine's transfer threads and release its disk tier; idempotent. An `LLM`
        that is dropped is closed when collected; `with LLM(...) as llm:` closes it at the end."""
        self._close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def add_adapter(self, name: str, path: str) -> None:
        """Register a PEFT LoRA adapter folder under `name` (select it with adapters=[name] or model='base:name')."""
        self.engine.weights.add_adapter(name, path)

    def add_private_model(self, name: str, path: str) -> None:
        """Register a full weight set of the base architecture under `name` (select it with models=[name])."""
        self.engine.weights.add_private_model(name, path)

    def register_agent(self, agent_id: str, adapter: str | None = None, model: str | None = None,
                       prefix: str | list[int] | None = None) -> None:
        """Register an agent with its state; later `generate(..., agent_ids=[agent_id])` uses it.

        `adapter` / `model` are registered names or folders (a folder is registered under its
        path). `prefix` (persona text or token ids) is pre-filled into the prefix cache now.
        """
        weights = self.engine.weights
        if adapter is not None and adapter not in weights.adapters and Path(adapter).is_dir():
            weights.add_adapter(adapter, adapter)
        if model is not None and model not in weights.models and Path(model).is_dir():
            weights.add_private_model(model, model)
        self.engine.register_agent(agent_id, adapter=adapter, model=model,
                                   prefix=prefix if isinstance(prefix, str) else None)
        if prefix:
            self._run([self.engine.tokenize(prefix)], [SamplingParams(max_tokens=1, temperature=0)], [agent_id],
                      [(None, None)], use_tqdm=False)

    def hint(self, step: int | None = None, **hints) -> dict:
        """Tell the memory layer who calls next: see `scalesim.distance.hints` for the accepted hints
        (distances, schedule, plans, probabilities/active, turn_order, frontier/graph, positions,
        and the paper's agent_data/timestep_data/timestep_cnt)."""
        return self.engine.hint(step, **hints)

    def set_future(self, calls: dict[str, list[float]]) -> None:
        """The true future (steps of each agent's calls), for the `oracle` policy."""
        self.engine.set_future(calls)

    def memory_stats(self) -> dict:
        """Memory counters per tier and kind (hits, misses, bytes moved, prefetches, stall seconds)."""
        return self.engine.memory_stats()

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 agent_ids: str | list[str | None] | None = None, use_tqdm: bool = False,
                 adapters: str | list[str | None] | None = None,
                 models: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); results come back in prompt order.

        `adapters` and `models` pick, per prompt, a registered LoRA adapter and the model (base,
        'base:adapter' or a private model); None means the base model without adapter.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, SequenceABC) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list")
        params = _as_list(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        agents = _as_list(agent_ids, len(prompts), "agent_ids")
        targets = list(zip(_as_list(adapters, len(prompts), "adapters"), _as_list(models, len(prompts), "models")))
        return self._run([self.engine.tokenize(p) for p in prompts], params, agents, targets, use_tqdm)

    def chat(self, messages: Messages | list[Messages], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             agent_ids: str | list[str | None] | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False, adapters: str | list[str | None] | None = None,
             models: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Generate a reply to each conversation, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompt_ids = [render_chat(self.tokenizer, c, add_generation_prompt) for c in conversations]
        params = _as_list(sampling_params or SamplingParams(), len(prompt_ids), "sampling_params")
        targets = list(zip(_as_list(adapters, len(prompt_ids), "adapters"), _as_list(models, len(prompt_ids), "models")))
        return self._run(prompt_ids, params, _as_list(agent_ids, len(prompt_ids), "agent_ids"), targets, use_tqdm)

    def prompt_logits(self, prompt: Prompt, agent_id: str | None = None, adapter: str | None = None,
                      model: str | None = None) -> torch.Tensor:
        """Logits [uncached prompt tokens, vocab] for every prompt position computed by this call.

        Positions whose KV came from the prefix cache are not recomputed, so the rows start at
        `len(prompt) - rows`; the prompt's pages are cached afterwards like any request's.
        """
        request_id = self.engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0),
                                             agent_id=agent_id, adapter=adapter, model=model,
                                             want_prompt_logits=True)
        seq = self.engine.requests[request_id].seqs[0]
        while not seq.is_finished:
            self.engine.step()
        return torch.cat(seq.prompt_logits)

    def _run(self, prompt_ids: list[list[int]], params: list[SamplingParams], agents: list[str | None],
             targets: list[tuple[str | None, str | None]], use_tqdm: bool) -> list[RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        order = []
        try:
            for ids, p, agent, (adapter, model) in zip(prompt_ids, params, agents, targets):
                request_id = self.engine.add_request(ids, p, agent_id=agent, adapter=adapter, model=model)
                order.append(request_id)
                outputs[request_id] = RequestOutput(request_id, ids, [CompletionOutput(i) for i in range(p.n)],
                                                    agent_id=agent, arrival_s=time.perf_counter())
            with tqdm(total=len(order), disable=not use_tqdm, desc="generate") as bar:
                while self.engine.has_unfinished():
                    for delta in self.engine.step():
                        self._apply(outputs[delta.request_id], delta)
                        if outputs[delta.request_id].finished and delta.finished:
                            bar.update(1)
        except BaseException:
            for request_id in order:
                self.engine.abort(request_id)
            raise
        return [outputs[r] for r in order]

    @staticmethod
    def _apply(output: RequestOutput, delta: SequenceDelta) -> None:
        now = time.perf_counter()
        output.outputs[delta.index].add(delta)
        output.num_cached_tokens = max(output.num_cached_tokens, delta.num_cached_tokens)
        output.first_token_s = output.first_token_s or now
        if output.finished:
            output.finished_s = now

    def stats(self) -> dict:
        return self.engine.stats()
