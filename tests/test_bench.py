"""`layoutgen bench`: the quick run end to end (every row and every file), a reduced subset, the report writers, the
timing helpers and the command's user errors. No timed assertions: speeds live in the bench's own output."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from layoutgen.bench import models as bench_models
from layoutgen.bench.report import markdown_report, write_report
from layoutgen.bench.run import run_bench
from layoutgen.bench.timing import gbs, peak_memory, time_interleaved
from layoutgen.cli import main
from layoutgen.kernels.noise_ops import noise_ops_status
from layoutgen.models.datasets import dali_available

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE_KEYS = {"card", "torch", "triton", "python", "commit", "copy_bandwidth_gbs", "device"}


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _providers(rows, op, **match) -> set[str]:
    return {r["provider"] for r in rows if r["op"] == op and all(r.get(k) == v for k, v in match.items())}


def test_quick_bench_end_to_end_writes_every_row_and_file(tmp_path, capsys):
    """The real `layoutgen bench --quick` path (what the README's table comes from), on this CPU."""
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Ops" in printed and "## Models (one training step)" in printed

    result = json.loads((out / "bench.json").read_text())
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["machine"]["copy_bandwidth_gbs"] > 0
    rows = result["rows"]
    ops = [r for r in rows if r["suite"] == "ops"]
    models = [r for r in rows if r["suite"] == "models"]

    # GroupNorm+SiLU: three providers per shape and mode, "ours" saying which path the library takes here
    for shape in ("2x32x128x128", "16x512x4x4"):
        for mode in ("fwd", "fwd+bwd"):
            assert _providers(ops, "group_norm_silu", shape=shape, mode=mode) == {"reference", "compile", "ours"}
    ours = [r for r in ops if r["op"] == "group_norm_silu" and r["provider"] == "ours"]
    assert all("backend auto" in r["path"] for r in ours)
    assert _providers(ops, "attention") == {"reference", "sdpa"}
    if noise_ops_status().compiled:
        assert _providers(ops, "add_noise") == {"reference", "compile", "ours", "ours+checks"}
    expected_loaders = {"reference", "dali"} if dali_available() else {"reference"}
    assert _providers(ops, "data loading") == expected_loaders

    for r in ops:
        if r["op"] == "data loading":
            assert r["samples/s"] > 0
            continue
        if r["op"] == "noise_ops" and not noise_ops_status().compiled:  # one row saying why they were not measured
            assert "ms" not in r and r["path"].startswith("not measured")
            continue
        assert r["ms"] > 0 and r["GB/s"] > 0
        # every figure is a ratio of this run's own times
        assert math.isclose(r["% bw"], 100 * r["GB/s"] / result["machine"]["copy_bandwidth_gbs"], rel_tol=1e-9)
        if r["provider"] == "reference":
            assert r["vs reference"] == 1.0

    assert _providers(models, "autoencoder training step") == {"ours", "reference", "compile"}
    assert _providers(models, "unet training step") == {"ours", "reference", "compile", "diffusers"}
    for r in models:
        if r["provider"] == "compile":   # quick on a CPU: not measured, and the row says why
            assert "ms" not in r and "not measured" in r["path"]
        elif "ms" in r:
            assert r["samples/s"] == pytest.approx(2 / (r["ms"] * 1e-3))  # batch 2 in --quick
            # one process, several providers: a CPU's RSS cannot be split between them, so no number is made up
            assert r["peak MiB"] is None and r["memory method"].startswith("n/a")

    with open(out / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and "commit" in table[0] and "card" in table[0]
    assert "| op |" in (out / "bench.md").read_text()
    for png in ("ops_speedup.png", "ops_bandwidth.png", "bench_models_speedup.png"):
        assert _is_png(out / png), png


def test_reduced_op_subset_and_its_files(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result, files = run_bench(quick=True, suite="ops", out=str(tmp_path), op_suites=["attention"],
                                  log=lambda m: None)
        assert torch.get_num_threads() == 2  # the quick run's single thread is given back
    finally:
        torch.set_num_threads(previous)
    assert result["machine"]["torch_threads"] == 1
    assert {r["op"] for r in result["rows"]} == {"attention"}
    assert set(files) == {"json", "csv", "markdown", "speedup_png", "bandwidth_png"}
    assert all(_is_png(files[k]) for k in ("speedup_png", "bandwidth_png"))


def test_diffusers_unet_matches_our_unet_size():
    pytest.importorskip("diffusers")
    cfg = bench_models.unet_experiment(quick=True).diffusion
    hf = bench_models.diffusers_unet(cfg.unet, cfg.latent_size)
    assert list(hf.config.block_out_channels) == cfg.unet.level_channels()
    assert hf.config.layers_per_block == cfg.unet.num_res_blocks
    attention = [i for i, name in enumerate(hf.config.down_block_types) if name.startswith("Attn")]
    assert attention == cfg.unet.resolved_attention_levels()
    x = torch.randn(2, cfg.unet.in_channels, *cfg.latent_size)
    assert hf(x, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample.shape == x.shape


def _fake_result(rows):
    machine = {"card": "test card", "torch": "t", "triton": "tr", "python": "p", "commit": "c",
               "copy_bandwidth_gbs": 10.0, "copy_bandwidth_method": "m"}
    return {"mode": "quick", "command": "layoutgen bench --quick", "machine": machine, "rows": rows, "notes": ["n1"]}


def test_report_writes_strict_json_csv_markdown_and_plots(tmp_path):
    rows = [{"suite": "ops", "op": "x", "shape": "1x2", "mode": "fwd", "provider": "reference", "ms": 2.0,
             "GB/s": 1.0, "% bw": 10.0, "vs reference": 1.0},
            {"suite": "ops", "op": "x", "shape": "1x2", "mode": "fwd", "provider": "ours", "ms": 1.0,
             "GB/s": 2.0, "% bw": 20.0, "vs reference": 2.0},
            {"suite": "models", "op": "m", "shape": "s", "provider": "compile", "path": "not measured"}]
    files = write_report(str(tmp_path), _fake_result(rows))
    assert json.loads(open(files["json"]).read())["rows"][1]["vs reference"] == 2.0
    text = markdown_report(_fake_result(rows))
    assert "test card" in text and "note: n1" in text and "| x | 1x2 | fwd |" in text
    with pytest.raises(ValueError):  # a NaN figure is a bug, not something to write into the JSON
        write_report(str(tmp_path / "nan"), _fake_result([{**rows[0], "ms": float("nan")}]))


def test_time_interleaved_gives_each_provider_its_median():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def fn():
            calls[name] += 1
        return fn
    times = time_interleaved({"a": bump("a"), "b": bump("b")}, "cpu", warmup=2, repeats=5)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 7, "b": 7}
    assert gbs(2e9, 1000.0) == pytest.approx(2.0)


def test_training_step_runs_forward_and_backward_under_the_kernel_choice(monkeypatch):
    """The bench's training step holds the kernel choice (backend + GroupNorm's chunked path) over the backward too,
    which reads it (the one-pass backward is chosen when the backward runs); the choice ends with the step."""
    from layoutgen.kernels import get_backend
    from layoutgen.kernels.backend import group_norm_chunked_path as chunked_path

    monkeypatch.delenv("LAYOUTGEN_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("LAYOUTGEN_GN_CHUNKED", raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", get_backend(), chunked_path.get()))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", get_backend(), chunked_path.get()))
            return grad * 2

    model = torch.nn.Linear(3, 3)
    step = bench_models.training_step(model, lambda m, b: Probe.apply(m(b["x"])).sum(), {"x": torch.randn(2, 3)},
                                      "reference+one-pass", torch.device("cpu"))
    before = model.weight.detach().clone()
    step()
    assert seen == [("forward", "reference", "one-pass"), ("backward", "reference", "one-pass")]
    assert not torch.equal(model.weight, before)   # AdamW stepped
    assert (get_backend(), chunked_path.get()) == ("auto", "two-pass")
    with bench_models.kernel_choice(None):
        assert (get_backend(), chunked_path.get()) == ("auto", "two-pass")


def test_peak_memory_on_cpu_is_a_size_or_none():
    peak, method = peak_memory(lambda: torch.ones(64, 2 ** 20).sum(), "cpu")  # 256 MiB
    assert "RSS" in method
    assert peak is None or peak > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "--quick", "--threads", "0"], "--threads"),
    (["profile", "--config", "no/such/config.yaml"], "not found"),
])
def test_cli_user_errors_exit_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_cuda_without_cuda_exits_2(capsys, tmp_path):
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.cuda
def test_quick_bench_on_cuda_measures_ours_with_triton(tmp_path):
    result, _ = run_bench(quick=True, suite="ops", out=str(tmp_path), device="cuda", op_suites=["group_norm_silu"],
                          log=lambda m: None)
    ours = [r for r in result["rows"] if r["provider"] in ("ours", "ours-1pass")]
    assert {r["provider"] for r in ours} == {"ours", "ours-1pass"}
    assert all(r["path"].startswith("Triton") for r in ours)
    assert all(r["GB/s"] > 0 for r in ours)
