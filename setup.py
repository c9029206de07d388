"""Build script for layoutgen.

The folder `kernels/` is installed as the subpackage `layoutgen.kernels` (there is an unrelated PyPI package named
`kernels`, so it must never be importable at top level).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["layoutgen", "layoutgen.*"])
packages.append("layoutgen.kernels")

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
        # Triton ships wheels for Linux x86_64 only; elsewhere the kernels fall back to their PyTorch references.
        'triton; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        # diffusers is a test-only reference for the schedulers and the UNet.
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "diffusers"],
    },
    entry_points={"console_scripts": ["layoutgen=layoutgen.cli:main"]},
)
