"""`scalesim serve MODEL`: build the engine from flags, preload weights, run uvicorn."""

import argparse
import logging

from scalesim.server.config import DEFAULT_MAX_BODY_NBYTES, DEFAULT_MAX_TOKENS, DEFAULT_PORT, ServerConfig

logger = logging.getLogger(__name__)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    group.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
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
    group.add_argument("--no-infer-agents", action="store_true",
                       help="do not derive an agent id from the system message when a request names none")


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} takes NAME=PATH, got {value!r}")
        pairs.append((name, path))
    return pairs


def serve(args: argparse.Namespace, engine_args: dict) -> None:
    import uvicorn

    from scalesim.async_llm import AsyncLLM
    from scalesim.server.app import build_app

    config = ServerConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                          infer_agents=not args.no_infer_agents, default_max_tokens=args.default_max_tokens,
                          max_body_nbytes=args.max_body_bytes, allowed_local_paths=args.allowed_local_paths,
                          state_dir=args.disk_dir)
    adapters, models = _pairs(args.lora_modules, "--lora-modules"), _pairs(args.private_models, "--private-models")
    llm = AsyncLLM(args.model, **engine_args)
    try:
        for name, path in adapters:
            llm.add_adapter(name, path)
        for name, path in models:
            llm.add_private_model(name, path)
    except Exception:
        llm.shutdown()
        raise
    app = build_app(llm, config, shutdown_llm=True)
    logger.info("serving %s as %r on http://%s:%d", args.model, config.served_model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
