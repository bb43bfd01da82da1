"""The HTTP API's routes, one module per area of API.md; ``app.server.api`` mounts them."""
