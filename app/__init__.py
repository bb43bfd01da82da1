"""recsvc service layer: HTTP API, stores, learner worker and CLI (all the I/O)."""
