"""``sdrt serve``: the web UI's HTTP API (``sdrt.serving.app``) as a Ray Serve application.

Each replica loads the model once and runs its own ``sdrt.Batcher`` (dynamic batching inside
the replica); Ray Serve spreads HTTP requests over replicas, one per GPU (``--device cuda``)
or per CPU worker, fixed (``--replicas``) or autoscaled (``--min-replicas/--max-replicas``).
``--no-ray`` runs the same app under uvicorn in this process (one replica, no Ray).
"""
from __future__ import annotations

import signal
import threading
from dataclasses import asdict, dataclass

from ..options import option
from .config import ServerConfig


@dataclass
class Scaling:
    """Replica count and Ray Serve settings."""

    replicas: int = option(1, "fixed replica count (one per GPU or CPU worker)")
    min_replicas: int | None = option(None, "autoscale between --min-replicas and --max-replicas")
    max_replicas: int | None = option(None, "the autoscaler's largest replica count")
    target_ongoing_requests: float = option(16.0, "the autoscaler's target of requests per replica")
    cpus_per_replica: float = option(1.0, "CPUs Ray reserves per replica")
    gpus_per_replica: float = option(0.0, "GPUs Ray reserves per replica (0: one with --device cuda)")

    def check(self) -> None:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"--min-replicas must be in 0..--max-replicas, got {self.min_replicas} "
                             f"and {self.max_replicas}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")


def deployment_options(config: ServerConfig, scaling: Scaling) -> dict:
    """The ``serve.deployment`` options for a config (data, so tests can check them)."""
    scaling.check()
    gpus = scaling.gpus_per_replica or (1.0 if str(config.device).startswith("cuda") else 0.0)
    opts = dict(
        name="sdrt",
        ray_actor_options={"num_cpus": scaling.cpus_per_replica, "num_gpus": gpus},
        # a replica must see enough concurrent requests to batch them: the engine queues them
        max_ongoing_requests=config.max_queue + config.max_batch_size,
        health_check_period_s=10,
    )
    if scaling.min_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                                      "target_ongoing_requests": scaling.target_ongoing_requests}
    else:
        opts["num_replicas"] = scaling.replicas
    return opts


def build_application(config: ServerConfig, scaling: Scaling):
    """The Ray Serve application (``serve.run`` it)."""
    from ray import serve

    settings = asdict(config)

    def build_asgi_app():                  # evaluated on each replica: loads the model there
        from sdrt.serving.app import ServerConfig, create_app
        return create_app(ServerConfig(**settings))

    deployment = serve.deployment(**deployment_options(config, scaling))(serve.ingress(build_asgi_app)())
    return deployment.bind()


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 7861, scaling: Scaling | None = None,
        use_ray: bool = True, ray_address: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    scaling = scaling or Scaling()
    scaling.check()
    if not use_ray:
        import uvicorn

        from .app import create_app
        # a shutdown waits at most this long for requests in flight (a slow body is cut at
        # body_timeout by the guard anyway)
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=int(max(1, config.body_timeout)))
        return
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError('Ray Serve is not installed: pip install "ray[serve]" (or pip install -e ".[serve]"), '
                           "or run with --no-ray") from None
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(config, scaling), name="sdrt", route_prefix="/")
        print(f"sdrt serve: {config.model} on http://{host}:{port} (Ray Serve, "
              f"{scaling.replicas if scaling.min_replicas is None else f'{scaling.min_replicas}..{scaling.max_replicas}'}"
              f" replica(s)); Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
