"""Prometheus metrics of one service instance (own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "recsvc_http_request_duration_seconds", "HTTP request latency by route",
            ["method", "route", "status"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.recommendations = Counter("recsvc_recommendations_total",
                                       "slates served", registry=r)
        self.items_served = Counter("recsvc_recommended_items_total",
                                    "items placed in slates", registry=r)
        self.items_explored = Counter("recsvc_explored_items_total",
                                      "items placed by the exploration branch", registry=r)
        self.feedback = Counter("recsvc_feedback_total", "accepted feedback by event",
                                ["event"], registry=r)
        self.events = Counter("recsvc_events_total", "accepted interactions by event",
                              ["event"], registry=r)
        self.cache_hits = Counter("recsvc_encoder_cache_hits_total",
                                  "context embeddings served from a cache", registry=r)
        self.cache_misses = Counter("recsvc_encoder_cache_misses_total",
                                    "context embeddings computed by the transformer", registry=r)
        self.impressions_dropped = Counter(
            "recsvc_impressions_dropped_total",
            "impressions lost because the store was down and the in-memory hold was full",
            registry=r)
        self.rate_limited = Counter("recsvc_rate_limited_total", "requests answered 429",
                                    registry=r)
        self.learner_updates = Gauge("recsvc_learner_updates", "gradient steps of the learner",
                                     registry=r)
        self.model_version = Gauge("recsvc_model_version", "weights version being served",
                                   registry=r)
        self.catalog_size = Gauge("recsvc_catalog_items", "items in this process's index",
                                  registry=r)
        self.stream_backlog = Gauge("recsvc_stream_backlog", "entries of the event stream no "
                                    "learner has committed yet", registry=r)
        self.store_up = Gauge("recsvc_store_up", "1 while the store accepts writes (as last "
                              "checked by /readyz), 0 while it is unavailable", registry=r)
        self.store_up.set(1)
        Gauge("recsvc_explored_fraction", "fraction of served items that were explored",
              registry=r).set_function(
            lambda: _ratio(self.items_explored, self.items_served))
        Gauge("recsvc_encoder_cache_hit_ratio", "context embedding cache hit ratio",
              registry=r).set_function(
            lambda: _ratio(self.cache_hits, self.cache_hits, self.cache_misses))


def _ratio(num: Counter, *den: Counter) -> float:
    total = sum(c._value.get() for c in den)
    return num._value.get() / total if total else 0.0
