"""The OpenAI-compatible HTTP layer (FastAPI); `create_app` builds it around an AsyncEngine."""
from server.api.app import create_app

__all__ = ["create_app"]
