"""Deprecated module name of ``sdrt.serving.deploy`` (kept for one release)."""
from .serving.deploy import *  # noqa: F401,F403
from .serving.deploy import Scaling, build_application, deployment_options, run  # noqa: F401
