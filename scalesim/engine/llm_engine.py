"""The engine loop: validate and queue requests, step the scheduler and model, emit deltas.

One thread drives it (the `LLM` caller, or the `AsyncLLM` loop thread). The memory transfer
threads move state concurrently; all take the memory manager's lock for bookkeeping, the engine
only while scheduling and recording a step (never during the forward pass), the transfer threads
never while bytes are copied, read or written.
"""

import itertools
import logging
import time
from dataclasses import dataclass
from functools import cached_property, partial

import torch

from scalesim.config import DEFAULT_NUM_SPECULATIVE_TOKENS, WEIGHT_ONLY, EngineConfig
from scalesim.engine.block_pool import BlockPool
from scalesim.engine.cpu_runtime import configure_cpu_allocator
from scalesim.layers.linear import pack_for_cpu
from scalesim.layers.lora import stack_nbytes
from scalesim.layers.weight_only import compress_weights
from scalesim.engine.detokenizer import IncrementalDetokenizer
from scalesim.engine.grammar import GrammarCompiler
from scalesim.engine.model_runner import ModelRunner, SampledToken
from scalesim.engine.radix_cache import RadixCache
from scalesim.distance.hints import estimate_distances
from scalesim.distance.tracker import DistanceTracker
from scalesim.engine.agents import Agent
from scalesim.engine.memory_hooks import ManagedMemory
from scalesim.engine.scheduler import Scheduler
from scalesim.engine.speculation import PromptLookup, Speculator
from scalesim.engine.sequence import Sequence
from scalesim.errors import InvalidRequestError, RequestTooLargeError
from scalesim.models.loader import load_model, load_tokenizer
from scalesim.models.registry import resolve_model
from scalesim.outputs import SequenceDelta
from scalesim.sampling_params import SamplingParams
from scalesim.text import check_agent_id, check_text
from scalesim.memory.disk_store import DiskStore
from scalesim.memory.kv_object import path_tokens as path_of
from scalesim.memory.kv_objects import KVObjects
from scalesim.memory.manager import MemoryManager
from scalesim.memory.policies import POLICIES
from scalesim.memory.worker import TransferWorker
from scalesim.weights.registry import WeightRegistry, kv_namespace

logger = logging.getLogger(__name__)
# How the base model's linears get their kernels, per `EngineConfig.quantization`: oneDNN's packed
# layout (on a CPU; elsewhere nothing changes), or float16 or int8 weights.
PREPARE_LINEARS = {"none": pack_for_cpu, **{fmt: partial(compress_weights, fmt=fmt) for fmt in WEIGHT_ONLY}}


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        started = time.perf_counter()
        if config.device == "cpu":
            configure_cpu_allocator()
        self.model_path = resolve_model(config.model)
        self.model = load_model(self.model_path, config.torch_dtype, config.device)
        # A tied output head shares the embedding's weight, which the lookup still reads.
        PREPARE_LINEARS[config.quantization](self.model, shared={id(self.model.embed_tokens.weight)})
        self.tokenizer = load_tokenizer(self.model_path)
        self.model_config = self.model.config
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids +
                                       ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []))
        self.pool = BlockPool(self.model_config, config.kv_cache_nbytes, config.block_size_tokens,
                              config.torch_kv_cache_dtype, config.device)
        self.cache = RadixCache(self.pool)
        self.tracker = DistanceTracker()
        identity = {"model": str(self.model_path), "block_size_tokens": config.block_size_tokens,
                    "kv_cache_dtype": config.kv_cache_dtype, "kv_shape": list(self.pool.kv_cache.shape[3:]),
                    # What computed the KV, where it is not the default (weights in the KV's dtype, no
                    # quantization): other weights compute other values. Keys absent when default, so
                    # state written before they existed still matches.
                    **({"weights_dtype": str(config.torch_dtype)} if config.torch_dtype != config.torch_kv_cache_dtype
                       else {}),
                    **({"quantization": config.quantization} if config.quantization != "none" else {}),
                    "layers": self.model_config.num_hidden_layers}
        store = (DiskStore(config.disk_dir, config.disk_nbytes, identity, page_cache=config.disk_page_cache)
                 if config.disk_dir else None)
        self.memory = MemoryManager(self.pool, self.tracker, POLICIES[config.policy], config.host_nbytes, store)
        self.kv_objects = KVObjects(self.memory, self.cache)
        self.kv_objects.restore()
        self.memory_hooks = ManagedMemory(self.memory, self.cache, self.pool)
        self.runner = ModelRunner(self.model, self.pool, config.device, config.attention)
        self.num_speculative_tokens = config.num_speculative_tokens
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_NUM_SPECULATIVE_TOKENS if self.runner.prefill_in_place else 0
        self.speculator = (Speculator(PromptLookup(self.num_speculative_tokens))
                           if self.num_speculative_tokens else None)
        self.scheduler = Scheduler(self.pool, self.cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.memory_hooks, self.speculator)
        self.weights = WeightRegistry(config.model, self.model_config, config.device, config.torch_dtype,
                                      config.max_lora_rank, self.memory)
        self.agents: dict[str, Agent] = {}
        self.worker = TransferWorker(self.memory, config.transfer_threads)
        self.requests: dict[str, _Request] = {}
        self.draft_tokens = 0           # drafted tokens verified by steps (speculative decoding)
        self.accepted_draft_tokens = 0  # of them, those the model chose too
        self.forward_s = 0.0  # seconds in the model's forward passes (sampling included)
        self.idle_s = 0.0     # seconds with work queued and no batch to run: waiting for loads or room
        self._ids = itertools.count()
        self._shut_down = False
        logger.info("loaded %s in %.2f s on %s, %s compute, %s weights; KV pool %d pages of %d tokens (%d bytes)",
                    config.model, time.perf_counter() - started, config.device, config.dtype,
                    config.dtype if config.quantization == "none" else config.quantization,
                    self.pool.num_blocks, self.pool.block_size, self.pool.nbytes)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids; InvalidRequestError if unusable."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            check_text(prompt, "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string or a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams, agent_id: str | None = None,
                    request_id: str | None = None, adapter: str | None = None, model: str | None = None,
                    want_prompt_logits: bool = False) -> str:
        """Validate and queue a request; return its id. Raises InvalidRequestError on bad input.

        `adapter` names a registered LoRA adapter; `model` is the base name, 'base:adapter', or a
        registered private model.
        """
        if agent_id is not None:
            check_agent_id(agent_id)
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        params.validate()
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        registered = self.agents.get(agent_id) if agent_id is not None else None
        if registered is not None and adapter is None and model is None:
            adapter, model = registered.adapter, registered.model
        lora, private = self.weights.resolve(adapter, model)
        namespace = kv_namespace(lora, private)
        prompt_ids = self.tokenize(prompt)
        if any(not 0 <= t < self.model_config.vocab_size for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self.model_config.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if len(prompt_ids) >= self.max_model_len or total > self.max_model_len:
            raise RequestTooLargeError(
                f"this model's context is {self.max_model_len} tokens; the request has {len(prompt_ids)} prompt "
                f"tokens and max_tokens {params.max_tokens}; shorten the prompt or lower max_tokens")
        need, room = self._device_pages(total, lora, private), self.memory.request_room_blocks
        if need > room:
            raise RequestTooLargeError(
                f"the request needs {need} device pages (KV and weights) but "
                f"the whole pool has {room} for requests; raise device_memory or shorten the request")
        seqs, detoks = [], []
        grammar = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        for index in range(params.n):
            seed = params.seed_for(index)
            generator = None if seed is None else torch.Generator(device=self.config.device).manual_seed(seed)
            seq = Sequence(request_id=request_id, index=index, prompt_token_ids=list(prompt_ids), params=params,
                           agent_id=agent_id, namespace=namespace, eos_token_ids=self.eos_token_ids,
                           generator=generator, want_prompt_logits=want_prompt_logits and index == 0,
                           adapter=lora, private_model=private,
                           grammar=grammar.deep_copy() if grammar is not None else None)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, params.stop))
        self.requests[request_id] = _Request(request_id, seqs, detoks)
        for seq in seqs:  # queued only once all are built, so a failure leaves nothing behind
            self.scheduler.add(seq)
        if agent_id is not None:
            self.memory.on_request(agent_id)
        return request_id

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Matchers for structured output over this model's tokenizer, built on first use (about 0.5 s)."""
        return GrammarCompiler(self.tokenizer.fast.to_str(), self.model_config.vocab_size, self.eos_token_ids)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its pages (a client went away). Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        with self.memory.lock:
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
                    self._finished(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def num_waiting(self) -> int:
        """Sequences queued and not yet running (preempted ones included)."""
        return len(self.scheduler.waiting)

    def _fail_broken_weights(self) -> list[SequenceDelta]:
        """Fail the waiting requests whose weights could not be loaded (a source file went missing)."""
        failed, broken_handles = [], set()
        for seq in list(self.scheduler.waiting):
            broken = [h for h in seq.weights if h.load_error is not None]
            if broken:
                broken_handles.update(broken)
                error = f"its weights could not be loaded: {broken[0].load_error}"
                logger.warning("failing %s: %s", seq.request_id, error)
                failed.append(self._fail_waiting(seq, error))
        for handle in broken_handles:
            handle.load_error = None  # its requests have failed; a later request tries again
        return failed

    def _device_pages(self, total_tokens: int, lora, private) -> int:
        """Device pages a request of `total_tokens` needs at once: KV, its weights, a stacked copy."""
        pages = self.pool.blocks_for(total_tokens) + self.memory.weight_blocks_needed([h for h in (lora, private) if h])
        if lora is not None and not self.memory.tiers.in_slots(lora):  # a slot pool's slots are the stacks
            pages += -(-stack_nbytes(lora) // self.pool.block_nbytes)  # its stacked copy in a step
        return pages

    def _fail_unfittable(self) -> list[SequenceDelta]:
        """Nothing runs: fail the waiting requests that no longer fit the device at all (room for
        requests shrank since they were accepted, e.g. an adapter slot pool grew)."""
        room, failed = self.memory.request_room_blocks, []
        for seq in list(self.scheduler.waiting):
            need = self._device_pages(len(seq.prompt_token_ids) + seq.params.max_tokens, seq.adapter,
                                      seq.private_model)
            if need > room:
                failed.append(self._fail_waiting(seq, f"it needs {need} device pages but only {room} are left for requests"))
        return failed

    def _fail_waiting(self, seq: Sequence, error: str) -> SequenceDelta:
        """Fail a waiting sequence; drop its request once none of its sequences is left."""
        delta = self._fail(seq, error)
        if all(s.is_finished for s in self.requests[seq.request_id].seqs):
            del self.requests[seq.request_id]
        return delta

    def _fail(self, seq: Sequence, error: str) -> SequenceDelta:
        """Finish `seq` with reason "error"; the delta that tells its caller why."""
        self.scheduler.finish(seq, "error")
        self._finished(seq)
        return SequenceDelta(seq.request_id, seq.index, "", [], finish_reason="error",
                             num_prompt_tokens=len(seq.prompt_token_ids), error=error)

    def _finished(self, seq: Sequence) -> None:
        self.memory_hooks.finished(seq)
        if seq.agent_id is not None:
            self.memory.on_finish(seq.agent_id)

    def step(self) -> list[SequenceDelta]:
        """Run one batch; return what each touched sequence gained (finished ones included).

        A request whose weights are still loading waits; the others run.
        """
        with self.memory.lock:
            failed = self._fail_broken_weights()
            batch = self.scheduler.schedule()
            self.runner.lora_stacks.keep_only({item.seq.adapter for item in batch if item.seq.adapter is not None})
            if not batch and not self.scheduler.running and self.scheduler.waiting:
                failed += self._fail_unfittable()
                if self.memory.held:
                    self.memory.release_all_held()  # no request can start: free what later ones hold
        if not batch:
            if self.has_unfinished() and not failed:
                started_s = time.perf_counter()
                self.memory.loaded.wait(0.005)
                self.memory.loaded.clear()
                self.idle_s += time.perf_counter() - started_s
            return failed
        started_s = time.perf_counter()
        sampled = self.runner.run(batch)  # a sequence whose step fails comes back with an error
        seconds = time.perf_counter() - started_s
        self.forward_s += seconds
        if self.speculator is not None:
            self.speculator.observe(sum(item.num_new_tokens for item in batch), seconds)
        with self.memory.lock:
            return failed + self._record(batch, sampled)

    def _record(self, batch, sampled: list[SampledToken]) -> list[SequenceDelta]:
        broken = {id(r.seq) for r in sampled if r.error is not None}  # their KV of this step is not cached
        for item in batch:
            seq = item.seq
            if id(seq) in broken:
                continue
            seq.num_computed_tokens += item.num_certain_tokens  # a kept draft token's KV: in _append
            if item.num_certain_tokens > 1:
                self.scheduler.cache_computed(seq)
        drafts = {id(item.seq): len(item.draft) for item in batch if item.draft}
        now = time.perf_counter()
        deltas = []
        for result in sampled:
            seq = result.seq
            request = self.requests[seq.request_id]
            if result.error is not None:  # logged where it happened
                deltas.append(self._fail(seq, result.error))
            else:
                deltas.append(self._append(seq, request, result, now))
                drafted = drafts.get(id(seq))
                if drafted:  # the model's agreement teaches the speculator; the output counts what stayed
                    self.speculator.record(seq, drafted, len(result.token_ids) - 1)
                    self.draft_tokens += drafted
                    self.accepted_draft_tokens += len(deltas[-1].token_ids) - 1
            if all(s.is_finished for s in request.seqs):
                del self.requests[seq.request_id]
        return deltas

    def _append(self, seq: Sequence, request: _Request, result: SampledToken, now: float) -> SequenceDelta:
        detok = request.detokenizers[seq.index]
        seq.first_token_s = seq.first_token_s or now
        reason, appended = None, 0
        for token_id in result.token_ids:
            if appended:  # the token before this one was a kept draft token: the step computed its KV
                seq.num_computed_tokens += 1
            seq.output_token_ids.append(token_id)
            if result.logprobs:
                seq.output_logprobs.append(result.logprobs[appended])
            appended += 1
            detok.push(token_id)
            reason = self._finish_reason(seq, token_id, detok)
            if reason is not None:  # tokens after a stop are dropped
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._finished(seq)
        return SequenceDelta(
            request_id=seq.request_id, index=seq.index, text=detok.take_delta(final=reason is not None),
            token_ids=result.token_ids[:appended], logprobs=result.logprobs[:appended],
            finish_reason=reason, num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens)

    def _finish_reason(self, seq: Sequence, token_id: int, detok: IncrementalDetokenizer) -> str | None:
        params = seq.params
        if token_id in params.stop_token_ids or (token_id in seq.eos_token_ids and not params.ignore_eos):
            return "stop"
        if detok.stopped:
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # --- agents and hints ------------------------------------------------------------------
    def register_agent(self, agent_id: str, adapter: str | None = None, model: str | None = None,
                       prefix: str | None = None) -> Agent:
        """Record which adapter / private model the agent runs with (names already registered)."""
        check_agent_id(agent_id)
        lora, private = self.weights.resolve(adapter, model)
        with self.memory.lock:
            self.memory.tracker.track(agent_id)
            for handle in (lora, private):
                if handle is not None:
                    self.memory.add_owner(handle, agent_id)
        agent = Agent(agent_id, adapter=lora.name if lora else None, model=private.name if private else None,
                      prefix=prefix)
        self.agents[agent_id] = agent
        return agent

    def unregister_agent(self, agent_id: str) -> None:
        if self.agents.pop(agent_id, None) is None:
            raise InvalidRequestError(f"no agent {agent_id!r}")

    def agent_state(self, agent_id: str) -> list[dict]:
        """Where each object the agent uses lives now: key, kind, tier, nbytes, pinned."""
        with self.memory.lock:
            return [{"key": o.key, "kind": o.kind, "tier": o.tier, "nbytes": o.nbytes, "pinned": o.pin_count > 0}
                    for o in self.memory.objects_of(agent_id)]

    def hint(self, step: int | None = None, **hints) -> dict:
        """Feed invocation-distance estimates (see distance/hints.py); return what was accepted."""
        if step is None and hints.get("timestep_cnt") is not None:
            step = hints["timestep_cnt"]
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise InvalidRequestError(f"step must be a non-negative integer, got {step!r}")
        try:  # parsed with no lock held: a hint naming a million agents never stalls a step
            distances = estimate_distances(self.tracker.step if step is None else step, **hints)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise InvalidRequestError(f"bad hint: {exc}") from exc
        if step is not None:
            self.memory.advance(step)
        changed, unknown = self.memory.hint(distances)
        return {"step": self.tracker.step, "agents": len(distances), "changed": changed, "unknown": unknown}

    def set_future(self, calls: dict[str, list[float]]) -> None:
        """For the `oracle` policy: the true steps at which each agent will call."""
        self.memory.set_future(calls)

    def reset_prefix_cache(self) -> int:
        """Forget every cached KV page no running request holds, in every tier; return how many
        radix nodes were dropped (like vLLM's reset_prefix_cache)."""
        with self.memory.lock:
            dropped = 0
            for node in sorted(self.cache.nodes(), key=lambda n: -len(path_of(n))):
                if node.resident is not None and node.resident.droppable():
                    self.memory.forget(node.resident)
                    dropped += 1
            return dropped

    def memory_stats(self) -> dict:
        """Counters per tier and kind: hits, misses, bytes moved, prefetches, stall seconds, ..."""
        out = self.memory.snapshot()
        out["policy"] = self.config.policy
        return out

    def shutdown(self) -> None:
        """Stop the transfer threads; with `persist_on_exit`, write the KV of the device and host
        tiers to disk so that a restart finds it; release the state directory."""
        self.worker.stop()
        if self.memory.store is not None and not self._shut_down:
            for request_id in list(self.requests):
                self.abort(request_id)
            if self.config.persist_on_exit:
                self.memory.persist()
            self.memory.store.close()
        self._shut_down = True

    def stats(self) -> dict:
        """Counters of the KV pool, the prefix cache and the scheduler."""
        s = self.scheduler.stats
        return {
            "kv_pool_nbytes": self.pool.nbytes, "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_free": self.pool.num_free, "kv_blocks_cached": self.cache.num_cached_blocks,
            "prompt_tokens": s.prompt_tokens, "cached_prompt_tokens": s.cached_prompt_tokens,
            "preemptions": s.preemptions, "evicted_blocks": s.evicted_blocks,
            "steps": s.steps, "computed_tokens": s.computed_tokens, "scheduled_seqs": s.scheduled_seqs,
            "shared_prefix_waits": s.shared_prefix_waits,
            "forward_s": round(self.forward_s, 4), "idle_s": round(self.idle_s, 4),
            "draft_tokens": self.draft_tokens, "accepted_draft_tokens": self.accepted_draft_tokens,
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
        }
