"""Exact inner-product search on a CUDA device with torch.

Used for the GPU path when the installed faiss has no GPU build (``faiss-cpu``
beside a CUDA torch, the usual case, since faiss-gpu wheels pin their own CUDA
runtime). It exposes the slice of the faiss ``Index`` interface that
``CandidateIndex`` uses (``add``, ``search``, ``reset``, ``ntotal``), so the rest of
the index code is the same on either backend.

Vectors live on the GPU in float16 (half the memory: 10M x 384 is 7.7 GB) and are
scored with one matrix product per query batch; ``CandidateIndex`` re-ranks what
comes back with its float32 copy, so fp16 only affects which rows reach the cut.
"""

from __future__ import annotations

import numpy as np
import torch


class TorchFlatIP:
    def __init__(self, dim: int, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 chunk_rows: int = 4_000_000) -> None:
        self.d = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_rows = chunk_rows  # bounds the (queries x rows) score matrix
        self._data = torch.empty((0, dim), dtype=dtype, device=self.device)
        self.ntotal = 0

    def reset(self) -> None:
        self.ntotal = 0

    def add(self, vectors: np.ndarray) -> None:
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        need = self.ntotal + len(x)
        if need > len(self._data):  # grow geometrically: appends stay amortised O(1)
            grown = torch.empty((max(need, 2 * len(self._data), 1024), self.d),
                                dtype=self.dtype, device=self.device)
            grown[: self.ntotal] = self._data[: self.ntotal]
            self._data = grown
        self._data[self.ntotal:need] = x.to(self.device, self.dtype, non_blocking=False)
        self.ntotal = need

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query by inner product: ``(scores, rows)``, -1 padded."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(
            self.device, self.dtype)
        k_eff = min(k, self.ntotal)
        # bound the (queries x rows) score block to ~2^27 entries (256 MB in half)
        rows = min(self.chunk_rows, max(65_536, (1 << 27) // max(len(q), 1)))
        best_s = torch.empty((len(q), 0), dtype=self.dtype, device=self.device)
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device=self.device)
        for start in range(0, self.ntotal, rows):
            block = self._data[start: min(start + rows, self.ntotal)]
            s, i = torch.topk(q @ block.T, min(k_eff, len(block)), dim=1)  # in half
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + start], dim=1)
            if best_s.shape[1] > k_eff:
                best_s, pick = torch.topk(best_s, k_eff, dim=1)
                best_i = torch.gather(best_i, 1, pick)
        best_s = best_s.float()
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        out_s[:, : best_s.shape[1]] = best_s.cpu().numpy()
        out_i[:, : best_i.shape[1]] = best_i.cpu().numpy()
        return out_s, out_i
