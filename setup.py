"""Build of lrag_engine: the Python package plus the optional C++/CUDA extension.

The extension ``lrag_engine._C`` needs only pybind11 and a C++17 compiler (never torch).
With nvcc found (``$CUDA_HOME/bin/nvcc`` or on PATH) the CUDA copy helpers in csrc/cuda
are compiled in with ``LRAG_WITH_CUDA`` and the CUDA runtime is linked statically, so the
module imports on machines without a GPU driver. ``LRAG_NO_CUDA=1`` skips CUDA; a
missing nvcc builds the CPU-only module with a warning.
"""
import glob
import os
import shutil
import subprocess
import warnings

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # metadata-only commands (egg_info without the build requirements)
    Pybind11Extension = build_ext = None

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    if os.environ.get("LRAG_NO_CUDA", "0") not in ("", "0"):
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _relative(paths: list[str]) -> list[str]:
    # setuptools wants source paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions(cuda_home: str | None) -> list:
    if Pybind11Extension is None:
        warnings.warn("lrag_engine: pybind11 is not importable; the paged-memory extension lrag_engine._C "
                      "is not built (history falls back to the torch store)")
        return []
    sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "core", "*.cpp"))) + ["csrc/bindings.cpp"]
    ext = Pybind11Extension("lrag_engine._C", sources, include_dirs=["csrc"], cxx_std=17,
                            extra_compile_args=["-O2"])
    if cuda_home is not None:
        lib_dir = next((d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"))
                        if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
        if lib_dir is None:
            warnings.warn(f"lrag_engine: nvcc found under {cuda_home} but no libcudart_static.a; "
                          "building the CPU-only extension")
            return [ext]
        ext.define_macros.append(("LRAG_WITH_CUDA", "1"))
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        ext.library_dirs.append(lib_dir)
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.cuda_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        ext.nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return [ext]


if build_ext is not None:
    class BuildExt(build_ext):
        """Compiles csrc/cuda/*.cu with nvcc into objects linked into the extension."""

        def build_extension(self, ext):
            cuda_sources = getattr(ext, "cuda_sources", [])
            if cuda_sources:
                out_dir = os.path.join(self.build_temp, "cuda")
                os.makedirs(out_dir, exist_ok=True)
                for src in cuda_sources:
                    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
                    cmd = [ext.nvcc, "-std=c++17", "-O2", "-Xcompiler", "-fPIC", "-Icsrc", "-c", src, "-o", obj]
                    print(" ".join(cmd))
                    subprocess.check_call(cmd, cwd=ROOT)
                    ext.extra_objects.append(obj)
            super().build_extension(ext)

    CMDCLASS = {"build_ext": BuildExt}
else:
    CMDCLASS = {}

CUDA_HOME = _find_cuda_home()
if CUDA_HOME is None and Pybind11Extension is not None:
    reason = "LRAG_NO_CUDA is set" if os.environ.get("LRAG_NO_CUDA", "0") not in ("", "0") else "nvcc not found"
    warnings.warn(f"lrag_engine: {reason}; building the CPU-only extension (host<->GPU page copies "
                  "fall back to torch copies)")

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
        "test": ["pytest", "hypothesis", "pytest-benchmark", "triton==3.6.0", "pybind11>=2.12", "nvidia-ml-py"],
        "gpu": ["triton", "nvidia-ml-py"],
        # WanTransformer3DModel integration (lrag_engine.integrations.diffusers)
        "diffusers": ["diffusers>=0.33"],
        # Prompts in, video out: UMT5 (transformers), the Wan VAE (diffusers), mp4 (PyAV)
        "pipeline": ["transformers>=4.45", "sentencepiece", "diffusers>=0.33", "av", "pillow"],
        # Serving: the streaming WebSocket/HTTP server (lrag-engine serve) and its test client
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "websockets>=12"],
        # Beyond one GPU: Ray Serve replicas (lrag_engine.serving.ray_app)
        "ray": ["ray[serve]>=2.30"],
    },
    package_data={"lrag_engine.encoder": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["lrag-engine=lrag_engine.cli:main"]},
    ext_modules=_extensions(CUDA_HOME),
    cmdclass=CMDCLASS,
    zip_safe=False,
)
