"""`layoutgen profile`: a Chrome trace, the top-ops table and the summary on the CPU, for an autoencoder and a
diffusion experiment (whose missing autoencoder checkpoint means random latents, said in the output)."""
from __future__ import annotations

import json

import pytest
import yaml

from layoutgen.bench.profile import project_kernel_bandwidth
from layoutgen.cli import main
from layoutgen.kernels.noise_ops import noise_ops_status

TINY_AUTOENCODER = {
    "autoencoder": {"encoder": {"base_channels": 8, "latent_channels": 4, "downsampling_steps": 2,
                                "channel_multipliers": [1, 2, 2]},
                    "decoder": {"base_channels": 8, "latent_channels": 4, "upsampling_steps": 2,
                                "channel_multipliers": [1, 2, 2]}},
    "data": {"num_samples": 8, "image_size": 32},
    "training": {"batch_size": 2},
}
TINY_DIFFUSION = {
    "diffusion": {"unet": {"in_channels": 4, "base_channels": 8, "depth": 2, "num_classes": 3, "time_dim": 16,
                           "num_heads": 2},
                  "latent_size": [8, 8], "autoencoder_checkpoint": "no/such/autoencoder.safetensors"},
    "data": {"num_samples": 8, "image_size": 32},
    "training": {"batch_size": 2},
}


def _config(tmp_path, data) -> str:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _check_outputs(out):
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"], "empty trace"
    assert any("training_step" in str(e.get("name", "")) for e in trace["traceEvents"])
    assert "Self CPU" in (out / "top_ops.txt").read_text()
    summary = json.loads((out / "profile.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["top_ops"]
    assert summary["peak_memory_mib"] is None or summary["peak_memory_mib"] > 0
    return summary


def test_profile_autoencoder_writes_trace_table_and_summary(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--config", _config(tmp_path, TINY_AUTOENCODER), "--steps", "2", "--out", str(out),
                 "--set", "training.batch_size=3"]) == 0
    summary = _check_outputs(out)
    assert summary["kind"] == "autoencoder" and summary["batch_size"] == 3
    assert "samples/s" in capsys.readouterr().out


def test_profile_diffusion_without_autoencoder_uses_random_latents(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--config", _config(tmp_path, TINY_DIFFUSION), "--steps", "1", "--out", str(out)]) == 0
    summary = _check_outputs(out)
    assert any("random latents" in note for note in summary["notes"])
    if noise_ops_status().compiled:  # the scheduler's add_noise is the project's compiled op on the CPU
        ops = {k["op"]: k for k in summary["project_kernels"]}
        assert ops["layoutgen::add_noise"]["calls"] == 1
        # 2 x 4x8x8 fp32, read x0 and noise, write x_t
        assert ops["layoutgen::add_noise"]["MB moved"] == pytest.approx(3 * 2 * 4 * 8 * 8 * 4 / 1e6)
    assert "random latents" in capsys.readouterr().out


class _Event:
    def __init__(self, name, shapes, dtypes, us):
        self.name, self.input_shapes, self.input_dtypes = name, shapes, dtypes
        self.cpu_time_total = self.device_time_total = us


def test_project_kernel_bandwidth_from_analytic_bytes():
    events = [_Event("_EagerGroupNormSiLU", [[2, 8, 4, 4], [8], [8]], ["c10::BFloat16", "float", "float"], 1.0),
              _Event("_EagerGroupNormSiLUBackward", [[2, 8, 4, 4]], ["c10::BFloat16"], 2.0),
              _Event("aten::mul", [[2, 8, 4, 4]], ["float"], 5.0)]
    rows = {r["op"]: r for r in project_kernel_bandwidth(events, on_gpu=False, ceiling=1.0)}
    assert set(rows) == {"_EagerGroupNormSiLU", "_EagerGroupNormSiLUBackward"}
    assert rows["_EagerGroupNormSiLU"]["GB/s"] == pytest.approx(2 * 256 * 2 / 1e-6 / 1e9)
    assert rows["_EagerGroupNormSiLUBackward"]["MB moved"] == pytest.approx(3 * 256 * 2 / 1e6)


class _EventWithoutDtypes:
    """A profiler event as torch 2.11 records it: no input_dtypes attribute; its id keys the Kineto results."""
    def __init__(self, name, shapes, event_id, us):
        self.name, self.input_shapes, self.id = name, shapes, event_id
        self.cpu_time_total = self.device_time_total = us


def test_project_kernel_bandwidth_takes_dtypes_by_event_id_where_events_have_none():
    events = [_EventWithoutDtypes("_EagerGroupNormSiLU", [[2, 8, 4, 4], [8], [8]], 7, 1.0),
              _EventWithoutDtypes("_EagerGroupNormSiLUBackward", [[2, 8, 4, 4]], 9, 2.0)]
    rows = {r["op"]: r for r in project_kernel_bandwidth(events, on_gpu=False, ceiling=1.0,
                                                         dtypes={7: ["float", "float", "float"], 9: ["c10::Half"]})}
    assert rows["_EagerGroupNormSiLU"]["MB moved"] == pytest.approx(2 * 256 * 4 / 1e6)
    assert rows["_EagerGroupNormSiLUBackward"]["MB moved"] == pytest.approx(3 * 256 * 2 / 1e6)
    assert project_kernel_bandwidth(events, on_gpu=False, ceiling=1.0) == []   # no dtype: no byte count, no row


def test_kineto_dtypes_agree_with_the_events_own_dtypes():
    """The fallback (Kineto results by correlation id) gives what torch's own FunctionEvent.input_dtypes gives."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from layoutgen.bench.profile import _kineto_input_dtypes
    from layoutgen.kernels import add_noise
    if not noise_ops_status().compiled:
        pytest.skip("the compiled noise ops are not available: no project op to record")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, dtype=torch.float32)
    acp = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        add_noise(x0, noise, torch.tensor([1, 5]), acp.sqrt(), (1 - acp).sqrt())
    fallback = _kineto_input_dtypes(prof)
    events = [e for e in prof.events() if e.name == "layoutgen::add_noise"]
    assert events, [e.name for e in prof.events()]
    for event in events:
        if hasattr(event, "input_dtypes"):
            assert fallback[event.id] == list(event.input_dtypes)
        else:
            assert fallback[event.id][0] == "float"


@pytest.mark.parametrize("argv, message", [
    (["--config", "missing.yaml"], "not found"),
    (["--steps", "0"], "--steps"),
    (["--set", "training.nope=1"], "nope"),
    (["--threads", "0"], "--threads"),
])
def test_profile_user_errors_exit_2(tmp_path, capsys, argv, message):
    args = {"--config": _config(tmp_path, TINY_AUTOENCODER), "--out": str(tmp_path / "p")}
    flat = list(argv)
    for key, value in args.items():
        if key not in flat:
            flat += [key, value]
    assert main(["profile"] + flat) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
