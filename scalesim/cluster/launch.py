"""`scalesim serve MODEL --replicas N`: the OpenAI server as a Ray Serve app, an ingress in front
of N engine replicas, each agent routed to the replica that owns its slot."""

import argparse
import json
import logging
import os
import socket
import time

from scalesim.cluster.engine_status import ENGINE_DEPLOYMENT
from scalesim.config import auto_device
from scalesim.cluster.slot_table import SLOT_TABLE_ACTOR, SlotTableActor
from scalesim.server.serve import server_config

APP_NAME = "scalesim"
ENGINE_MAX_ONGOING_REQUESTS = 4096  # the engine queues and answers 429 itself (--max-waiting)
INGRESS_MAX_ONGOING_REQUESTS = 8192
ADDRESS_TIMEOUT_S = 5.0
MIN_REPLICA_CPUS = 0.1
CONSTRUCTOR_RETRIES = 2  # a replica that cannot load the model fails start-up after this many tries
GRACEFUL_SHUTDOWN_S = 60  # a replica that stops (a scale-down) persists its tiers within this; Serve kills it after

logger = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas over 1 and --ray-address need Ray Serve: pip install 'scalesim[ray]'") from None
    return ray, serve


def _check_reachable(address: str) -> None:
    """A clear error within seconds for a Ray address nothing listens on (Ray itself retries for
    minutes). 'auto' and 'local' are left to Ray."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address takes HOST:PORT, ray://HOST:PORT, auto or local; got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise ValueError(f"cannot start or reach Ray at {address}: {exc.strerror or exc}") from None


def replica_gpus(device: str, quantization: str, cluster_gpus) -> int:
    """GPUs one engine replica reserves: one where it will run on CUDA (`auto` as EngineConfig
    resolves it, with `cluster_gpus()` saying whether the cluster has any)."""
    if device == "auto":
        device = auto_device(quantization, bool(cluster_gpus()))
    return int(device == "cuda")


def build_serve_app(args: argparse.Namespace, engine_args: dict):
    """The Serve application: Ingress(engine deployment) with the router `--routing` names."""
    import ray
    from ray import serve
    from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

    from scalesim.cluster.engine_replica import EngineReplica
    from scalesim.cluster.ingress import Ingress

    try:
        given = json.loads(args.deployment_options) if args.deployment_options else {}
    except ValueError as exc:
        raise ValueError(f"--deployment-options is not JSON: {exc}") from None
    if not isinstance(given, dict) or not isinstance(given.get("ray_actor_options", {}), dict):
        raise ValueError("--deployment-options must be a JSON object (ray_actor_options an object too)")
    reserved = {"name", "request_router_config"} & set(given)
    if reserved:
        raise ValueError(f"--deployment-options cannot set {', '.join(sorted(reserved))}: scalesim sets it")
    replica_cpus = args.replica_cpus if args.replica_cpus is not None else \
        max((os.cpu_count() or 1) / args.replicas, MIN_REPLICA_CPUS)
    gpus = replica_gpus(args.device, args.quantization, lambda: ray.cluster_resources().get("GPU", 0))
    options = {"max_ongoing_requests": ENGINE_MAX_ONGOING_REQUESTS, "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
               "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
               **({} if "autoscaling_config" in given else {"num_replicas": args.replicas}), **given,
               "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": gpus, **given.get("ray_actor_options", {})},
               "request_router_config": RequestRouterConfig(
                   request_router_class="scalesim.cluster.router.AgentAffineRouter",
                   request_router_kwargs={"routing": args.routing, "spill_factor": args.spill_factor})}
    engine = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT, **options)
    slot_table = DeploymentActorConfig(name=SLOT_TABLE_ACTOR, actor_class=ray.remote(SlotTableActor),
                                       actor_options={"num_cpus": 0})
    ingress = serve.deployment(Ingress, name="ingress", max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                               ray_actor_options={"num_cpus": 0}, deployment_actors=[slot_table])
    return ingress.bind(engine.bind(args, engine_args), server_config(args))


def start(args: argparse.Namespace, engine_args: dict, dashboard: bool = False) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on --host/--port, deploy the app and
    wait until every replica is up; a replica that cannot start fails this with its error.
    `dashboard`: start Ray's dashboard with a new cluster (what `serve status` talks to)."""
    ray, serve = _import_ray()
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.ray_address:
        _check_reachable(args.ray_address)
    try:
        ray.init(address=args.ray_address, num_cpus=None if args.ray_address else os.cpu_count(),
                 include_dashboard=dashboard, log_to_driver=args.verbose, configure_logging=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: Ray's own wording says why
        raise ValueError(f"cannot start or reach Ray at {args.ray_address or 'a new local cluster'}: {exc}") from None
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_serve_app(args, engine_args)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as exc:
        reason = _replica_error(serve) or str(exc)
        stop(args)
        raise ValueError(f"the engine replicas did not start: {reason}") from None


def stop(args: argparse.Namespace) -> None:
    """Remove this app; on a cluster this process started, stop Serve and Ray too (a joined
    cluster's other apps keep running)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if args.ray_address:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
        ray.shutdown()


def _replica_error(serve) -> str | None:
    """The last line of the error a failing replica raised, from `serve status`."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:
        return None
    for name, status in deployments.items():
        lines = [line.strip() for line in (status.message or "").splitlines() if line.strip()]
        if lines and status.status != "HEALTHY":
            return f"{name}: {lines[-1]}"
    return None


def serve_on_ray(args: argparse.Namespace, engine_args: dict) -> None:
    """Start the app and serve until interrupted (Ctrl-C), then take it down."""
    _import_ray()  # without Ray: the one-line error, before anything needs taking down
    try:
        start(args, engine_args, dashboard=True)
        logger.warning("serving %s on Ray Serve (%d engine replicas, %s routing) on http://%s:%d; "
                       "`RAY_AUTH_MODE=token serve status` shows the app", args.model, args.replicas, args.routing,
                       args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(args)
