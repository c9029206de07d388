"""The GroupNorm+SiLU bench's verdicts on the issue's GPU targets, from bench rows (the GPU run prints them)."""
from __future__ import annotations

from layoutgen.bench.suites.group_norm_silu import TARGETS, target_verdicts


def row(shape, mode, vs_eager, vs_compile, copy_pct, provider="ours", layout="NCHW"):
    return {"shape": shape, "layout": layout, "mode": mode, "provider": provider, "vs eager": vs_eager,
            "vs compile": vs_compile, "% copy": copy_pct}


def good_rows():
    return [row("16x32x512x512", "fwd", 4.0, 1.5, 80.0), row("64x512x4x4", "fwd", 3.5, 1.3, 20.0),
            row("16x32x512x512", "fwd+bwd", 2.5, 1.1, 60.0), row("64x512x4x4", "fwd+bwd", 2.2, 1.0, 15.0),
            row("16x32x512x512", "fwd", 1.0, 1.0, 10.0, provider="eager")]   # other providers never count


def test_every_target_passes_on_good_rows():
    lines = target_verdicts(good_rows())
    assert len(lines) == len(TARGETS)
    assert all(": PASS (" in line for line in lines), lines


def test_the_worst_row_decides_and_is_named():
    rows = good_rows() + [row("16x256x32x32", "fwd", 2.9, 1.4, 75.0, layout="NHWC")]
    lines = dict(line[2:].split(": ", 1) for line in target_verdicts(rows))
    assert lines["forward >= 3x eager"].startswith("FAIL (worst 2.90 at 16x256x32x32 NHWC; 3 rows)")
    assert lines["forward >= 1.2x torch.compile"].startswith("PASS")


def test_bandwidth_counts_the_autoencoder_shapes_only():
    # the UNet row's 20% does not count; an autoencoder row under 70% does
    lines = dict(line[2:].split(": ", 1) for line in target_verdicts(good_rows()))
    assert lines["forward >= 70% of the measured copy bandwidth"].startswith("PASS (worst 80.00 at 16x32x512x512")
    rows = good_rows() + [row("16x128x128x128", "fwd", 3.1, 1.3, 64.0)]
    lines = dict(line[2:].split(": ", 1) for line in target_verdicts(rows))
    assert lines["forward >= 70% of the measured copy bandwidth"].startswith("FAIL (worst 64.00 at 16x128x128x128")


def test_unmeasured_targets_say_so():
    lines = target_verdicts([row("16x32x512x512", "fwd", None, None, None)])
    assert all("not measured in this run" in line for line in lines), lines


def test_each_provider_of_ours_is_judged_on_its_own_rows():
    # a slow one-pass row fails the one-pass provider's verdict and leaves the default provider's alone
    rows = good_rows() + [row("16x32x512x512", "fwd", 3.2, 1.25, 55.0, provider="ours-1pass")]
    default = dict(line[2:].split(": ", 1) for line in target_verdicts(rows))
    one_pass = dict(line[2:].split(": ", 1) for line in target_verdicts(rows, "ours-1pass"))
    assert default["forward >= 70% of the measured copy bandwidth"].startswith("PASS (worst 80.00")
    assert one_pass["forward >= 70% of the measured copy bandwidth"].startswith("FAIL (worst 55.00")
    assert one_pass["forward+backward >= 2x eager"] == "not measured in this run"


def test_the_ours_providers_run_the_kernels_they_name(triton_cpu, monkeypatch):
    """The bench's GPU providers, run here in the interpreter: "ours" runs the two-pass chunked kernels and
    "ours-1pass" the one-pass ones, forward and backward (the runner holds the choice over the backward, which reads
    it), and both compute what eager does (a 32-channel 48x48 input: the chunked path)."""
    import torch

    from layoutgen.bench.suites import group_norm_silu as suite
    from layoutgen.kernels import group_norm_silu_one_pass as one_pass

    launches = {"forward": [], "backward": []}
    for direction, seen in launches.items():
        real = getattr(one_pass, f"launch_{direction}")
        monkeypatch.setattr(one_pass, f"launch_{direction}",
                            lambda *a, real=real, seen=seen: seen.append(a[-2][1]) or real(*a))
    cpu = torch.device("cpu")
    x, w, b, dy = suite.inputs((1, 32, 48, 48), cpu, torch.float32, False, requires_grad=True)
    want = suite.make_fn("eager", 32, cpu, torch.float32, x)(x, w, b)
    want_grads = torch.autograd.grad(want, (x, w, b), dy)
    counts = {}
    for provider in ("ours", "ours-1pass"):
        fn = suite.make_fn(provider, 32, cpu, torch.float32, x)
        torch.testing.assert_close(fn(x, w, b), want, rtol=1e-5, atol=1e-5)
        suite.runner(fn, "fwd+bwd", x, w, b, dy, provider)()
        counts[provider] = {d: len(seen) for d, seen in launches.items()}
    assert counts == {"ours": {"forward": 0, "backward": 0}, "ours-1pass": {"forward": 2, "backward": 1}}
    assert launches["forward"] == [2, 2] and launches["backward"] == [2]   # two chunks of 2048 positions a group
    with suite.kernel_choice("ours-1pass"):
        grads = torch.autograd.grad(suite.make_fn("ours-1pass", 32, cpu, torch.float32, x)(x, w, b), (x, w, b), dy)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
