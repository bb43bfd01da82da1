"""Prometheus metrics of one process (own registry, so tests can build many apps).

Conventions (https://prometheus.io/docs/practices/naming/): a count that only grows
is a counter and its name ends in ``_total``, whoever keeps the count; a level is a
gauge. Counts kept elsewhere (the learner's, published through the store) are read
when scraped (``ReadAtScrape``) and exported as counters all the same. Each registry
also carries the standard ``process_*`` and ``python_*`` collectors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# a reading: one value, or one value per label value
Reading = Callable[[], float | dict[str, float]]


class ReadAtScrape(Collector):
    """Metrics whose values are read from callables when Prometheus scrapes: counts
    and levels this process holds in its own objects, or reads from the store."""

    def __init__(self) -> None:
        self._metrics: list[tuple[type, str, str, str | None, Reading]] = []

    def counter(self, name: str, doc: str, read: Reading, label: str | None = None) -> None:
        """``name`` without ``_total``: the exposition adds it."""
        self._metrics.append((CounterMetricFamily, name, doc, label, read))

    def gauge(self, name: str, doc: str, read: Reading, label: str | None = None) -> None:
        self._metrics.append((GaugeMetricFamily, name, doc, label, read))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values are read at scrape time only

    def collect(self) -> Iterator[Metric]:
        for family_type, name, doc, label, read in self._metrics:
            family = family_type(name, doc, labels=[label] if label else None)
            value = read()
            if isinstance(value, dict):
                for key, v in value.items():
                    if math.isfinite(v):
                        family.add_metric([key], v)
            elif math.isfinite(value):
                family.add_metric([], value)
            yield family


def new_registry() -> CollectorRegistry:
    """A registry with the standard process, platform and garbage-collector metrics
    (``process_*``, ``python_*``), as the default registry would have them."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def counter_value(counter: Counter) -> float:
    """The value of an unlabelled counter, through the public collection API."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return sample.value
    return 0.0


class Metrics:
    """The API process's metrics. The engine keeps ``learner_stats`` (the learner's
    published counters) and ``ensemble_report`` (``GET /v1/model``'s arms) current,
    and sets ``held_impressions``; they are read when scraped."""

    def __init__(self) -> None:
        self.registry = new_registry()
        r = self.registry
        self.learner_stats: dict[str, float] = {}
        self.ensemble_report: dict[str, Any] = {}
        self.held_impressions: Callable[[], int] = lambda: 0
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
        # a counter only grows: positive rewards and penalties (dislike, skip) apart
        self.rewards = Counter("recsvc_feedback_reward_total", "sum of the positive "
                               "rewards of accepted feedback: rate(this) / rate(recsvc_"
                               "recommended_items_total) is the reward per shown item",
                               registry=r)
        self.penalties = Counter("recsvc_feedback_penalty_total", "sum of the magnitudes "
                                 "of the negative rewards of accepted feedback (dislike, "
                                 "skip)", registry=r)
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
        self.model_version = Gauge("recsvc_model_version", "weights version being served",
                                   registry=r)
        self.catalog_size = Gauge("recsvc_catalog_items", "items in this process's index",
                                  registry=r)
        self.stream_backlog = Gauge("recsvc_stream_backlog", "entries of the event stream no "
                                    "learner has committed yet", registry=r)
        self.store_up = Gauge("recsvc_store_up", "1 while the store accepts writes (as last "
                              "checked by /readyz), 0 while it is unavailable", registry=r)
        self.store_up.set(1)
        read = ReadAtScrape()
        r.register(read)
        read.gauge("recsvc_explored_fraction", "fraction of served items that were explored",
                   lambda: _ratio(self.items_explored, self.items_served))
        read.gauge("recsvc_encoder_cache_hit_ratio", "context embedding cache hit ratio",
                   lambda: _ratio(self.cache_hits, self.cache_hits, self.cache_misses))
        read.gauge("recsvc_held_impressions", "slates served while the store refused "
                   "writes, held in memory until they are logged",
                   lambda: float(self.held_impressions()))
        self._learning(read)

    def _learning(self, read: ReadAtScrape) -> None:
        """What shows the service learning: the learner's progress and loss, how old the
        newest weights are, and each ensemble arm's value and share of requests."""
        def stat(name: str, default: float) -> float:
            return float(self.learner_stats.get(name, default))  # the engine replaces it

        read.counter("recsvc_learner_updates", "gradient steps of the learner",
                     lambda: stat("updates", 0.0))
        read.counter("recsvc_learner_feedback_learned", "feedback events the learner "
                     "has learned from", lambda: stat("feedback_learned", 0.0))
        read.gauge("recsvc_learner_loss", "the learner's latest training loss (Huber)",
                   lambda: stat("loss", math.nan))
        read.gauge("recsvc_model_age_seconds", "seconds since the learner last published "
                   "weights", lambda: (time.time() - stat("published_at", math.nan)))

        def arms(key: str) -> dict[str, float]:
            agents = self.ensemble_report.get("agents") or {}
            return {name: float(v[key]) for name, v in agents.items()}

        read.gauge("recsvc_ensemble_arm_share", "share of exploring requests each "
                   "ensemble arm serves", lambda: arms("weight"), label="arm")
        read.gauge("recsvc_ensemble_arm_value", "estimated reward per shown item of "
                   "the slates each ensemble arm served", lambda: arms("value"), label="arm")


def _ratio(num: Counter, *den: Counter) -> float:
    total = sum(counter_value(c) for c in den)
    return counter_value(num) / total if total else 0.0
