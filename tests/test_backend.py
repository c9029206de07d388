"""The kernel backend switch: names, precedence, the environment variable, nesting."""
import pytest

from layoutgen import kernels
from layoutgen.kernels import backend


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend.kernel_backend, "process_default", None)


def test_default_is_auto():
    assert kernels.get_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert kernels.get_backend() == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=r"LAYOUTGEN_KERNEL_BACKEND.*'cuda-magic'.*\['auto', 'triton', 'reference'\]"):
        kernels.get_backend()


def test_set_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    kernels.set_backend("triton")
    assert kernels.get_backend() == "triton"


def test_use_backend_nests_and_restores():
    kernels.set_backend("reference")
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("auto"):
            assert kernels.get_backend() == "auto"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "reference"


def test_use_backend_restores_after_an_error():
    with pytest.raises(RuntimeError):
        with kernels.use_backend("reference"):
            raise RuntimeError("boom")
    assert kernels.get_backend() == "auto"


@pytest.mark.parametrize("call", [kernels.set_backend, lambda n: kernels.use_backend(n).__enter__()])
def test_unknown_names_are_refused(call):
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        call("fast")


def test_use_kernel_choice_sets_both_switches_and_restores(monkeypatch):
    monkeypatch.delenv("LAYOUTGEN_GN_CHUNKED", raising=False)
    chunked = backend.group_norm_chunked_path
    with backend.use_kernel_choice("reference", "one-pass"):
        assert (kernels.get_backend(), chunked.get()) == ("reference", "one-pass")
        with backend.use_kernel_choice(group_norm_chunked="two-pass"):   # None leaves the backend as it is
            assert (kernels.get_backend(), chunked.get()) == ("reference", "two-pass")
    assert (kernels.get_backend(), chunked.get()) == ("auto", "two-pass")
    with pytest.raises(ValueError, match="GroupNorm chunked.*'three-pass'"):
        with backend.use_kernel_choice("auto", "three-pass"):
            pass
    assert kernels.get_backend() == "auto"
