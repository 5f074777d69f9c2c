"""Build and run the serving app: ``Ingress`` (FastAPI) -> ``Recognizer`` (model, batched) + ``StreamDirectory``.

    python -m pipelines.serve                                  # the demo model on http://127.0.0.1:8000
    python pipelines/serve/app.py model_uri=models:/adastream-adafocus_v2/3 budget=0.05
    python -m pipelines.serve --config serve.yaml --address auto   # on a running Ray cluster

From Python (tests, notebooks)::

    from pipelines.serve import ServeConfig, start
    start(ServeConfig(port=8123, model_uri="models:/my-model@candidate"))   # returns once it is up

The Recognizer scales on its own (``recognizer_replicas``, autoscaling up to
``recognizer_max_replicas``, GPUs with ``recognizer_gpus``). The Ingress holds the WebSockets and the
streams' windows and state; it runs as one replica by default -- WebSocket and SSE clients of a stream
must reach the replica that serves it, which Serve's proxy cannot guarantee across several.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.serve.config import ConfigError, ServeConfig, load_serve_config

logger = logging.getLogger(__name__)


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
"""Ray Serve's high-throughput mode (``ServeConfig.high_throughput``): read by Ray's processes at start."""


def build_app(config: ServeConfig) -> Any:
    """The Serve application (``Application``) for a resolved config."""
    from pipelines.serve.directory import StreamDirectory
    from pipelines.serve.ingress import Ingress
    from pipelines.serve.recognizer import Recognizer

    recognizer_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.recognizer_cpus, "num_gpus": config.recognizer_gpus},
        # A batch holds at most max_batch_size frames; let as many more queue for the next one.
        "max_ongoing_requests": 2 * config.max_batch_size,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if config.recognizer_max_replicas > config.recognizer_replicas:
        recognizer_options["autoscaling_config"] = {
            "min_replicas": config.recognizer_replicas, "max_replicas": config.recognizer_max_replicas,
            "target_ongoing_requests": max(1, config.max_batch_size // 2),
        }
    else:
        recognizer_options["num_replicas"] = config.recognizer_replicas
    recognizer = None if config.colocate_model else Recognizer.options(**recognizer_options).bind(config)
    directory = StreamDirectory.options().bind(stale_after_s=3 * config.sync_interval_s + 2.0,
                                               forget_after_s=max(300.0, config.idle_timeout_s))
    ingress = Ingress.options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_cpus},
        # Every WebSocket and SSE client is an ongoing request for as long as it stays connected.
        max_ongoing_requests=4 * config.max_streams + 100,
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=5.0,
    ).bind(config, recognizer, directory)
    return ingress


def start(config: ServeConfig, *, address: str | None = None, blocking: bool = False) -> ServeConfig:
    """Start Ray (or connect to ``address``), Serve's HTTP proxy on ``config.host:port``, and the app.

    Returns the resolved config (token from the environment, absolute tracking URI). Raises
    :class:`ConfigError` for a config that must not run (e.g. beyond loopback without a token).
    """
    import ray

    config = config.resolved()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if config.wants_high_throughput and not address:
            # Before ray.init (and before ray.serve reads its constants): the controller, HAProxy and
            # the replicas inherit this environment.
            for key, value in HIGH_THROUGHPUT_ENV.items():
                os.environ.setdefault(key, value)
        # No address: a Ray of our own ("local"), never whatever cluster happens to run on this machine.
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=True)
    from ray import serve
    # Per-request access logs cost more than a frame's processing; ADASTREAM_SERVE_LOG_LEVEL=INFO for debugging.
    logging_config = {"enable_access_log": False, "log_level": os.environ.get("ADASTREAM_SERVE_LOG_LEVEL", "WARNING")}
    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logging_config)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False,
              logging_config=logging_config)
    logger.info("AdaStream serving %s at %s", config.model_uri, config.url)
    print(f"AdaStream serving {config.model_uri} at {config.url}  (API docs: {config.url}/docs)", flush=True)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(config.app_name)
    return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve live video recognition (AdaFocusV2 + early exit) "
                                                 "with Ray Serve.",
                                     epilog="Any ServeConfig field can be set as key=value, e.g. port=8080 "
                                            "budget=full max_streams=128 (see pipelines/serve/config.py).")
    parser.add_argument("--config", help="YAML file of ServeConfig fields")
    parser.add_argument("--address", help="Ray cluster address, e.g. auto (default: $RAY_ADDRESS, else a new "
                                          "local Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value ServeConfig overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_serve_config(args.config, args.overrides)
        resolved = config.resolved()
    except (ConfigError, OSError) as error:
        print(f"serve: bad configuration: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        shown = resolved.to_dict()
        if shown.get("auth_token"):
            shown["auth_token"] = "***"
        print(yaml.safe_dump(shown, sort_keys=False))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        start(config, address=args.address or os.environ.get("RAY_ADDRESS"), blocking=True)
    except ConfigError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
