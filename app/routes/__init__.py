"""The HTTP API's routes, one module per area of API.md; ``app.api`` mounts them."""
