"""The encoder reproduces sentence-transformers' embeddings of the bundled MiniLM."""

import numpy as np
import pytest

from models.encoder import default_model_path, normalise_text, text_key

TEXTS = [
    "Toy Story (1995). Animation, Children's, Comedy",
    "24 year old male technician, weekday evening",
    "a much longer text " * 40,
    "x",
]


def test_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(default_model_path(), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True, batch_size=2)
    got = encoder.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - expected).max() < 1e-4


def test_batched_equals_one_by_one(encoder):
    together = encoder.encode(TEXTS)
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_cache_key_ignores_whitespace_but_not_words(encoder):
    assert normalise_text("  a   b\n c ") == "a b c"
    assert text_key(encoder.model_id, "a  b") == text_key(encoder.model_id, " a b ")
    assert text_key(encoder.model_id, "a b") != text_key(encoder.model_id, "a c")
    assert text_key("other-model", "a b") != text_key(encoder.model_id, "a b")


def test_empty_batch(encoder):
    assert encoder.encode([]).shape == (0, 384)
