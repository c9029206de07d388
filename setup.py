"""Build script for layoutgen.

The folder `kernels/` is installed as the subpackage `layoutgen.kernels` (there is an unrelated PyPI package named
`kernels`, so it must never be importable at top level).

The noise-op extension `layoutgen._C` (csrc/) is built with the torch already installed, hence
`pip install --no-build-isolation`: a CppExtension always, a CUDAExtension (csrc/cuda/*.cu too) where torch has CUDA
and nvcc is found, and a GPU is visible or TORCH_CUDA_ARCH_LIST names the architectures (kernels/noise_ops_build.py
decides, for the JIT build too, and finds the real toolkit behind an nvcc wrapper script). The build never fails the
install: if the CUDA build fails it retries without CUDA, and if that fails too the package installs without the
extension (layoutgen.kernels.noise_ops then builds it on first use with torch.utils.cpp_extension.load, or falls back
to PyTorch). LAYOUTGEN_NO_EXTENSION=1 skips it; LAYOUTGEN_BUILD_CUDA=0 builds the CPU part only.
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["layoutgen", "layoutgen.*"])
packages.append("layoutgen.kernels")


def _noise_op_extension():
    """(ext_modules, cmdclass) for layoutgen._C, or ([], {}) where torch is missing or the build is switched off."""
    if os.environ.get("LAYOUTGEN_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("layoutgen: torch is not importable at build time; skipping the noise-op extension "
              "(install torch first and use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    # The CUDA checks the JIT build uses too (kernels/ is not importable as a package at build time).
    spec = importlib.util.spec_from_file_location("_layoutgen_noise_ops_build",
                                                  os.path.join(here, "kernels", "noise_ops_build.py"))
    build_helpers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build_helpers  # dataclasses look their module up there
    spec.loader.exec_module(build_helpers)
    build_helpers.use_cuda_toolkit_root(cpp_extension)
    cpp_sources = ["csrc/noise_ops.cpp"]
    cuda_sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
    openmp = sys.platform.startswith("linux")  # at::parallel_for runs on OpenMP threads only when compiled with it
    cxx_flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []
    cuda_blocker = build_helpers.cuda_build_blocker(cpp_extension) if cuda_sources else "no CUDA sources"
    want_cuda = cuda_blocker is None
    if not want_cuda and torch.version.cuda is not None:
        print(f"layoutgen: building the CPU noise ops only: {cuda_blocker}", file=sys.stderr)

    if want_cuda:
        ext = cpp_extension.CUDAExtension("layoutgen._C", cpp_sources + cuda_sources,
                                          include_dirs=[os.path.join(here, "csrc")],
                                          extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                                          extra_link_args=link_flags)
    else:
        ext = cpp_extension.CppExtension("layoutgen._C", cpp_sources, include_dirs=[os.path.join(here, "csrc")],
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    class BuildNoiseOps(cpp_extension.BuildExtension):
        """Never fails the install: CUDA build -> CPU-only build -> no extension (with a message each time)."""

        def build_extensions(self):
            self._failed = set()
            super().build_extensions()
            # A failed extension has no file to copy into the source tree or to put in the wheel.
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, ext):
            try:
                return super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler or ninja failure
                if ext.name == "layoutgen._C" and any(s.endswith(".cu") for s in ext.sources):
                    print(f"layoutgen: building the CUDA noise ops failed ({error}); retrying without CUDA",
                          file=sys.stderr)
                    # Same extension (and the flags BuildExtension added to it) without the .cu files and the CUDA
                    # libraries (libcudart is in CUDA_HOME, which may be what failed); the CPU object is reused.
                    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
                    try:
                        return super().build_extension(ext)
                    except Exception as cpu_error:  # noqa: BLE001
                        error = cpu_error
                print(f"layoutgen: building the noise-op extension failed ({error}); installing without it "
                      "(layoutgen.kernels.noise_ops will try a JIT build on first use)", file=sys.stderr)
                self._failed.add(ext.name)
                return None

    return [ext], {"build_ext": BuildNoiseOps}


ext_modules, cmdclass = _noise_op_extension()

setup(
    name="layoutgen",
    version="0.1.0",
    description="Fast layout-image generation: a multi-head autoencoder, latent diffusion and ControlNet with fused GPU kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"layoutgen.kernels": "kernels"},
    package_data={"layoutgen.training": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pandas",
        "pyyaml",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pillow",
        # Builds the noise-op extension on first use where layoutgen._C was not built (torch.utils.cpp_extension).
        "ninja",
        # Triton ships wheels for Linux x86_64 only; elsewhere the kernels fall back to their PyTorch references.
        'triton; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        # diffusers is a test-only reference for the schedulers and the UNet.
        # tensorboard: the trainer's optional `training.tensorboard` logging (its test needs it).
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "diffusers", "tensorboard"],
    },
    entry_points={"console_scripts": ["layoutgen=layoutgen.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
