"""Every setting of the service, read from ``RECSVC_*`` environment variables.

Each has a safe default, so ``recsvc serve`` with no environment runs the
embedded single-process service. The README lists them all; keep it in sync.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.exploration import EpsilonSchedule
from models.learner import DQNConfig
from models.rewards import HEADS, RewardMap

_LEARNER = DQNConfig()  # the learner's defaults, which the learning settings take
_EXPLORATION = EpsilonSchedule()  # and the exploration schedule's


def _keys(inline: SecretStr, path: str | None) -> list[str]:
    """Keys from a comma-separated setting plus a file (one per line, ``#`` comments),
    so keys can come from a mounted secret instead of the environment."""
    keys = [k.strip() for k in inline.get_secret_value().split(",")]
    if path:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return list(dict.fromkeys(k for k in keys if k))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSVC_", extra="ignore")

    # store and security
    redis_url: str | None = Field(None, description="Redis URL; unset = embedded in-process store")
    redis_cluster: bool = Field(False, description="the Redis URL names a node of a Redis "
                                "Cluster")
    role: Literal["all", "api"] = Field("all", description="all: `recsvc serve` runs the "
                                        "learner in-process; api: a pure API replica (run "
                                        "`recsvc learner` beside it)")
    workers: int = Field(1, ge=1, description="processes `recsvc serve` runs on one port "
                         "(needs Redis: the embedded store's state is in one process)")
    key_prefix: str = Field("recsvc", description="prefix of every Redis key")
    redis_max_connections: int = Field(64, description="Redis connections per process")
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated API keys")
    api_keys_file: str | None = Field(None, description="file of API keys, one per line")
    admin_keys: SecretStr = Field(SecretStr(""),
                                  description="comma-separated admin keys (catalog, users, model)")
    admin_keys_file: str | None = Field(None, description="file of admin keys, one per line")
    allow_open: bool = Field(False, description="serve with no API key on an address other "
                             "hosts reach (refused unless this is set)")
    trusted_proxies: str = Field("", description="comma-separated addresses or networks of "
                                 "proxies whose X-Forwarded-For names the client (the rate "
                                 "limit without keys is per client)")
    rate_limit: int = Field(0, description="requests per key per window; 0 = unlimited")
    rate_limit_window_s: int = Field(1, description="length of a rate-limit window")
    max_body_bytes: int = Field(8 * 1024 * 1024, description="catalog writes (POST /v1/items) "
                                "with larger bodies get 413")
    max_request_bytes: int = Field(1024 * 1024, ge=1024, description="every other request "
                                   "with a larger body gets 413")
    max_header_bytes: int = Field(65_536, ge=1024, description="a request whose headers "
                                  "are larger gets 431 and its connection is closed")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that does not "
                                    "complete a request's headers this long gets 408")
    body_timeout_s: float = Field(30.0, gt=0, description="a request whose body does not "
                                  "arrive in full this long after its headers gets 408")
    max_concurrency: int = Field(1024, ge=1, description="connections and requests in "
                                 "flight per process; beyond it, 503")
    shutdown_grace_s: float = Field(30.0, description="SIGTERM: longest wait for in-flight work")
    log_level: str = Field("INFO", description="DEBUG | INFO | WARNING | ERROR")
    log_format: Literal["text", "json"] = Field("text", description="text for a terminal, "
                                                "json (one object per line) for a log "
                                                "pipeline")
    access_log: bool = Field(True, description="one INFO line per HTTP request (logger "
                             "recsvc.access): method, route, status, duration, request id")

    # encoder
    encoder_path: str | None = Field(None, description="model dir; default bundled MiniLM")
    device: str = Field("auto", description="auto | cpu | cuda")
    encoder_batch_size: int = 64
    embedding_cache_size: int = Field(100_000, description="in-process LRU entries")
    embedding_cache_ttl_s: int = Field(7 * 86_400, description="store cache TTL")

    # retrieval and policy
    candidates: int = Field(200, description="candidates retrieved per request")
    related_candidates: int = Field(50, ge=0, description="candidates added per request "
                                    "from the items nearest to each of the user's 3 latest "
                                    "positive items; 0 = none")
    engaging_candidates: int = Field(50, ge=0, description="candidates added per request "
                                     "from the items with the highest smoothed CTR, beside "
                                     "the embedding search; 0 = search only")
    exact_index_max: int = Field(50_000, description="from this many items the CPU index is "
                                 "approximate (on CUDA it stays exact)")
    approximate_index: Literal["ivf", "hnsw"] = "ivf"
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists scanned per query")
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    search_threads: int = Field(1, ge=1, description="FAISS OpenMP and numpy BLAS threads "
                                "per call (requests already compute in parallel)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads of each "
                               "`recsvc serve` process's compute threads; 0: torch's default "
                               "(a thread per core) divided among RECSVC_WORKERS")
    compute_threads: int = Field(2, ge=1, description="threads that score recommend "
                                 "batches (transformer, index search, Q-network) off the "
                                 "event loop; each works on one batch at a time")
    recommend_batch_size: int = Field(32, ge=1, description="concurrent recommend requests "
                                      "scored in one Q-network call and one index search")
    history_len: int = Field(50, description="history entries kept per user")
    shown_len: int = Field(200, description="recently shown items remembered per user")
    rest_shown: int = Field(200, ge=0, description="items of the user's latest slates that "
                            "are not shown again while ignored (0: off)")
    history_decay: float = Field(0.8, description="recency weight per step back in history")
    exposure_recent_s: float = Field(1800.0, description="scale of the shown-ignored penalty")
    epsilon_start: float = _EXPLORATION.start
    epsilon_end: float = _EXPLORATION.end
    epsilon_decay: float = Field(_EXPLORATION.decay,
                                 description="learned feedback events per 1/e decay")
    seed: int | None = Field(None, description="seed for exploration (tests, benchmarks)")

    popularity_lift: Literal["ctr", "expected"] = Field(
        "ctr", description="what an item's popularity is measured against: the catalog's "
        "CTR (ctr), or the clicks the logistic agent expected of it where it was shown "
        "(expected: clicks over expected clicks; needs the ensemble)")
    ensemble: bool = Field(True, description="rank by a fused ensemble of agents "
                           "(Q-network, popularity, LinUCB), with weights learned from "
                           "the rewards of each agent's picks; off when RECSVC_HEAD_WEIGHTS "
                           "is set")

    adaptation: bool = Field(False, description="fast adaptation for new users: correct "
                             "the scores of users with fewer than 5 positive events by a "
                             "rule learned across users from new users' residuals")

    # learning
    # (defaults: models.learner.DQNConfig's, the one place they are written)
    gamma: float = _LEARNER.gamma
    learning_rate: float = _LEARNER.lr
    batch_size: int = _LEARNER.batch_size
    replay_size: int = _LEARNER.buffer_size
    replay_prefault: bool = Field(_LEARNER.prefault_buffer, description="commit the replay "
                                  "buffer's memory at start, so resident memory is flat "
                                  "from the first request")
    steps_per_batch: int = Field(_LEARNER.steps_per_batch, ge=0, description="least gradient "
                                 "steps per learning round with new transitions (0: only "
                                 "the steps they owe, so steps per event do not depend on "
                                 "how often rounds run)")
    replay_ratio: float = Field(_LEARNER.replay_ratio, gt=0, description="gradient steps per "
                                "new transition, in units of half a minibatch")
    max_steps_per_round: int = Field(64, ge=1, description="most gradient steps per learning "
                                     "round: under more traffic than the learner can train "
                                     "on, it learns less per event instead of lagging ever "
                                     "further behind (and losing impressions to their TTL)")
    target_tau: float = _LEARNER.target_tau
    grad_clip: float = _LEARNER.grad_clip
    hidden: int = _LEARNER.hidden
    reward_map: str = Field("", description='JSON, e.g. {"click": 1, "purchase": 2}')
    reward_default: float = Field(0.0, description="reward of shown items with no feedback")
    head_weights: str = Field("", description="multi-task Q-network: JSON ranking weights "
                              'of its heads, e.g. {"click": 1, "purchase": 1}: a head '
                              "per name (click, purchase, rating, dwell); events of "
                              "unnamed heads are not learned; unset = one head learns the "
                              "summed reward")
    reward_wait_s: float = Field(30.0, description="reward window after an impression")
    impression_ttl_s: int = Field(86_400, description="feedback accepted this long after recommend")
    user_ttl_s: int = Field(30 * 86_400, ge=1, description="a user's history and shown items "
                            "are kept this long after their last write")
    stream_max: int = Field(1_000_000, ge=1000, description="the event stream is trimmed to "
                            "about this many entries (reached only if no learner consumes it)")
    unlogged_max: int = Field(100_000, description="impressions held in memory while the "
                                                   "store is down")
    ope_log_size: int = Field(100_000, description="closed impressions kept for evaluation")
    learner_poll_s: float = Field(0.2, description="learner loop period")
    learner_read_count: int = Field(3000, ge=1, description="stream entries read and learned "
                                    "per round (at most 64 gradient steps per round)")
    lease_ttl_s: float = Field(5.0, gt=0, description="the learner lease expires this long "
                               "after its holder's last renewal; a standby takes over then")
    publish_interval_s: float = Field(1.0, description="min seconds between weight versions")
    weights_kept: int = Field(5, description="weight versions kept for rollback")
    weights_poll_s: float = Field(0.5, description="how often servers check for new weights "
                                  "and catalog changes")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v.lower() not in {"auto", "cpu", "cuda"}:
            raise ValueError("must be auto, cpu or cuda")
        return v.lower()

    @field_validator("rate_limit_window_s", "weights_kept")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("reward_map")
    @classmethod
    def _reward_map(cls, v: str) -> str:
        if v:
            RewardMap(rewards={k: float(x) for k, x in json.loads(v).items()})
        return v

    @field_validator("head_weights")
    @classmethod
    def _head_weights(cls, v: str) -> str:
        if v:
            weights = json.loads(v)
            if not isinstance(weights, dict) or not weights:
                raise ValueError('must be a JSON object such as {"click": 1, "purchase": 1}')
            unknown = set(weights) - set(HEADS)
            if unknown:
                raise ValueError(f"unknown heads {sorted(unknown)}; heads are {list(HEADS)}")
            if not all(isinstance(x, int | float) and math.isfinite(x)
                       for x in weights.values()):
                raise ValueError("head weights must be finite numbers")
        return v

    @model_validator(mode="after")
    def _options_with_one_head(self) -> Settings:
        # asked for explicitly (the ensemble's default gives way to head weights)
        for name, on in (("RECSVC_ENSEMBLE", self.ensemble and "ensemble" in
                          self.model_fields_set), ("RECSVC_ADAPTATION", self.adaptation)):
            if on and self.head_weights:
                raise ValueError(f"{name} and RECSVC_HEAD_WEIGHTS cannot be combined yet: "
                                 "it learns from one summed reward per shown item")
        return self

    @property
    def ensemble_on(self) -> bool:
        """Whether slates are ranked by the fused ensemble: on by default, off with
        multi-task heads (the ensemble learns from one summed reward)."""
        return self.ensemble and not self.head_weights

    @cached_property
    def heads(self) -> tuple[str, ...]:
        """The Q-network's heads when multi-task: those named in ``head_weights``, in
        ``HEADS`` order; else none (one head learns the summed reward)."""
        named = json.loads(self.head_weights) if self.head_weights else {}
        return tuple(h for h in HEADS if h in named)

    @cached_property
    def head_weight_list(self) -> tuple[float, ...]:
        """Ranking weight of each of ``heads``, in order (empty with one head)."""
        weights = json.loads(self.head_weights) if self.head_weights else {}
        return tuple(float(weights[h]) for h in self.heads)

    @cached_property
    def rewards(self) -> RewardMap:
        mapping = {k: float(x) for k, x in json.loads(self.reward_map).items()} \
            if self.reward_map else {}
        base = RewardMap()
        return RewardMap(rewards={**base.rewards, **mapping}, default=self.reward_default)

    @cached_property
    def proxy_networks(self) -> list:
        import ipaddress

        return [ipaddress.ip_network(p.strip(), strict=False)
                for p in self.trusted_proxies.split(",") if p.strip()]

    @cached_property
    def key_list(self) -> list[str]:
        """API keys (admin keys, which may call everything too, are ``admin_key_list``)."""
        return _keys(self.api_keys, self.api_keys_file)

    @cached_property
    def admin_key_list(self) -> list[str]:
        return _keys(self.admin_keys, self.admin_keys_file)

    @property
    def epsilon_schedule(self) -> EpsilonSchedule:
        return EpsilonSchedule(self.epsilon_start, self.epsilon_end, self.epsilon_decay)

    @property
    def dqn(self) -> DQNConfig:
        return DQNConfig(gamma=self.gamma, lr=self.learning_rate, batch_size=self.batch_size,
                         buffer_size=self.replay_size, steps_per_batch=self.steps_per_batch,
                         replay_ratio=self.replay_ratio,
                         grad_clip=self.grad_clip, target_tau=self.target_tau,
                         hidden=self.hidden, seed=self.seed or 0,
                         prefault_buffer=self.replay_prefault,
                         heads=max(len(self.heads), 1), head_weights=self.head_weight_list)
