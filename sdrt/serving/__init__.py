"""Serving: the web UI's HTTP API (``app``: a FastAPI app over an ``sdrt.Batcher``) and how it
runs (``deploy``: Ray Serve replicas, or uvicorn in one process)."""
