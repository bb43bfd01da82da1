"""Client side and tools: the CLI, the HTTP client, the demo and its data."""
