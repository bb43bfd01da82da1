"""Tests' view of ``CandidateIndex`` results by item id (serving reads them by row)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from models.index import CandidateIndex, Hits


def with_ids(index: CandidateIndex, hits: list[Hits]) -> list[tuple[list[str], np.ndarray]]:
    """Per result, its item ids and embeddings (nothing moves rows in these tests)."""
    looked = index.at_rows([rows for rows, _ in hits], index.row_generation)
    assert looked is not None
    return [(ids, vectors) for (ids, *_), (_, vectors) in zip(looked, hits, strict=True)]


def search_ids(index: CandidateIndex, queries: np.ndarray, n: int,
               exclude: Sequence[Iterable[str]] | None = None):
    banned = index.rows_of(exclude) if exclude is not None else None
    return with_ids(index, index.search(queries, n, banned))


def related_ids(index: CandidateIndex, seeds: Sequence[Sequence[str]], n: int,
                exclude: Sequence[Iterable[str]]):
    return with_ids(index, index.related(seeds, n, index.rows_of(exclude)))


def engaging_ids(index: CandidateIndex, n: int, exclude: Sequence[Iterable[str]]):
    return with_ids(index, index.engaging(n, index.rows_of(exclude)))


def stats_of(index: CandidateIndex, ids: Sequence[str]) -> np.ndarray:
    """Per id, its ``[shown, clicked]`` counts (without the expected clicks)."""
    return index.stats_and_tags_of(ids)[0][:, :2]


def tags_of(index: CandidateIndex, ids: Sequence[str]) -> np.ndarray:
    return index.stats_and_tags_of(ids)[1]
