"""Compiles the CUDA sources (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, so that a CUDA compile error fails CI
even on a machine without a GPU (skipped cleanly where nvcc is not on PATH).

The headers. The compile uses torch's own include tree (torch.utils.cpp_extension.include_paths()) and the flags
torch's CUDA extensions get (COMMON_NVCC_FLAGS, the C++ standard, the C++11 ABI). A CPU-only torch wheel ships the
CUDA headers of c10 and ATen (c10/cuda/*, ATen/cuda/*) but not the one header CMake generates for a CUDA build,
c10/cuda/impl/cuda_cmake_macros.h, whose whole content is configuration: `#define C10_CUDA_BUILD_SHARED_LIBS` and
the TORCH_CUDA_VERSION_{MAJOR,MINOR,PATCH,BUILD} numbers of the toolkit (PyTorch's cuda_cmake_macros.h.in). Where it
is missing, the test generates exactly that file, with the local nvcc's version, in a temporary include folder, and
checks that it is the only file there: no declaration is stubbed, every other header (and every template our kernels
instantiate) is torch's real one, so the compile fails on any error a CUDA build of torch would report. It cannot
catch what only the link or the GPU shows (the CUDA libraries are not in a CPU wheel): the CUDA tests on a GPU
machine cover that, and this test also checks that every layoutgen:: symbol the object needs is defined by the built
CPU extension (the declarations in csrc/noise_ops.h match their definitions in csrc/noise_ops.cpp).

csrc/cuda includes only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls cuBLAS / cuSPARSE / cuSOLVER
headers that a bare CUDA toolkit may lack).
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
GENERATED = "c10/cuda/impl/cuda_cmake_macros.h"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


def nvcc_version() -> tuple[int, int, int]:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"V(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(g) for g in match.groups())


def cxx_standard() -> str:
    """The -std torch's own cpp_extension passes to nvcc for this torch version."""
    return "c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "c++17"


def generated_includes(folder: Path) -> list[str]:
    """-I for the CMake-generated CUDA config header where the torch include tree lacks it (CPU wheels)."""
    if any((Path(p) / GENERATED).is_file() for p in cpp_extension.include_paths()):
        return []
    major, minor, patch = nvcc_version()
    header = folder / GENERATED
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n// Generated as PyTorch's CMake does from c10/cuda/impl/cuda_cmake_macros.h.in\n"
                      "#define C10_CUDA_BUILD_SHARED_LIBS\n"
                      f"#define TORCH_CUDA_VERSION_MAJOR {major}\n#define TORCH_CUDA_VERSION_MINOR {minor}\n"
                      f"#define TORCH_CUDA_VERSION_PATCH {patch}\n#define TORCH_CUDA_VERSION_BUILD 0\n")
    return [f"-I{folder}"]


def test_there_are_cuda_sources():
    assert SOURCES, "no csrc/cuda/*.cu"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm80_and_sm90(source, tmp_path):
    extra = generated_includes(tmp_path / "generated")
    if extra:  # only the one configuration header, nothing else
        files = [p.relative_to(tmp_path / "generated").as_posix() for p in (tmp_path / "generated").rglob("*")
                 if p.is_file()]
        assert files == [GENERATED]
    obj = tmp_path / (source.stem + ".o")
    cmd = ["nvcc", "-c", str(source), "-o", str(obj), f"-std={cxx_standard()}", "-O3", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *cpp_extension.COMMON_NVCC_FLAGS,
           *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
           *extra, *[f"-I{p}" for p in cpp_extension.include_paths()],
           f"-I{sysconfig.get_paths()['include']}", f"-I{REPO / 'csrc'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-6000:]}"
    ours = [line for line in proc.stderr.splitlines() if "csrc/" in line and "warning" in line.lower()]
    assert not ours, "nvcc warnings in csrc:\n" + "\n".join(ours)
    # Both architectures are in the object's fat binary.
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, listing
    # Every layoutgen:: function the CUDA object calls is defined by the CPU extension it links with.
    built = sorted((REPO / "layoutgen").glob("_C*.so"))
    if built and shutil.which("nm"):
        needed = subprocess.run(["nm", "-C", "--undefined-only", str(obj)], capture_output=True, text=True).stdout
        defined = subprocess.run(["nm", "-C", "-D", "--defined-only", str(built[0])], capture_output=True,
                                 text=True).stdout
        names = [line.split(" U ")[-1].strip() for line in needed.splitlines() if "layoutgen::" in line]
        assert names, needed  # the CUDA ops share the checks of noise_ops.cpp
        missing = [name for name in names if name not in defined]
        assert not missing, f"undefined in {built[0].name}: {missing}"
