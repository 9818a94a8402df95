"""shapserve prediction service: FastAPI app, dynamic batcher, model engine."""

__version__ = "0.1.0"
