"""Where the compiled noise ops come from: the prebuilt `layoutgen._C` (setup.py), a JIT build of csrc/ with
torch.utils.cpp_extension.load on first use, or none (the PyTorch references run). noise_ops.py keeps the status.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

EXTENSION_ENV = "LAYOUTGEN_NOISE_OPS"   # auto | prebuilt | jit | off
CACHE_ENV = "LAYOUTGEN_CACHE_DIR"       # where JIT builds go (default: ~/.cache/layoutgen)
CSRC_ENV = "LAYOUTGEN_CSRC_DIR"         # the csrc/ folder for JIT builds (default: the repository's, beside kernels/)
_MODES = ("auto", "prebuilt", "jit", "off")
_OPS = ("add_noise", "velocity", "add_noise_philox", "ddpm_step", "ddim_step")


@dataclasses.dataclass(frozen=True)
class NoiseOpsStatus:
    """Which implementation the noise ops have: `path` is "prebuilt" (layoutgen._C from setup.py), "jit" (built on
    first use), "reference" (PyTorch only) or "pending" (layoutgen._C absent, JIT build not tried yet); `reason` says
    why; `devices` lists the devices with compiled kernels; `location` is the loaded library file, if any."""

    path: str
    reason: str
    devices: tuple[str, ...] = ()
    location: str | None = None

    @property
    def compiled(self) -> bool:
        return self.path in ("prebuilt", "jit")

    def describe(self) -> str:
        if self.compiled:
            where = "layoutgen._C" if self.path == "prebuilt" else "JIT build"
            return f"compiled ({where}; {', '.join(self.devices)})"
        return self.path


def _has_cuda_runtime(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))


def cuda_toolkit_root() -> str | None:
    """The CUDA toolkit to build with, where torch.utils.cpp_extension would guess a wrong one, else None.

    Without CUDA_HOME/CUDA_PATH, cpp_extension takes the folder above the first `nvcc` on PATH. Where that nvcc is a
    wrapper script (/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) the folder (/usr/local) has neither
    the CUDA headers nor libcudart, and the link fails (-lcudart). nvcc itself says where its toolkit is (TOP=...)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None or _has_cuda_runtime(os.path.dirname(os.path.dirname(nvcc))):
        return None
    try:
        probe = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("#$ TOP="):
            root = os.path.normpath(line.split("=", 1)[1].strip().strip('"'))
            return root if _has_cuda_runtime(root) else None
    return None


def use_cuda_toolkit_root(cpp_extension) -> None:
    """Points torch.utils.cpp_extension (already imported) at cuda_toolkit_root(), where that differs from its guess.
    Nothing to do (and no nvcc to run) for a torch without CUDA, which builds the CPU ops only."""
    if torch.version.cuda is None:
        return
    root = cuda_toolkit_root()
    if root is not None and cpp_extension.CUDA_HOME is not None and not _has_cuda_runtime(cpp_extension.CUDA_HOME):
        cpp_extension.CUDA_HOME = root
        os.environ["CUDA_HOME"] = root


def cuda_build_blocker(cpp_extension) -> str | None:
    """Why the CUDA kernels cannot be built here (None: they can). Besides a torch without CUDA or no nvcc: without a
    visible GPU, cpp_extension picks the CUDA architectures only from TORCH_CUDA_ARCH_LIST (unset, it fails with
    IndexError in _get_cuda_arch_flags: torch 2.11 and 2.13 alike)."""
    if os.environ.get("LAYOUTGEN_BUILD_CUDA", "1") in ("", "0"):
        return "LAYOUTGEN_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return "torch has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return "no GPU visible and TORCH_CUDA_ARCH_LIST unset (e.g. TORCH_CUDA_ARCH_LIST=9.0 builds for an H100)"
    return None


def _mode() -> str:
    mode = os.environ.get(EXTENSION_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        warnings.warn(f"environment variable {EXTENSION_ENV}: unknown value {mode!r}, using 'auto'; choose one of "
                      f"{list(_MODES)}", RuntimeWarning, stacklevel=2)
        return "auto"
    return mode


def _ops_registered() -> bool:
    return hasattr(torch.ops, "layoutgen") and all(hasattr(torch.ops.layoutgen, name) for name in _OPS)


def _kernel_devices() -> tuple[str, ...]:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has("layoutgen::add_noise", key))


def _csrc_dir() -> Path:
    return Path(os.environ.get(CSRC_ENV) or Path(__file__).resolve().parent.parent / "csrc")


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layoutgen"
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__.split('+')[0]}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / "noise_ops" / tag


def _try_prebuilt() -> NoiseOpsStatus:
    try:
        module = importlib.import_module("layoutgen._C")
    except Exception as error:  # noqa: BLE001 - not built (ImportError), built against another torch (undefined
        # symbols), or its TORCH_LIBRARY refused (another library defined the namespace): say why, go on
        return NoiseOpsStatus("pending", f"layoutgen._C is not importable ({type(error).__name__}: {error})")
    if not _ops_registered():
        return NoiseOpsStatus("pending", "layoutgen._C loaded but registered no torch.ops.layoutgen ops")
    return NoiseOpsStatus("prebuilt", "layoutgen._C built by setup.py", _kernel_devices(),
                          getattr(module, "__file__", None))


def _try_jit() -> NoiseOpsStatus:
    """Builds csrc/ with torch.utils.cpp_extension.load (ninja), CUDA sources too where torch has CUDA and nvcc."""
    csrc = _csrc_dir()
    sources = [csrc / "noise_ops.cpp"]
    if not sources[0].is_file():
        return NoiseOpsStatus("reference", f"no compiled extension: layoutgen._C is not built and the C++ sources are "
                                           f"not at {csrc} for a JIT build")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return NoiseOpsStatus("reference", "no compiled extension: layoutgen._C is not built and a JIT build needs "
                                           "ninja (pip install ninja)")
    use_cuda_toolkit_root(cpp_extension)
    cuda_sources = sorted((csrc / "cuda").glob("*.cu"))
    with_cuda = bool(cuda_sources) and cuda_build_blocker(cpp_extension) is None
    openmp = sys.platform.startswith("linux")
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)

    def build(cuda: bool) -> None:
        cpp_extension.load(
            name="layoutgen_noise_ops", sources=[str(p) for p in sources + (cuda_sources if cuda else [])],
            extra_include_paths=[str(csrc)], extra_cflags=["-O3"] + (["-fopenmp"] if openmp else []),
            extra_ldflags=["-fopenmp"] if openmp else [], extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir), is_python_module=False, verbose=False, with_cuda=cuda)

    note = ""
    try:
        try:
            build(with_cuda)
        except Exception as cuda_error:  # noqa: BLE001 - then the CPU ops alone, as setup.py does
            if not with_cuda:
                raise
            note = f" (CPU ops only: the CUDA build failed with {type(cuda_error).__name__})"
            build(False)
    except Exception as error:  # noqa: BLE001 - a compiler, linker or loader failure: fall back, say why
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first_error = next((line for line in lines if " error:" in line or "#error" in line),  # a compiler diagnostic
                           lines[-1] if lines else "")
        return NoiseOpsStatus("reference", f"no compiled extension: layoutgen._C is not built and the JIT build in "
                                           f"{build_dir} failed ({type(error).__name__}: {first_error[:300]})")
    if not _ops_registered():
        return NoiseOpsStatus("reference", "the JIT build loaded but registered no torch.ops.layoutgen ops")
    return NoiseOpsStatus("jit", f"layoutgen._C is not built; built from {csrc} on first use, cached in {build_dir}"
                                 f"{note}",
                          _kernel_devices(), str(build_dir))
