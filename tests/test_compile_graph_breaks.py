"""Zero graph breaks in every project model's forward under torch.compile (torch._dynamo.explain): the Autoencoder,
the UNet with timesteps and class labels, and a ControlNet over it; with the reference ops and with the library's
default backend ("auto", the fused kernels on CUDA). `layoutgen bench --compile-matrix` reports the same count."""
from __future__ import annotations

import pytest
import torch

from layoutgen.bench.compile_matrix import forward_call, graph_breaks, matrix_rows
from layoutgen.bench.models import autoencoder_workload, unet_workload
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.unet import UNet
from layoutgen.models.controlnet_diffusion import ControlNetDiffusion
from layoutgen.models.diffusion import DiffusionModel

TINY_UNET = {"in_channels": 4, "base_channels": 8, "depth": 2, "num_classes": 3, "time_dim": 16, "num_heads": 2}
BACKENDS = ("reference", "auto")


def _autoencoder():
    codec = {"base_channels": 8, "latent_channels": 4, "channel_multipliers": [1, 2, 2]}
    model = Autoencoder({"encoder": {**codec, "downsampling_steps": 2},
                         "decoder": {**codec, "upsampling_steps": 2}})
    return model, (torch.randn(2, 3, 32, 32),), {}


def _unet():
    return UNet(TINY_UNET), (torch.randn(2, 4, 8, 8), torch.tensor([3, 250])), {"labels": torch.tensor([0, 2])}


def _controlnet():
    base = DiffusionModel({"unet": TINY_UNET, "latent_scale": 1.0})
    model = ControlNetDiffusion.from_base(base, downsampling_factor=4, hint_channels=[8, 8])
    return model, (torch.randn(2, 4, 8, 8), torch.tensor([3, 250]), torch.rand(2, 1, 32, 32)), \
        {"labels": torch.tensor([0, 2])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build", [_autoencoder, _unet, _controlnet], ids=["autoencoder", "unet", "controlnet"])
def test_model_forward_has_no_graph_breaks(build, backend):
    model, args, kwargs = build()
    count, reasons = graph_breaks(model, args, kwargs, backend)
    assert count == 0, reasons


def test_graph_breaks_counts_a_real_break():
    """The check can fail: a data-dependent .item() in a forward is a graph break."""
    class Breaks(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x

    count, reasons = graph_breaks(Breaks(), (torch.ones(3),), {}, "reference")
    assert count >= 1 and reasons


def test_compile_matrix_eager_cells_report_zero_graph_breaks():
    """The matrix's own rows (eager cells only: compiling takes minutes on this CPU) at the --quick sizes."""
    rows, notes = matrix_rows(torch.device("cpu"), quick=True, modes=["eager"], log=lambda m: None)
    assert {(r["model"], r["dtype"]) for r in rows} == {(m, d) for m in ("autoencoder", "unet")
                                                        for d in ("fp32", "bf16")}
    assert all(r["graph breaks"] == 0 and r["ms"] > 0 and r["vs eager"] == 1.0 for r in rows)
    assert any("max-autotune skipped" in n for n in notes) and any("fused ops = the reference" in n for n in notes)


@pytest.mark.cuda
@pytest.mark.parametrize("workload", [autoencoder_workload, unet_workload])
def test_seed_models_on_cuda_have_no_graph_breaks_with_the_triton_kernels(workload):
    work = workload(torch.device("cuda"), quick=True)
    module, args, kwargs = forward_call(work)
    count, reasons = graph_breaks(module, args, kwargs, "auto")
    assert count == 0, reasons


@pytest.mark.slow
def test_autoencoder_has_no_graph_breaks_with_the_fused_kernels_on_cpu():
    """The fused path (the Triton custom ops) traced on the CPU; explain runs them in Triton's interpreter (~25 s)."""
    model, args, kwargs = _autoencoder()
    count, reasons = graph_breaks(model, args, kwargs, "triton")
    assert count == 0, reasons
