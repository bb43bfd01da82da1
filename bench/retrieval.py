"""Candidate retrieval at catalog scale: recall@100 against exact search, latency,
build time and memory, through the service's own ``CandidateIndex``.

Data are synthetic item embeddings with topic structure, like a real catalog's
(``clustered_vectors``): ``--topics`` topic directions on the unit sphere, each item
its topic plus a low-rank spread (items of one topic share a subspace, as texts
about one subject share words) plus isotropic noise. Uniform noise in 384-d would
be harder than any real catalog; perfectly separated clusters easier.

What is measured, per configuration:

* build: the catalog is upserted in ``--chunk`` slices, the path a bulk upload
  through the API takes (so IVF is trained and retrained as the catalog grows);
* memory: resident-set growth of the process while building, and the index's own
  bytes (faiss serialisation; vectors kept for re-ranking are counted apart);
* latency: ``--queries`` single-query searches (p50, p99), then batches of
  ``--batch`` (per-query cost), each through ``CandidateIndex.search`` (filtering
  and exact re-rank included; results by row, as serving reads them);
* recall@``--n`` against exact inner-product search over the same vectors.

The exact flat index is the peer every row is printed next to.

    python -m bench.retrieval [--items 1000000] [--nprobe 16,32,48,64]
    python -m bench.retrieval --device cuda --items 10000000 --batch 1,16,64,256
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np
from tqdm import tqdm

from models.index import CandidateIndex


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class TopicSpace:
    """Item embeddings with topic structure: topic direction (topics nested in groups)
    + a low-rank spread in a topic-specific subspace + isotropic noise, normalised."""

    def __init__(self, dim: int, topics: int, seed: int, rank: int = 32,
                 spread: float = 0.8, noise: float = 0.35, sibling: float = 1.0,
                 common: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.topics, self.rank = dim, topics, rank
        self.spread, self.noise = spread, noise
        # topics nest in groups (genres > sub-genres), so a topic's neighbours are its
        # siblings, as in real embedding spaces, not random directions
        groups = max(1, topics // 20)
        group = _unit(rng.standard_normal((groups, dim)))
        self.centres = _unit(group[rng.integers(0, groups, topics)]
                             + sibling * _unit(rng.standard_normal((topics, dim))))
        # sentence embeddings share a common direction (MiniLM's pairwise cosine has a
        # median near 0.38 on MovieLens titles, not 0); this gives the same
        self.common = common * _unit(rng.standard_normal((1, dim)))[0]
        # one set of spread directions, moved into each topic's subspace by a permutation
        self.basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)
        self.perms = np.stack([rng.permutation(dim) for _ in range(topics)])

    def sample(self, n: int, seed: int, chunk: int = 200_000, desc: str = "vectors"
               ) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in tqdm(range(0, n, chunk), desc=desc, unit="chunk", leave=False):
            m = min(chunk, n - start)
            topic = rng.integers(0, self.topics, m)
            z = rng.standard_normal((m, self.rank)).astype(np.float32) / np.sqrt(self.rank)
            low = np.take_along_axis(z @ self.basis, self.perms[topic], axis=1)
            iso = rng.standard_normal((m, self.dim)).astype(np.float32) / np.sqrt(self.dim)
            v = self.centres[topic] + self.spread * low + self.noise * iso + self.common
            out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, n: int, device: str) -> np.ndarray:
    """Ground truth: exact top-``n`` rows per query (float32)."""
    if device == "cuda":
        import torch
        q = torch.from_numpy(queries).cuda()
        best_s = torch.full((len(q), 0), -np.inf, device="cuda")
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device="cuda")
        for start in tqdm(range(0, len(vectors), 2_000_000), desc="exact top", leave=False):
            block = torch.from_numpy(vectors[start:start + 2_000_000]).cuda()
            s, i = torch.topk(q @ block.T, n, dim=1)
            best_s, pick = torch.topk(torch.cat([best_s, s], 1), n, dim=1)
            best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, pick)
        return best_i.cpu().numpy()
    import faiss
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, n)[1]


def recall(found: list[tuple[list[str], np.ndarray]], truth: np.ndarray, n: int) -> float:
    return float(np.mean([len({int(i) for i in ids} & set(truth[q].tolist())) / n
                          for q, (ids, _) in enumerate(found)]))


def time_searches(index: CandidateIndex, queries: np.ndarray, n: int, batch: int,
                  device: str) -> tuple[np.ndarray, list]:
    """Per-call latencies (ms) over the queries in batches of ``batch``, and the results."""
    lat, found = [], []
    sync = None
    if device == "cuda":
        import torch
        sync = torch.cuda.synchronize
    for _ in range(3):  # warm-up
        index.search(queries[:batch], n)
    for start in tqdm(range(0, len(queries), batch), desc=f"search batch={batch}", leave=False):
        q = queries[start:start + batch]
        t = time.perf_counter()
        res = index.search(q, n)
        if sync:
            sync()
        lat.append((time.perf_counter() - t) * 1000)
        looked = index.at_rows([rows for rows, _ in res], index.row_generation)
        assert looked is not None  # nothing changes the catalog during the benchmark
        found.extend((ids, vectors) for (ids, *_), (_, vectors) in zip(looked, res,
                                                                          strict=True))
    return np.asarray(lat), found


def build(vectors: np.ndarray, ids: list[str], args, kind: str, device: str,
          exact_threshold: int) -> tuple[CandidateIndex, float, float]:
    gc.collect()
    before = resident_mb()
    index = CandidateIndex(vectors.shape[1], exact_threshold=exact_threshold,
                           approximate_kind=kind, ivf_nprobe=args.nprobe[0], device=device,
                           hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    t = time.perf_counter()
    with tqdm(total=len(ids), desc=f"build {kind if exact_threshold < len(ids) else 'flat'}",
              unit="item") as bar:
        for start in range(0, len(ids), args.chunk):
            index.upsert(ids[start:start + args.chunk], vectors[start:start + args.chunk])
            bar.update(min(args.chunk, len(ids) - start))
    return index, time.perf_counter() - t, resident_mb() - before


def index_mb(index: CandidateIndex) -> float:
    import faiss
    try:
        return len(faiss.serialize_index(index.ann.index)) / 2**20
    except Exception:  # GPU / torch indexes do not serialise: count their vectors
        return index.ann.index.ntotal * index.dim * 2 / 2**20


def row(label: str, build_s: float | None, rss: float | None, idx_mb: float | None,
        lat: np.ndarray, batch: int, rec: float) -> str:
    def cell(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)
    per_query_ms = np.mean(lat) / batch
    return (f"{label:<34} {cell(build_s, '.1f'):>8} {cell(rss, '.0f'):>8} "
            f"{cell(idx_mb, '.0f'):>8} {batch:>5} {np.percentile(lat, 50):8.3f} "
            f"{np.percentile(lat, 99):8.3f} {1000 / per_query_ms:9.0f} {rec:7.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.8, help="within-topic low-rank spread")
    ap.add_argument("--noise", type=float, default=0.35, help="isotropic noise")
    ap.add_argument("--sibling", type=float, default=1.0,
                    help="how far topics sit from their group (larger: harder)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--n", type=int, default=100, help="recall@n and results per query")
    ap.add_argument("--kinds", default="ivf", help="approximate kinds to build: ivf,hnsw")
    ap.add_argument("--nprobe", default="16,32,48", help="IVF nprobe values to sweep; first builds")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--batch", default="1,16", help="query batch sizes")
    ap.add_argument("--chunk", type=int, default=50_000, help="items per upsert")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-exact-peer", action="store_true",
                    help="skip timing the exact flat index (slow on a big CPU catalog)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    batches = [int(x) for x in args.batch.split(",")]

    print(f"retrieval benchmark: {args.items:,} items x {args.dim}-d, {args.topics} topics, "
          f"{args.queries} queries, recall@{args.n}, device {args.device}; data: spread "
          f"{args.spread}, noise {args.noise}, sibling {args.sibling}")
    t = time.perf_counter()
    space = TopicSpace(args.dim, args.topics, args.seed, spread=args.spread, noise=args.noise,
                       sibling=args.sibling)
    vectors = space.sample(args.items, args.seed + 1, desc="catalog")
    queries = space.sample(args.queries, args.seed + 2, desc="queries")
    ids = [str(i) for i in range(args.items)]
    truth = exact_top(vectors, queries, args.n, args.device)
    print(f"data and exact ground truth: {time.perf_counter() - t:.1f} s")

    header = (f"{'index':<34} {'build s':>8} {'rss MB':>8} {'index MB':>8} {'batch':>5} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'queries/s':>9} {'recall':>7}")
    lines = [header]
    configs: list[tuple[str, int]] = []
    if args.device == "cuda" or not args.no_exact_peer:
        configs.append(("flat", args.items + 1))
    if args.device == "cpu":
        configs += [(k, 0) for k in args.kinds.split(",") if k]
    for kind, threshold in configs:
        index, build_s, rss = build(vectors, ids, args, kind if threshold == 0 else "ivf",
                                    args.device, threshold)
        label = {"ivf": f"ivf nlist={getattr(index.ann.index, 'nlist', 0)} nprobe={args.nprobe[0]}",
                 "hnsw": f"hnsw M={args.hnsw_m}"}.get(index.kind, "exact")
        label += f" ({index.backend})"
        mb = index_mb(index)
        first = len(lines)
        for batch in batches:
            lat, found = time_searches(index, queries, args.n, batch, args.device)
            lines.append(row(label, build_s, rss, mb, lat, batch, recall(found, truth, args.n)))
            build_s = rss = mb = None
        for nprobe in args.nprobe[1:] if index.kind == "ivf" else []:
            index.ann.params.ivf_nprobe = nprobe
            lat, found = time_searches(index, queries, args.n, 1, args.device)
            lines.append(row(f"  nprobe={nprobe}", None, None, None, lat, 1,
                             recall(found, truth, args.n)))
        print("\n".join(lines[first:]), flush=True)
        del index
        gc.collect()
    print()
    print("\n".join(lines))
    print(f"\nprocess resident memory at the end: {resident_mb():.0f} MB")


if __name__ == "__main__":
    main()
