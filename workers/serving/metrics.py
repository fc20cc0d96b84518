"""The server's Prometheus metrics, in a registry of its own (one per app, so that
two apps in one process never share counters).

With ``--workers N`` each process counts its own requests; Prometheus scrapes
whichever process answers ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

# The routes the app serves; any other path is counted as "other", so that a scan of
# random paths cannot grow the label set without bound.
ROUTES = frozenset({"/v1/read", "/v1/models", "/healthz", "/readyz", "/metrics", "/docs",
                    "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def route_label(path: str) -> str:
    """The route label of a request path: the path itself if the app serves it."""
    return path if path in ROUTES else "other"


class Metrics:
    """Requests by route and status, request latency, model batch sizes, images read,
    model swaps and the version being served."""

    def __init__(self) -> None:
        # The *_created series double every counter's lines for nothing a scrape uses.
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self.requests = Counter("captrain_serve_requests", "HTTP requests answered, by "
                                "route and status code.", ["route", "status"], registry=r)
        self.latency = Histogram("captrain_serve_request_seconds", "Seconds from a "
                                 "request's arrival to its answer, by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("captrain_serve_batch_images", "Images read in one model "
                               "call (micro-batch size).", buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("captrain_serve_images", "Images received by /v1/read, by "
                              "outcome: read, or error (not an image, too large, ...).",
                              ["outcome"], registry=r)
        self.swaps = Counter("captrain_serve_model_swaps", "Model versions swapped in after "
                             "the first one.", registry=r)
        self.model = Info("captrain_serve_model", "The model version answering now.",
                          registry=r)

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
