"""sdrt.export: ONNX exporters and the engine-folder cache (installed from the repository's export/).

    from sdrt.export import build_onnxruntime, Profile
    build_onnxruntime(components, "engines/tiny", precision="float32")
"""
from .build import build_onnxruntime, check_artifact, read_manifest  # noqa: F401
from .specs import DEFAULT_NETWORKS, NETWORKS, Profile  # noqa: F401
