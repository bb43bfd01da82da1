"""FAISS candidate index: add, update, remove, availability, exclusion, approximate recall."""

import threading

import numpy as np
import pytest

from models.ann import faiss_has_gpu
from models.index import CandidateIndex
from tests.index_ids import engaging_ids, related_ids, search_ids, stats_of, tags_of


def unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_search_returns_true_top_n():
    rng = np.random.default_rng(0)
    vecs = unit(rng, 500, 16)
    idx = CandidateIndex(16)
    idx.upsert([f"i{i}" for i in range(500)], vecs)
    q = unit(rng, 3, 16)
    res = search_ids(idx, q, 20)
    for qi, (ids, embs) in enumerate(res):
        truth = np.argsort(-(vecs @ q[qi]))[:20]
        assert ids == [f"i{i}" for i in truth]
        assert np.allclose(embs, vecs[truth])


def test_update_remove_unavailable_and_exclude_are_never_returned():
    rng = np.random.default_rng(1)
    vecs = unit(rng, 50, 8)
    idx = CandidateIndex(8)
    ids = [f"i{i}" for i in range(50)]
    idx.upsert(ids, vecs)
    q = vecs[7]
    assert search_ids(idx, q, 1)[0][0] == ["i7"]
    # update: i7 now points the other way, so it must drop to the bottom
    idx.upsert(["i7"], -vecs[7:8])
    assert search_ids(idx, q, 50)[0][0][-1] == "i7"
    assert len(idx) == 50
    idx.remove(["i3", "i4", "missing"])
    idx.upsert(["i5"], vecs[5:6], available=[False])
    got = search_ids(idx, q, 50, [{"i6"}])[0][0]
    assert not {"i3", "i4", "i5", "i6"} & set(got)
    assert len(got) == 50 - 4 and len(set(got)) == len(got)
    assert not idx.is_recommendable("i5") and idx.is_recommendable("i8")
    idx.set_available("i5", True)
    assert "i5" in search_ids(idx, q, 50)[0][0]


def test_many_deletes_compact_and_keep_results_right():
    rng = np.random.default_rng(2)
    vecs = unit(rng, 300, 8)
    idx = CandidateIndex(8)
    idx.upsert([f"i{i}" for i in range(300)], vecs)
    idx.remove([f"i{i}" for i in range(0, 300, 2)])
    assert len(idx) == 150
    q = unit(rng, 1, 8)[0]
    odd = np.arange(1, 300, 2)
    truth = odd[np.argsort(-(vecs[odd] @ q))[:10]]
    assert search_ids(idx, q, 10)[0][0] == [f"i{i}" for i in truth]


def test_vectors_of_keeps_order_and_drops_unknown():
    idx = CandidateIndex(4)
    idx.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    ids, vecs = idx.vectors_of(["b", "zz", "a"])
    assert ids == ["b", "a"]
    assert np.allclose(vecs, np.eye(4)[[1, 0]])


def test_small_catalog_returns_everything_once():
    idx = CandidateIndex(4)
    idx.upsert(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3])
    ids, _ = search_ids(idx, np.ones(4, dtype=np.float32), 200)[0]
    assert sorted(ids) == ["a", "b", "c"]
    empty = CandidateIndex(4)
    assert search_ids(empty, np.ones(4, dtype=np.float32), 5)[0][0] == []


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_at_100(kind):
    """Above the exact threshold the index is approximate; recall@100 against exact >= 0.95,
    and results come back in exact inner-product order."""
    rng = np.random.default_rng(3)
    n, d = 30_000, 64
    # clustered data, like item embeddings (topics), not uniform noise
    centres = unit(rng, 200, d)
    vecs = centres[rng.integers(0, 200, n)] + 0.35 * unit(rng, n, d)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"i{i}" for i in range(n)]
    approx = CandidateIndex(d, exact_threshold=10_000, approximate_kind=kind)
    for start in range(0, n, 5000):  # grows through the threshold, as uploads do
        approx.upsert(ids[start:start + 5000], vecs[start:start + 5000])
    assert approx.approximate and approx.kind == kind
    queries = unit(rng, 200, d)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :100]
    found = search_ids(approx, queries, 100)
    recall = np.mean([len({f"i{i}" for i in exact[q]} & set(found[q][0])) / 100
                      for q in range(len(queries))])
    assert recall >= 0.95, recall
    for q in range(5):
        _, got = found[q]
        assert np.all(np.diff(got @ queries[q]) <= 1e-6)
    # deletes still hold in approximate mode
    approx.remove([found[0][0][0]])
    assert found[0][0][0] not in search_ids(approx, queries[:1], 100)[0][0]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() or faiss_has_gpu()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_gpu_index_matches_cpu_and_stays_exact_above_the_threshold():
    rng = np.random.default_rng(4)
    vecs = unit(rng, 3000, 32)
    q = unit(rng, 16, 32)
    cpu, gpu = CandidateIndex(32), CandidateIndex(32, exact_threshold=1000, device="cuda")
    for idx in (cpu, gpu):
        idx.upsert([f"i{i}" for i in range(3000)], vecs)
    assert gpu.kind == "flat" and gpu.backend in {"faiss-gpu", "torch-cuda"}
    for (a, va), (b, vb) in zip(search_ids(cpu, q, 50), search_ids(gpu, q, 50), strict=True):
        assert a == b and np.allclose(va, vb)
    # updates, deletes, unavailability and exclusion behave as on the CPU
    for idx in (cpu, gpu):
        idx.upsert(["i1"], -vecs[1:2])
        idx.remove([f"i{i}" for i in range(0, 3000, 3)])
        idx.set_available("i2", False)
    excluded = [{"i5", "i7"}] * len(q)
    for (a, _), (b, _) in zip(search_ids(cpu, q, 100, excluded), search_ids(gpu, q, 100, excluded),
                              strict=True):
        assert a == b and not {"i2", "i3", "i5", "i7"} & set(b)


def test_engagement_counts_follow_items_through_updates_and_compaction():
    idx = CandidateIndex(4)
    idx.upsert(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3])
    idx.record(["a", "b", "a", "zz"], ["a"])
    assert stats_of(idx, ["a", "b", "c", "zz"]).tolist() == [[2, 1], [1, 0], [0, 0], [0, 0]]
    idx.upsert(["a"], np.eye(4, dtype=np.float32)[3:4])  # re-embedded: counts kept
    idx.remove(["c"])
    idx._rebuild("flat")
    assert stats_of(idx, ["a", "b"]).tolist() == [[2, 1], [1, 0]]


def test_expected_clicks_are_counted_per_impression_and_scale_to_the_clicks():
    """Each impression adds the click probability the policy expected of it (or the
    catalog's CTR so far when none is given), and ``expected_scale`` is what makes
    the catalog's clicks over expected clicks 1."""
    from models.state import PRIOR_CTR, PRIOR_WEIGHT

    idx = CandidateIndex(4)
    idx.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    idx.record(["a", "b", "zz"], expected=[0.5, 0.25, 0.9])  # unknown ids: ignored
    idx.record(["a"], ["a", "b"], expected=[0.25])
    assert idx.stats_and_tags_of(["a", "b"])[0][:, 2].tolist() == [0.75, 0.25]
    prior = PRIOR_CTR * PRIOR_WEIGHT
    assert np.isclose(idx.expected_scale(), (2 + prior) / (1.0 + prior))
    base = idx.base_ctr()
    idx.record(["b"])  # no expectation: the catalog's CTR
    assert np.isclose(idx.stats_and_tags_of(["b"])[0][0, 2], 0.25 + base)


def test_counting_never_waits_for_a_search_and_loses_nothing():
    """The event loop counts every slate and click; a compute thread may hold the
    index for a whole batched search meanwhile. Counting must return at once, and the
    counts must be there for the next reader."""
    idx = CandidateIndex(4)
    idx.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2])
    held, release = threading.Event(), threading.Event()

    def long_search() -> None:
        with idx._lock:  # what a batched search holds, until told to let go
            held.set()
            release.wait(60)

    searcher = threading.Thread(target=long_search)
    searcher.start()
    assert held.wait(60)
    idx.record(["a", "b", "a"], ["a"])
    idx.record([], ["b"])
    assert searcher.is_alive()  # both returned while the search still held the index
    release.set()
    searcher.join(60)
    assert stats_of(idx, ["a", "b"]).tolist() == [[2, 1], [1, 1]]
    idx.upsert(["a"], np.eye(4, dtype=np.float32)[2:3])  # re-embedded: counts carried
    idx.record(["a"])
    assert stats_of(idx, ["a"]).tolist() == [[3, 1]]


def test_bulk_load_builds_once_and_finds_what_upserts_one_by_one_find(monkeypatch):
    """A start-up load defers the FAISS build to its end: the result searches exactly
    like an index grown chunk by chunk, is approximate above the threshold, and its
    storage was sized once (no doubling past the catalog)."""
    rng = np.random.default_rng(5)
    vecs = unit(rng, 3000, 16)
    ids = [f"i{i}" for i in range(3000)]
    grown = CandidateIndex(16, exact_threshold=1000, ivf_nprobe=64)
    bulk = CandidateIndex(16, exact_threshold=1000, ivf_nprobe=64)
    bulk.begin_bulk_load(len(ids))
    for s in range(0, 3000, 500):
        grown.upsert(ids[s:s + 500], vecs[s:s + 500])
        bulk.upsert(ids[s:s + 500], vecs[s:s + 500])
        assert bulk.kind == "flat"  # nothing is built while loading
    bulk.finish_bulk_load()
    assert bulk.kind == grown.kind == "ivf" and len(bulk) == 3000
    assert len(bulk._live) == 3000
    q = unit(rng, 5, 16)
    exact = [[f"i{i}" for i in np.argsort(-(vecs @ qi))[:10]] for qi in q]
    assert [r[0] for r in search_ids(bulk, q, 10)] == exact
    assert [r[0] for r in search_ids(grown, q, 10)] == exact


def test_compaction_in_place_across_chunks_keeps_vectors_stats_and_availability(monkeypatch):
    """Compaction moves live rows down in chunks over the same arrays; every surviving
    item keeps its own vector, counts and availability."""
    monkeypatch.setattr("models.index.COMPACT_CHUNK", 7)
    rng = np.random.default_rng(6)
    vecs = unit(rng, 200, 8)
    ids = [f"i{i}" for i in range(200)]
    idx = CandidateIndex(8)
    idx.upsert(ids, vecs, available=[i % 5 != 0 for i in range(200)])
    idx.record([f"i{i}" for i in range(0, 200, 3)], [f"i{i}" for i in range(0, 200, 9)])
    gone = {f"i{i}" for i in rng.choice(200, 120, replace=False)}
    idx.remove(sorted(gone))
    assert idx._n_dead == 0  # a fifth retired: compacted
    kept = [i for i in range(200) if f"i{i}" not in gone]
    _, got = idx.vectors_of([f"i{i}" for i in kept])
    assert np.array_equal(got, vecs[kept])
    stats = stats_of(idx, [f"i{i}" for i in kept])
    assert stats.tolist() == [[float(i % 3 == 0), float(i % 9 == 0)] for i in kept]
    servable = {f"i{i}" for i in kept if i % 5 != 0}
    found = search_ids(idx, unit(rng, 1, 8), 200)[0][0]
    assert set(found) == servable


def test_tags_follow_items_through_updates_and_compaction():
    from models.state import tag_vectors

    idx = CandidateIndex(4)
    idx.upsert(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3],
               tags=[["comedy"], ["drama", "war"], []])
    assert np.array_equal(tags_of(idx, ["b", "zz", "a"]),
                          tag_vectors([["drama", "war"], [], ["comedy"]]).astype(np.float32))
    idx.upsert(["a"], np.eye(4, dtype=np.float32)[3:4], tags=[["horror"]])
    idx.remove(["c"])
    idx._rebuild("flat")
    assert np.array_equal(tags_of(idx, ["a", "b"]),
                          tag_vectors([["horror"], ["drama", "war"]]).astype(np.float32))
    idx.record(["b", "b", "a"], ["b"])
    stats, tags = idx.stats_and_tags_of(["b", "zz", "a"])  # one lookup for both tables
    assert np.array_equal(stats[:, :2], stats_of(idx, ["b", "zz", "a"]))
    assert np.array_equal(tags, tags_of(idx, ["b", "zz", "a"]))
    assert stats[:, :2].tolist() == [[2, 1], [0, 0], [1, 0]]
    found, vectors, tags = idx.vectors_and_tags_of(["b", "zz", "a"])  # known ones only
    assert found.tolist() == [True, False, True]
    assert np.array_equal(vectors, idx.vectors_of(["b", "a"])[1])
    assert np.array_equal(tags, tags_of(idx, ["b", "a"]))


def test_engaging_ranks_by_smoothed_ctr_skips_exclusions_and_follows_the_counts(monkeypatch):
    """The second candidate source: servable items by smoothed CTR, best first, never an
    excluded, unavailable or removed one, and re-ranked as the counts change."""
    import models.index as index_module
    from models.state import smoothed_ctr

    rng = np.random.default_rng(5)
    idx = CandidateIndex(8)
    ids = [f"i{i}" for i in range(30)]
    vecs = unit(rng, 30, 8)
    idx.upsert(ids, vecs)
    idx.record(["i1"] * 100 + ["i2"] * 10 + ["i3"] * 100, ["i1"] * 30 + ["i2"] * 5 + ["i3"] * 1)
    # closed form: (clicks + 0.03 * 20) / (shown + 20)
    assert np.allclose(smoothed_ctr(np.array([[100, 30], [10, 5], [0, 0]], np.float32)),
                       [30.6 / 120, 5.6 / 30, 0.03])
    (top, emb), (skipping, _) = engaging_ids(idx, 2, [set(), {"i1"}])
    assert top == ["i1", "i2"] and np.allclose(emb, vecs[[1, 2]])
    assert skipping[0] == "i2" and len(skipping) == 2 and "i1" not in skipping
    assert "i3" not in engaging_ids(idx, 29, [set()])[0][0][:28]  # shown 100x, clicked once: last

    monkeypatch.setattr(index_module, "ENGAGING_REFRESH_IMPRESSIONS", 0)
    idx.record(["i4"] * 10, ["i4"] * 9)  # (9.6 / 30) beats i1's 0.255
    assert engaging_ids(idx, 1, [set()])[0][0] == ["i4"]
    monkeypatch.setattr(index_module, "ENGAGING_REFRESH_IMPRESSIONS", 10**9)
    idx.upsert(["i4"], vecs[4:5], available=[False])  # a change to the index: re-ranked
    idx.remove(["i1"])
    assert engaging_ids(idx, 2, [set()])[0][0][0] == "i2"
    everything = engaging_ids(idx, 100, [set()])[0][0]
    assert len(everything) == 28 and not {"i1", "i4"} & set(everything)


def test_related_equals_one_search_per_seed_and_follows_catalog_changes(monkeypatch):
    """The related source's cached neighbour lists give what a search per seed (with the
    same exclusions, later seeds dropping what earlier ones gave) gives, also after
    the catalog changes and when a request excludes more than the lists' margin."""
    import models.index as index_module

    monkeypatch.setattr(index_module, "NEIGHBOUR_MARGIN", 8)
    rng = np.random.default_rng(7)
    n_items = 300
    ids = [f"i{i}" for i in range(n_items)]
    vecs = unit(rng, n_items, 16)
    idx = CandidateIndex(16)
    idx.upsert(ids, vecs)

    def by_search(seeds, n, ex):
        got: list[str] = []
        for seed in seeds:
            if seed in idx:
                found = search_ids(idx, idx.vectors_of([seed])[1], n, [ex])[0][0]
                got += [i for i in found if i not in got]
        return got

    def check(seeds, n, ex):
        (got, emb), = related_ids(idx, [seeds], n, [ex])
        assert got == by_search(seeds, n, ex)
        assert np.allclose(emb, idx.vectors_of(got)[1])

    for _ in range(3):  # the second and third rounds are served from the cache
        check(["i5", "i9", "nope", "i5"], 10, {"i1", "i2"})
        check(["i7"], 5, set())
    assert idx._neighbours.hits >= 4  # rounds two and three searched nothing
    excluded = set(by_search(["i5"], 40, set())[:30])  # more than the margin: searched again
    check(["i5"], 10, excluded)
    idx.upsert(["i200"], vecs[5:6] * 0.99 + 0.01)  # now i5's nearest neighbour
    idx.set_available(by_search(["i9"], 1, set())[0], False)
    idx.remove(["i7"])
    check(["i5", "i9"], 10, {"i1"})
    assert related_ids(idx, [["i7"]], 5, [set()])[0][0] == []  # a removed seed gives nothing
    assert related_ids(idx, [["i5"]], 3, [set()])[0][0][:2] == ["i5", "i200"]


def test_reading_candidates_by_row_gives_what_reading_them_by_id_gives():
    """The serving path carries candidates by row (``search``, ``related``,
    ``engaging``, then ``at_rows``); it returns the same items, embeddings, counts and
    tags as the same searches with exclusions by id (``rows_of``) and reading counts and
    tags by id, and refuses rows that a compaction moved."""
    rng = np.random.default_rng(11)
    n_items = 1200
    ids = [f"i{i}" for i in range(n_items)]
    vecs = unit(rng, n_items, 16)
    idx = CandidateIndex(16, exact_threshold=1000, ivf_nprobe=64)  # IVF: the re-rank path
    idx.upsert(ids, vecs, tags=[["comedy"] if i % 3 else ["drama", "war"]
                                for i in range(n_items)])
    assert idx.kind == "ivf"
    idx.record(ids[:50] * 3, ids[:20])
    queries = unit(rng, 3, 16)
    exclude = [{"i1", "i2", "nope"}, set(), set(ids[100:400])]
    banned = idx.rows_of(exclude)
    assert [len(b) for b in banned] == [2, 0, 300]  # unknown ids are dropped
    generation = idx.row_generation

    def same(by_row, by_id):
        looked = idx.at_rows([rows for rows, _ in by_row], generation)
        for (rows, emb), (got_ids, stats, tags, hashes), (want_ids, want_emb) in zip(
                by_row, looked, by_id, strict=True):
            assert got_ids == want_ids
            assert np.array_equal(emb, want_emb) and np.array_equal(idx.vectors_at(rows), emb)
            want_stats, want_tags = idx.stats_and_tags_of(want_ids)
            assert np.array_equal(stats, want_stats) and np.array_equal(tags, want_tags)
            assert hashes.tolist() == [hash(i) for i in want_ids]

    same(idx.search(queries, 40, banned), search_ids(idx, queries, 40, exclude))
    seeds = [["i5", "i9"], ["i7"], ["nope", "i11"]]
    same(idx.related(seeds, 10, banned), related_ids(idx, seeds, 10, exclude))
    same(idx.engaging(10, banned), engaging_ids(idx, 10, exclude))

    idx.remove(ids[: n_items // 3])  # past the compaction threshold: rows move
    assert idx.row_generation != generation
    assert idx.at_rows([np.arange(5)], generation) is None
    rows = idx.rows_of([["i500"]])[0]
    assert idx.at_rows([rows], idx.row_generation)[0][0] == ["i500"]
    assert idx.at_rows([rows], idx.row_generation)[0][3].tolist() == [hash("i500")]


def test_the_id_set_version_moves_only_when_ids_join_or_leave():
    """What a cached sorted listing of the ids is keyed on: re-embedding an item or
    changing its availability keeps the id set, adding or removing one does not."""
    index = CandidateIndex(4)
    rng = np.random.default_rng(0)
    index.upsert(["a", "b"], rng.standard_normal((2, 4)))
    before = index.ids_version
    index.upsert(["a"], rng.standard_normal((1, 4)))
    index.set_available("b", False)
    assert index.ids_version == before
    index.upsert(["a", "c"], rng.standard_normal((2, 4)))
    assert index.ids_version == before + 1
    index.remove(["zz"])
    assert index.ids_version == before + 1
    index.remove(["a"])
    assert index.ids_version == before + 2


def test_searches_use_the_search_threads_and_builds_the_machines_on_a_model_thread():
    """OpenMP's thread count is per thread and torch shares it: at a thread's first
    torch operation torch sets it to its own count. On a serving thread that runs the
    model, a FAISS search still uses RECSVC_SEARCH_THREADS, a build (k-means, list
    assignment: rare and large) FAISS's default threads, and torch's count holds after
    both."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss
    import torch

    import models.ann
    from models.ann import BUILD_THREADS, AnnParams, AnnStructure, set_search_threads

    searching, modelling = BUILD_THREADS + 1, BUILD_THREADS + 2  # neither a default
    seen: list[tuple[str, int]] = []

    class Recording:
        def add(self, vectors):
            seen.append(("build", faiss.omp_get_max_threads()))

        def search(self, queries, k):
            seen.append(("search", faiss.omp_get_max_threads()))
            return np.zeros((len(queries), k)), -np.ones((len(queries), k), np.int64)

    def serve() -> int:
        torch.ones(64, 64) @ torch.ones(64, 64)  # torch sets the thread's count here
        structure = AnnStructure(8, AnnParams())
        structure._new = lambda kind, vectors: Recording()
        structure.rebuild("flat", np.ones((4, 8), np.float32))
        structure.search(np.ones((1, 8), np.float32), 2, 4)
        structure.add(np.ones((2, 8), np.float32))
        torch.ones(64, 64) @ torch.ones(64, 64)
        return torch.get_num_threads()

    torch_before, search_before = torch.get_num_threads(), models.ann._search_threads
    set_search_threads(searching)
    try:
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads,
                                initargs=(modelling,)) as pool:
            after = pool.submit(serve).result()
    finally:
        set_search_threads(search_before)
        torch.set_num_threads(torch_before)
    assert seen == [("build", BUILD_THREADS), ("search", searching), ("build", BUILD_THREADS)]
    assert after == modelling
