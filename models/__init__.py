"""The learning core of recsvc: pure computation (torch, faiss, transformers, numpy).

Nothing in this package performs network or store I/O, and nothing here imports
``app``; the service wires these pieces to the outside world.
"""
