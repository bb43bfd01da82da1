"""The FAISS structure under the candidate index (``models.index``): which kind a
catalog of a given size gets, building and training it, and how widely a search
must look for enough rows to survive filtering.

Below ``exact_threshold`` live items the structure is exact (flat inner product). At
or above it, it is approximate: IVF with 8-bit scalar-quantised lists (the default:
minutes to build at 1M items on two cores, a quarter of the memory of float vectors)
or an HNSW graph. On CUDA it stays exact at every size: a batched matrix product over
the whole catalog is fast on a GPU. It is a faiss GPU index when faiss has a GPU
build, else a torch one (``models.torch_flat``).

It knows rows, not item ids: ``models.index.CandidateIndex`` owns the rows (vectors,
ids, availability), adds them here and filters and re-ranks what comes back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

APPROXIMATE_KINDS = ("ivf", "hnsw")
# IVF: retrain the coarse quantiser once the catalog has grown this much since training
IVF_RETRAIN_GROWTH = 4.0
# Exact search switches from FAISS's one-query-at-a-time SIMD scan to a BLAS matrix
# product from this many queries on. FAISS 1.15's default (128,000) never switches,
# though micro-batched requests and the learner's next-action searches (64 queries)
# come in batches: measured over 10k items x 384-d, one thread, top-200,
# 1 query: 1.9 ms scan vs 4.1 ms BLAS; 4: 7.7 vs 4.2; 64: 124 vs 28.
BLAS_FROM_QUERIES = 4
faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` items: a power of two near 4 * sqrt(n) (4096 at 1M)."""
    return int(2 ** round(np.log2(max(4 * np.sqrt(max(n, 1)), 64))))


# FAISS's OpenMP threads per search, for the whole process (``set_search_threads``);
# None: searches keep whatever their thread has
_search_threads: int | None = None


def set_search_threads(n: int | None) -> None:
    """Threads FAISS's OpenMP pool may use per search, in this process (None: leave
    each thread's own). A serving process runs searches from its own request threads;
    a second pool of spinning OpenMP threads on top of them costs more than it gains
    (on 2 cores: 1.5 -> 0.9 ms per request at batch 16).

    Applied around each search (``search_threads``), not once per thread: OpenMP's
    thread count is per thread and torch shares it (with torch imported first, both
    use its libgomp), and torch sets it to its own count at a thread's first torch
    operation, so a count set when a thread starts does not last."""
    global _search_threads
    _search_threads = None if n is None else max(1, n)


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Within: this thread's OpenMP work (FAISS's and torch's) uses ``n`` threads;
    after, the thread's count is what it was."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_threads() -> contextlib.AbstractContextManager[None]:
    """Within: this thread's FAISS searches use the process's ``set_search_threads``."""
    n = _search_threads
    return contextlib.nullcontext() if n is None else _omp_threads(n)


# FAISS's OpenMP threads where nothing set them (OMP_NUM_THREADS, else a thread per
# core), read at import
BUILD_THREADS = faiss.omp_get_max_threads()


def build_threads() -> contextlib.AbstractContextManager[None]:
    """Within: this thread's FAISS work uses ``BUILD_THREADS``. A build (k-means,
    graph construction, assigning rows to lists) is rare and large, unlike a search,
    so it keeps the machine's threads whatever the searches use."""
    return _omp_threads(BUILD_THREADS)


def faiss_has_gpu() -> bool:
    """True when this faiss build can place indexes on a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class AnnParams:
    """How the structure is chosen and tuned (``RECSVC_INDEX_*`` settings)."""

    exact_threshold: int = 50_000
    approximate_kind: str = "ivf"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    ivf_nprobe: int = 16  # lists scanned at least (a search widens it: ``_widen``)
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.approximate_kind not in APPROXIMATE_KINDS:
            raise ValueError(f"approximate_kind must be one of {APPROXIMATE_KINDS}")


class AnnStructure:
    """One FAISS (or torch) index over rows ``0..n-1`` of the caller's vectors."""

    def __init__(self, dim: int, params: AnnParams) -> None:
        self.dim = dim
        self.params = params
        self._gpu_res = None
        if params.device == "cuda" and faiss_has_gpu():
            self._gpu_res = faiss.StandardGpuResources()
        self.kind = "flat"  # ``flat`` (exact), ``ivf`` or ``hnsw``
        self.trained_on = 0  # rows the IVF quantiser was trained on
        self.index: Any = self._new("flat", np.zeros((0, dim), dtype=np.float32))

    @property
    def backend(self) -> str:
        """Where searches run: ``faiss-cpu``, ``faiss-gpu`` or ``torch-cuda``."""
        if self.params.device != "cuda":
            return "faiss-cpu"
        return "faiss-gpu" if self._gpu_res is not None else "torch-cuda"

    @property
    def approximate(self) -> bool:
        return self.kind in APPROXIMATE_KINDS

    def wanted_kind(self, live: int) -> str:
        """The kind for ``live`` items."""
        p = self.params
        return p.approximate_kind if live >= p.exact_threshold and p.device != "cuda" else "flat"

    def outgrown(self, live: int) -> bool:
        """An IVF structure whose catalog grew past IVF_RETRAIN_GROWTH x what trained it."""
        return self.kind == "ivf" and live > IVF_RETRAIN_GROWTH * self.trained_on

    def rebuild(self, kind: str, vectors: np.ndarray) -> None:
        """Index exactly ``vectors`` (the rows, compacted) as ``kind``. A trained IVF
        structure that has not outgrown its training keeps its coarse quantiser (only
        the lists are refilled), so compaction costs no k-means."""
        with build_threads():
            if kind == "ivf" and self.kind == "ivf" and not self.outgrown(len(vectors)):
                self.index.reset()
            else:
                self.index = None  # free the old structure before building the new one
                self.index = self._new(kind, vectors)
            if len(vectors):
                self.index.add(vectors)

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (numbered on from the last)."""
        with build_threads():
            self.index.add(vectors)

    def search(self, queries: np.ndarray, fetch: int, n_rows: int) -> np.ndarray:
        """Up to ``fetch`` rows per query (-1 where fewer), best first by the structure's
        (possibly quantised) inner product; ``n_rows`` rows are indexed."""
        self._widen(fetch, n_rows)
        with search_threads():
            return self.index.search(queries, fetch)[1]

    def _widen(self, fetch: int, n_rows: int) -> None:
        """Let the approximate structure return ``fetch`` results: HNSW's beam must be at
        least that wide, and IVF must scan lists holding several times that many rows."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.params.ef_search, 2 * fetch)
        elif self.kind == "ivf":
            per_list = max(n_rows / self.index.nlist, 1.0)
            self.index.nprobe = int(min(self.index.nlist, max(self.params.ivf_nprobe,
                                                              np.ceil(4 * fetch / per_list))))

    def _new(self, kind: str, vectors: np.ndarray) -> Any:
        """A FAISS (or torch) index of ``kind``, trained on ``vectors`` if it needs it."""
        self.kind = kind
        p = self.params
        index: Any
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
            index.hnsw.efSearch = p.ef_search
            return index
        if kind == "ivf":
            nlist = ivf_lists(len(vectors))
            self._quantizer = faiss.IndexFlatIP(self.dim)  # the index does not own it
            index = faiss.IndexIVFScalarQuantizer(self._quantizer, self.dim, nlist,
                                                  faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = 10
            index.cp.seed = p.seed
            sample = min(len(vectors), 32 * nlist)
            rows = np.random.default_rng(p.seed).choice(len(vectors), sample, replace=False)
            index.train(vectors[np.sort(rows)])
            index.nprobe = p.ivf_nprobe
            self.trained_on = len(vectors)
            return index
        if self._gpu_res is not None:
            return faiss.index_cpu_to_gpu(self._gpu_res, 0, faiss.IndexFlatIP(self.dim))
        if p.device == "cuda":
            from models.torch_flat import TorchFlatIP
            return TorchFlatIP(self.dim)
        return faiss.IndexFlatIP(self.dim)
