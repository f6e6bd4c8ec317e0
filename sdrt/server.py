"""Deprecated module name of ``sdrt.serving.app`` (kept for one release)."""
from .serving.app import *  # noqa: F401,F403
from .serving.app import APIError, ServerConfig, ServerState, Txt2Img, create_app  # noqa: F401
