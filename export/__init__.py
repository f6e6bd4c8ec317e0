"""sdrt.export: ONNX exporters and engine builders (installed from the repository's export/).

Empty in this release: the exporters arrive with the ONNX Runtime backend.
"""
