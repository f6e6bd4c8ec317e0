"""Deprecated module name of ``sdrt.batcher`` (the request batcher was ``sdrt.Engine``; "engine"
now means a compiled network only). Kept for one release."""
from .batcher import Batcher, BatcherBusy, BatcherClosed, Engine, EngineBusy, EngineClosed, Request, RequestFuture  # noqa: F401
