"""Real-time vehicle tracking: GPS pings in, H3-indexed binary position batches out over SSE."""

__version__ = "0.1.0"
