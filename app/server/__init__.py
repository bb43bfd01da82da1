"""The API server process: HTTP routes, the engine that serves slates."""
