from setuptools import setup

# Install torch first (`pip install torch==2.13.0`, a CPU build) and the CLIP vocabulary with
# `pip install --no-deps open_clip_torch==3.3.0`: scripts/setup.sh does both. A bare torch
# requirement would pull a CUDA build of several GB, and open_clip_torch's own dependencies
# (torchvision) break the CPU torch.
setup(
    name="sdrt",
    version="0.1.0",
    description="A compiled inference runtime for Stable Diffusion",
    python_requires=">=3.10",
    packages=["sdrt", "sdrt.backends", "sdrt.export"],
    package_dir={"sdrt": "sdrt", "sdrt.export": "export"},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors>=0.4",
        "torchsde>=0.2.6",
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        "gpu": ["cuda-python>=12", "onnxruntime-gpu>=1.18"],
        "serve": ["ray[serve]>=2.60", "fastapi>=0.110", "uvicorn>=0.29", "webuiapi>=0.9", "requests"],
        "bench": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "hypothesis>=6", "lark>=1.1", "torchdiffeq", "scipy", "matplotlib>=3.7"],  # + k-diffusion --no-deps
    },
    entry_points={"console_scripts": ["sdrt=sdrt.cli:main"]},
)
