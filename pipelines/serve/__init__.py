"""Live-stream serving: a Ray Serve app running the recurrent AdaFocus policy with online early exit.

Modules, from the wire inwards:

* ``app``        -- build / start the Serve application, ``python -m pipelines.serve``
* ``ingress``    -- FastAPI ingress: WebSocket push, pull streams, SSE, budgets, auth, limits
* ``stream``     -- one stream: windows, recurrent state, exit rule, events, counters
* ``sources``    -- PyAV decoding of pulled URLs and pushed MPEG-TS chunks in reader threads
* ``frames``     -- sniffing pushed messages, image decoding, the model's input transform
* ``windows``    -- recognition windows and frame sampling in stream time
* ``budgets``    -- budget -> early-exit thresholds from the registered curve
* ``engine``     -- ``model.step`` over a batch of streams, and the batcher (no Ray; also used by predict.py)
* ``recognizer`` -- the model deployment (batched steps)
* ``directory``  -- stream records for failover across ingress replicas
* ``events``, ``metrics``, ``config``

See docs/serving.md for the API and the event schema.
"""

from pipelines.serve.config import ConfigError, ServeConfig, load_serve_config

__all__ = ["ConfigError", "ServeConfig", "load_serve_config", "start", "build_app"]


def start(*args, **kwargs):  # noqa: ANN002, ANN003 - forwarded
    """See :func:`pipelines.serve.app.start` (imported lazily: Ray is not needed to read configs)."""
    from pipelines.serve.app import start as _start

    return _start(*args, **kwargs)


def build_app(*args, **kwargs):  # noqa: ANN002, ANN003
    from pipelines.serve.app import build_app as _build

    return _build(*args, **kwargs)
