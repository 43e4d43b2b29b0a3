"""realtime: model predictions for live applications over one persistent WebSocket."""

__version__ = "0.1.0"
