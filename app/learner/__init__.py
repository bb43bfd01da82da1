"""The learner: its process (``recsvc learner``) and the worker that learns from the
event stream (run inside ``recsvc serve`` too, unless ``RECSVC_ROLE=api``)."""
