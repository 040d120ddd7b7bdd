"""Build of lrag_engine: the Python package plus the optional C++/CUDA extension."""
from setuptools import find_packages, setup

setup(
    name="lrag_engine",
    version="0.1.0",
    description="Retrieval-augmented autoregressive long-video generation engine (LongLive-RAG)",
    packages=find_packages(include=["lrag_engine", "lrag_engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "triton==3.6.0"],
        "gpu": ["triton", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["lrag-engine=lrag_engine.cli:main"]},
)
