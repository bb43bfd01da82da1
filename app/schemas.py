"""Request and response bodies of API.md, as pydantic models (the contract in code)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StringConstraints,
    model_validator,
)


def error_field(loc: tuple) -> str:
    """Where a validation error is, as a 422 names it (``context.text``; the request
    body itself is ``body``)."""
    return ".".join(str(p) for p in loc if p != "body") or "body"


def first_error(errors: Sequence[Any]) -> str:
    """``field: message`` of the first of pydantic's errors: the message of every 422,
    of a batch's refused event and of a load-items row that is skipped."""
    if not errors:
        return "body: invalid request"
    return f"{error_field(tuple(errors[0].get('loc', ())))}: {errors[0].get('msg', '')}"


Id = Annotated[str, StringConstraints(min_length=1, max_length=128,
                                      pattern=r"^[A-Za-z0-9_.:@-]+$")]
Event = Literal["click", "purchase", "like", "dislike", "skip", "rating", "dwell"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemIn(Strict):
    item_id: Id
    text: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = \
        Field(default_factory=list, max_length=64)
    # strict: JSON's true and false only (the schema says boolean; 0 and "yes" are refused)
    available: StrictBool = True


class ItemsIn(Strict):
    items: list[ItemIn] = Field(min_length=1, max_length=1000)


class ItemOut(BaseModel):
    item_id: str
    text: str
    tags: list[str]
    available: bool


class ItemsPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null "
                                    "after the last")


class ScoredItem(BaseModel):
    item_id: str
    score: float


class ScoredItemsOut(BaseModel):
    items: list[ScoredItem]


class UpsertOut(BaseModel):
    upserted: int
    catalog_size: int


class Context(Strict):
    text: Annotated[str, StringConstraints(max_length=4000)] | None = None


class RecommendIn(Strict):
    user_id: Id
    context: Context | None = None
    k: int = Field(10, ge=1, le=100)
    exclude: list[Id] = Field(default_factory=list, max_length=1000)
    exclude_seen: StrictBool = True
    candidates: list[Id] | None = Field(None, max_length=1000)
    explore: StrictBool = True
    explain: StrictBool = Field(False, description="add each item's main reasons (an "
                                "addition to API.md: the other fields are unchanged)")
    defer_seen: StrictBool = Field(False, description="v1.1: learn only from the items "
                                   "POST /v1/seen says were displayed")


class SeenIn(Strict):
    request_id: Id
    item_ids: list[Id] = Field(min_length=1, max_length=100)


class SeenOut(BaseModel):
    accepted: bool
    seen: int = Field(description="distinct items this call marked displayed")


class Reason(BaseModel):
    kind: Literal["context", "history", "ignored"] = Field(
        description="context: the request's context text; history: one item of the "
                    "user's history; ignored: the items the user was shown and passed over")
    item_id: str | None = Field(None, description="the history item (kind history)")
    event: str | None = Field(None, description="its latest event (kind history)")
    contribution: float = Field(description="how much lower the item's score is without "
                                "this part (negative: it held the item back)")


class Explanation(BaseModel):
    explored: bool = Field(description="placed by exploration, not by its score")
    score: float | None = Field(None, description="the score the reasons explain")
    reasons: list[Reason] = Field(description="strongest first, at most 3")


class SlateItem(BaseModel):
    item_id: str
    score: float
    explored: bool
    propensity: float
    explanation: Explanation | None = None


class RecommendOut(BaseModel):
    request_id: str
    model_version: int
    items: list[SlateItem]


def _value_rules_schema(schema: dict) -> None:
    """State in the schema what ``_value_rules`` checks: ``rating`` needs a value of
    0..5, ``dwell`` one of seconds >= 0 (JSON Schema if/then, so generated clients and
    schema fuzzers know a dwell without a value is invalid)."""
    schema["allOf"] = [
        {"if": {"properties": {"event": {"const": "rating"}}, "required": ["event"]},
         "then": {"properties": {"value": {"type": "number", "minimum": 0, "maximum": 5}},
                  "required": ["value"]}},
        {"if": {"properties": {"event": {"const": "dwell"}}, "required": ["event"]},
         "then": {"properties": {"value": {"type": "number", "minimum": 0}},
                  "required": ["value"]}},
    ]


class _EventValue(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_value_rules_schema)

    event: Event
    # Python's JSON parser accepts NaN and Infinity; they must never reach a reward.
    # Strict: a JSON number only (false is not 0, "3" is not 3).
    value: StrictFloat | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _value_rules(self) -> _EventValue:
        if self.event == "rating" and (self.value is None or not 0 <= self.value <= 5):
            raise ValueError("rating needs a value between 0 and 5")
        if self.event == "dwell" and (self.value is None or self.value < 0):
            raise ValueError("dwell needs a value of seconds >= 0")
        return self


class FeedbackIn(_EventValue):
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    item_id: Id


class FeedbackOut(BaseModel):
    accepted: bool
    reward: float
    duplicate: bool = False


class FeedbackBatchIn(Strict):
    # each event is validated on its own, by the route: an event that is not a valid
    # FeedbackIn gets a 422 result of its own, and does not refuse the others
    events: list[dict] = Field(min_length=1, max_length=1000,
                               description="feedback objects as POST /v1/feedback takes")


class FeedbackResult(BaseModel):
    """What the event would have got alone: its status, and its body's fields."""

    status: int
    accepted: bool | None = None
    reward: float | None = None
    duplicate: bool | None = None
    error: dict | None = None


class FeedbackBatchOut(BaseModel):
    results: list[FeedbackResult]


class EventIn(_EventValue):
    user_id: Id
    item_id: Id


class EventOut(BaseModel):
    accepted: bool


class HistoryEntry(BaseModel):
    item_id: str
    event: str
    ts: float
    value: float | None = None


class UserOut(BaseModel):
    user_id: str
    history: list[HistoryEntry]


class ArmValue(BaseModel):
    value: float = Field(description="estimated reward per shown item: of the slates an "
                         "arm served, or of the items a source retrieved (self-normalised "
                         "IPS from the logged propensities)")
    se: float = Field(description="standard error of that estimate")


class AgentValue(ArmValue):
    weight: float = Field(description="the share of exploring requests it serves")


class SourceValue(ArmValue):
    reach: float | None = Field(description="how deep into its ranked list the greedy "
                                "picks reach (95th percentile of their ranks), which sets "
                                "how many candidates it gives; null while too few picks "
                                "came from it")


class ModelOut(BaseModel):
    version: int
    updates: int
    feedback_learned: int
    epsilon: float
    pending_impressions: int
    device: str
    # additive (v1.1): what the fused ensemble learned, when it is on
    agents: dict[str, AgentValue] | None = Field(
        None, description="each arm's (an agent alone, or their fusion) estimated value "
        "and share of requests")
    sources: dict[str, SourceValue] | None = Field(
        None, description="each candidate source's estimated value and reach")


class PartImportance(BaseModel):
    part: str
    kind: Literal["state", "item_features"]
    mean_abs_q_change: float = Field(description="mean |Q change| over the logged items "
                                     "when this part is zeroed")
    top_item_changed: float = Field(description="share of logged slates whose top item "
                                    "changes when this part is zeroed")


class ImportanceOut(BaseModel):
    impressions: int = Field(description="logged impressions measured on")
    items: int
    model_version: int
    parts: list[PartImportance] = Field(description="most important first")


class RollbackOut(BaseModel):
    version: int = Field(description="the new version now served")
    restored_from: int = Field(description="the earlier version whose weights it serves")


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[dict] | None = None


class ErrorOut(BaseModel):
    error: ErrorInfo


class LogRecord(BaseModel):
    request_id: str
    user_id: str
    ts: float
    model_version: int
    n_candidates: int
    item_ids: list[str]
    propensities: list[float]
    explored: list[bool]
    rewards: list[float]


class LogOut(BaseModel):
    records: list[LogRecord]
