"""`scalesim serve MODEL`: build the engine from flags, preload weights, run uvicorn."""

import argparse
import logging

from scalesim.cluster.placement import ROUTING_NAMES
from scalesim.models.registry import DEFAULT_EMBEDDER
from scalesim.server.config import (DEFAULT_KEEP_ALIVE_TIMEOUT_S, DEFAULT_MAX_BODY_NBYTES, DEFAULT_MAX_CONNECTIONS,
                                    DEFAULT_MAX_SEQUENCES_PER_REQUEST, DEFAULT_MAX_TOKENS, DEFAULT_PORT,
                                    DEFAULT_REQUEST_READ_TIMEOUT_S, DEFAULT_SEND_TIMEOUT_S, ServerConfig,
                                    default_allowed_hosts)

DEFAULT_MAX_WAITING = 16_384

logger = logging.getLogger(__name__)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health and /metrics")
    group.add_argument("--metrics-require-key", action="store_true", help="/metrics needs the API key too")
    group.add_argument("--allowed-hosts", nargs="*", default=None, metavar="HOST",
                       help="Host header values to accept, '*' for any (default: local names when bound to "
                            "loopback, any host otherwise)")
    group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the model names clients send (default: MODEL); the first is the main one")
    group.add_argument("--model-aliases", nargs="*", default=[], metavar="ALIAS=NAME",
                       help="names clients send for a served one, e.g. gpt-4=smollm2-135m "
                            "text-embedding-3-small=all-minilm-l6-v2")
    group.add_argument("--accept-any-model", action="store_true",
                       help="answer any model name with the base model (default: an unknown name is a 404)")
    group.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                       help="PEFT LoRA adapters to load at start; clients select one with model 'SERVED:NAME'")
    group.add_argument("--private-models", nargs="*", default=[], metavar="NAME=PATH",
                       help="full weight sets of MODEL's architecture to load at start; model 'NAME' selects one")
    group.add_argument("--allowed-local-paths", nargs="*", default=[], metavar="DIR",
                       help="folders under which POST /v1/agents may name adapter and model paths (default: none)")
    group.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"completion cap when a request sets no max_tokens (default: {DEFAULT_MAX_TOKENS})")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_NBYTES,
                       help=f"largest accepted request body (default: {DEFAULT_MAX_BODY_NBYTES})")
    group.add_argument("--max-sequences-per-request", type=int, default=DEFAULT_MAX_SEQUENCES_PER_REQUEST,
                       help=f"prompts x n of one request, at most; more is a 400 "
                            f"(default: {DEFAULT_MAX_SEQUENCES_PER_REQUEST})")
    group.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                       help=f"sequences waiting in the engine, at most; a request past it gets a 429 with "
                            f"Retry-After (default: {DEFAULT_MAX_WAITING})")
    group.add_argument("--request-read-timeout", type=float, default=DEFAULT_REQUEST_READ_TIMEOUT_S, metavar="S",
                       help=f"a request's headers and body must arrive within S seconds, else a 408 "
                            f"(default: {DEFAULT_REQUEST_READ_TIMEOUT_S:g})")
    group.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT_S, metavar="S",
                       help=f"close a client that takes none of its answer for S seconds (default: "
                            f"{DEFAULT_SEND_TIMEOUT_S:g})")
    group.add_argument("--timeout-keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT_S, metavar="S",
                       help=f"close a connection idle for S seconds (default: {DEFAULT_KEEP_ALIVE_TIMEOUT_S:g})")
    group.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       help=f"beyond this many connections or requests in flight, answer 503 "
                            f"(default: {DEFAULT_MAX_CONNECTIONS})")
    group.add_argument("--embedding-model", default=DEFAULT_EMBEDDER, metavar="NAME|PATH|none",
                       help=f"what /v1/embeddings runs: {DEFAULT_EMBEDDER} (built in), a sentence-transformers "
                            f"folder, or none (default: {DEFAULT_EMBEDDER})")
    group.add_argument("--no-infer-agents", action="store_true",
                       help="do not infer an agent id from a prompt's private part when a request names none")
    cluster = parser.add_argument_group("scale-out on Ray Serve (pip install scalesim[ray])")
    cluster.add_argument("--replicas", type=int, default=1,
                         help="engine replicas, each a whole engine with its own tiers; over 1, an ingress "
                              "routes each agent to its replica (default: 1, no Ray)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one")
    cluster.add_argument("--routing", default="affine", choices=ROUTING_NAMES,
                         help="affine: an agent's calls go to the replica that owns its slot; random; "
                              "power-of-two: the shorter queue of two random replicas, as Serve's default router "
                              "(default: affine)")
    cluster.add_argument("--spill-factor", type=float, default=1.25, metavar="C",
                         help="a cold agent spills past its owner when the owner's queue is over C x the mean "
                              "(default: 1.25)")
    cluster.add_argument("--replica-cpus", type=float, default=None, metavar="N",
                         help="CPUs Ray reserves for each engine replica (default: the machine's CPUs / replicas)")
    cluster.add_argument("--deployment-options", default=None, metavar="JSON",
                         help="more Ray Serve options for the engine deployment, e.g. "
                              "'{\"autoscaling_config\": {\"min_replicas\": 2, \"max_replicas\": 4}}'")


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} takes NAME=VALUE pairs, got {value!r}")
        pairs.append((name, path))
    return pairs


def load_embedder(choice: str):
    """The embedder `--embedding-model` names, or None for 'none'. The built-in one, when its
    package is missing, is skipped with a warning; a model the user named must load."""
    from scalesim.embeddings.sentence_embedder import SentenceEmbedder
    from scalesim.errors import ModelLoadError
    from scalesim.models.registry import resolve_embedder

    if choice == "none":
        return None
    try:
        folder = resolve_embedder(choice)
    except ModelLoadError as exc:
        if choice != DEFAULT_EMBEDDER:
            raise
        logger.warning("no /v1/embeddings: %s", exc)
        return None
    return SentenceEmbedder(folder, name=choice if choice == DEFAULT_EMBEDDER else folder.name)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The HTTP server's settings from `scalesim serve`'s flags."""
    return ServerConfig(
        served_model_name=(args.served_model_name or [args.model])[0],
        extra_model_names=(args.served_model_name or [])[1:],
        model_aliases=dict(_pairs(args.model_aliases, "--model-aliases")), accept_any_model=args.accept_any_model,
        api_key=args.api_key,
        allowed_hosts=args.allowed_hosts if args.allowed_hosts is not None else default_allowed_hosts(args.host),
        metrics_require_key=args.metrics_require_key, infer_agents=not args.no_infer_agents,
        default_max_tokens=args.default_max_tokens, max_body_nbytes=args.max_body_bytes,
        max_sequences_per_request=args.max_sequences_per_request, request_read_timeout_s=args.request_read_timeout,
        send_timeout_s=args.send_timeout, keep_alive_timeout_s=args.timeout_keep_alive,
        max_connections=args.max_connections,
        allowed_local_paths=args.allowed_local_paths, state_dir=args.disk_dir)


def build_server(args: argparse.Namespace, engine_args: dict):
    """The engine with its adapters and private models loaded, and the app over it."""
    from scalesim.async_llm import AsyncLLM
    from scalesim.server.app import build_app

    config = server_config(args)
    adapters, models = _pairs(args.lora_modules, "--lora-modules"), _pairs(args.private_models, "--private-models")
    embedder = load_embedder(args.embedding_model)
    llm = AsyncLLM(args.model, max_waiting=args.max_waiting, **engine_args)
    try:
        for name, path in adapters:
            llm.add_adapter(name, path)
        for name, path in models:
            llm.add_private_model(name, path)
        return build_app(llm, config, shutdown_llm=True, embedder=embedder)  # checks that every alias names a served model
    except Exception:
        llm.shutdown()
        raise


def serve(args: argparse.Namespace, engine_args: dict) -> None:
    """One engine under uvicorn; with --replicas over 1 or --ray-address, an ingress in front of
    engine replicas on Ray Serve (scalesim.cluster)."""
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas > 1 or args.ray_address:
        from scalesim.cluster.launch import serve_on_ray
        return serve_on_ray(args, engine_args)
    import uvicorn

    from scalesim.server.connections import uvicorn_config

    app = build_server(args, engine_args)
    config = app.state.scalesim.config
    logger.info("serving %s as %r on http://%s:%d", args.model, config.served_model_name, args.host, args.port)
    uvicorn.Server(uvicorn_config(app, config, args.host, args.port, "info" if args.verbose else "warning")).run()
