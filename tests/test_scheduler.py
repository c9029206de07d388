"""Tests for layoutgen.models.components.scheduler: the schedules' closed forms, zero terminal SNR, agreement with
diffusers' DDPMScheduler / DDIMScheduler (tables, add_noise, every kind of step, timestep spacing), the seed's usage,
configs, argument errors, and full DDIM sampling loops with an oracle model that recover x0."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from layoutgen.models.components.scheduler import (SCHEDULER_REGISTRY, CosineScheduler, LinearScheduler,
                                                   NoiseScheduler, QuadraticScheduler, build_scheduler)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


ALL = [LinearScheduler, CosineScheduler, QuadraticScheduler]


# ----------------------------------------------------------------------------------------------------------------------
# Schedules: closed forms and shared properties.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps,scale", [(1000, True), (500, True), (250, False)])
def test_linear_betas_closed_form(num_steps, scale):
    s = LinearScheduler(num_steps=num_steps, beta_start=2e-4, beta_end=0.01, scale_betas_with_steps=scale)
    factor = 1000 / num_steps if scale else 1.0
    i = torch.arange(num_steps, dtype=torch.float64)
    expected = 2e-4 * factor + i * (0.01 - 2e-4) * factor / (num_steps - 1)
    torch.testing.assert_close(s.betas, expected, rtol=1e-13, atol=1e-15)
    assert s.betas[0].item() == pytest.approx(2e-4 * factor, rel=1e-14)
    assert s.betas[-1].item() == pytest.approx(0.01 * factor, rel=1e-14)
    assert s.scaled_beta_range == pytest.approx((2e-4 * factor, 0.01 * factor))


def test_quadratic_betas_closed_form():
    s = QuadraticScheduler(num_steps=300, beta_start=8.5e-4, beta_end=0.012)
    a, b = math.sqrt(8.5e-4), math.sqrt(0.012)
    expected = torch.tensor([(a + i * (b - a) / 299) ** 2 for i in range(300)], dtype=torch.float64)
    torch.testing.assert_close(s.betas, expected, rtol=1e-13, atol=1e-16)
    assert s.betas[0].item() == pytest.approx(8.5e-4, rel=1e-13) and s.betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("num_steps,cosine_s", [(500, 0.008), (64, 0.02)])
def test_cosine_alpha_bar_closed_form(num_steps, cosine_s):
    s = CosineScheduler(num_steps=num_steps, cosine_s=cosine_s)

    def f(u):  # Nichol & Dhariwal 2021, eq. 17 (unnormalised)
        return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

    # acp[i] = alpha_bar((i + 1) / T) / alpha_bar(0) for every step whose beta is below the cap (all but the last).
    uncapped = s.betas < s.max_beta
    assert uncapped[:-1].all() and not uncapped[-1]
    expected = torch.tensor([f((i + 1) / num_steps) / f(0) for i in range(num_steps)], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-12, atol=1e-15)
    assert s.betas[-1].item() == s.max_beta == 0.999
    for t in (0, num_steps // 3, num_steps - 2):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / num_steps) / f(0), rel=1e-12)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("rescale", [False, True])
def test_tables_are_consistent(cls, rescale):
    s = cls(num_steps=200, rescale_zero_terminal_snr=rescale)
    for name in ("betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        table = getattr(s, name)
        assert table.dtype == torch.float64 and table.device.type == "cpu" and table.shape == (200,), name
    acp = s.alphas_cumprod
    assert (acp[1:] < acp[:-1]).all(), "alphas_cumprod must decrease strictly"
    if rescale:
        assert (s.betas[:-1] > 0).all() and (s.betas[:-1] < 1).all() and s.betas[-1].item() == pytest.approx(1.0)
    else:
        assert (s.betas > 0).all() and (s.betas < 1).all()
    torch.testing.assert_close(s.alphas, 1 - s.betas, rtol=0, atol=0)
    torch.testing.assert_close(torch.cumprod(s.alphas, 0), acp, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2,
                               torch.ones(200, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    assert len(s) == s.num_steps == 200


@pytest.mark.parametrize("cls", ALL)
def test_zero_terminal_snr(cls):
    plain = cls(num_steps=300)
    s = cls(num_steps=300, rescale_zero_terminal_snr=True)
    assert plain.snr(299).item() > 0
    assert s.snr(299).item() == pytest.approx(0.0, abs=1e-25)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-25)
    assert s.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), abs=1e-12)
    # Algorithm 1: sqrt(acp) is shifted and scaled linearly, so it stays an affine map of the original.
    old, new = plain.sqrt_alphas_cumprod, s.sqrt_alphas_cumprod
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, expected, rtol=1e-12, atol=1e-14)


def test_snr():
    s = CosineScheduler(num_steps=100)
    t = torch.tensor([0, 10, 99])
    acp = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), acp / (1 - acp), rtol=0, atol=0)
    assert s.snr(10).dim() == 0 and s.snr(10).item() == pytest.approx(s.snr(t)[1].item())
    snr = s.snr(torch.arange(100))
    assert (snr[1:] < snr[:-1]).all()


# ----------------------------------------------------------------------------------------------------------------------
# diffusers as the reference. It builds its tables in float32; the fixture `d64` re-runs its constructors with
# float32 read as float64, so the same formulas can be compared to 1e-12.
# ----------------------------------------------------------------------------------------------------------------------

class _Float64Torch:
    """The torch module, except that torch.float32 is torch.float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def d64(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
    for module in (scheduling_ddpm, scheduling_ddim):
        monkeypatch.setattr(module, "torch", _Float64Torch())
    return diffusers


PRED = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def diffusers_kwargs(s: NoiseScheduler) -> dict:
    """The diffusers config of the same schedule."""
    kwargs = dict(num_train_timesteps=s.num_steps, prediction_type=PRED[s.prediction_type],
                  clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range,
                  timestep_spacing=s.timestep_spacing, rescale_betas_zero_snr=s.rescale_zero_terminal_snr)
    if isinstance(s, LinearScheduler):
        start, end = s.scaled_beta_range
        kwargs.update(beta_schedule="linear", beta_start=start, beta_end=end)
    elif isinstance(s, QuadraticScheduler):
        kwargs.update(beta_schedule="scaled_linear", beta_start=s.beta_start, beta_end=s.beta_end)
    else:
        assert s.cosine_s == 0.008 and s.max_beta == 0.999  # what squaredcos_cap_v2 fixes
        kwargs.update(beta_schedule="squaredcos_cap_v2")
    return kwargs


def ddpm_reference(diffusers, s: NoiseScheduler):
    return diffusers.DDPMScheduler(**diffusers_kwargs(s), variance_type=s.variance_type)


def ddim_reference(diffusers, s: NoiseScheduler):
    return diffusers.DDIMScheduler(**diffusers_kwargs(s), set_alpha_to_one=s.set_alpha_to_one)


SCHEDULES = [
    lambda **kw: CosineScheduler(num_steps=500, **kw),
    lambda **kw: LinearScheduler(num_steps=500, **kw),   # scaled: betas 2e-4 .. 0.04
    lambda **kw: LinearScheduler(num_steps=1000, **kw),
    lambda **kw: QuadraticScheduler(num_steps=400, beta_start=8.5e-4, beta_end=0.012, **kw),
]
SCHEDULE_IDS = ["cosine500", "linear500", "linear1000", "quadratic400"]


@pytest.mark.parametrize("make", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("rescale", [False, True])
def test_tables_match_diffusers(d64, make, rescale):
    s = make(rescale_zero_terminal_snr=rescale)
    ref = ddpm_reference(d64, s)
    assert ref.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s.betas, ref.betas, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", SCHEDULES, ids=SCHEDULE_IDS)
def test_betas_match_float32_diffusers(make):
    """diffusers as shipped (float32 tables, scaled_linear squared in float32): ours agree to a few float32 ulps."""
    diffusers = pytest.importorskip("diffusers")
    s = make()
    ref = diffusers.DDPMScheduler(**diffusers_kwargs(s))
    assert ref.betas.dtype == torch.float32
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=4 * 2.0 ** -23, atol=0)


@pytest.mark.parametrize("make", SCHEDULES, ids=SCHEDULE_IDS)
def test_add_noise_and_velocity_match_diffusers(d64, make):
    s = make()
    ref = ddpm_reference(d64, s)
    x0, noise = randn(4, 3, 5, 7, seed=1), randn(4, 3, 5, 7, seed=2)
    t = torch.tensor([0, 17, s.num_steps // 2, s.num_steps - 1])
    x_t, returned = s.add_noise(x0, t, noise)
    assert returned is noise and x_t.dtype == torch.float64
    torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


def _compare_steps(ours, theirs):
    torch.testing.assert_close(ours[0], theirs.prev_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs.pred_original_sample, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("steps", [(None, "leading"), (10, "leading"), (7, "trailing"), (12, "linspace")],
                         ids=["all", "leading10", "trailing7", "linspace12"])
def test_ddpm_step_matches_diffusers(d64, prediction_type, variance_type, clip_sample, steps):
    num_inference_steps, spacing = steps
    s = CosineScheduler(num_steps=500, prediction_type=prediction_type, variance_type=variance_type,
                        clip_sample=clip_sample, clip_sample_range=1.5, timestep_spacing=spacing)
    ref = ddpm_reference(d64, s)
    if num_inference_steps is not None:
        ref.set_timesteps(num_inference_steps)
    schedule = s.timesteps(num_inference_steps).tolist()
    assert schedule == ref.timesteps.tolist()
    for k, t in enumerate([schedule[0], schedule[1], schedule[len(schedule) // 2], schedule[-2], schedule[-1]]):
        m, x = randn(2, 3, 4, 5, seed=10 * k), randn(2, 3, 4, 5, seed=10 * k + 1)
        # diffusers draws its noise from the generator: the same draws, given to ours as variance_noise.
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        theirs = ref.step(m, t, x, generator=torch.Generator().manual_seed(k))
        _compare_steps(s.ddpm_step(m, t, x, num_inference_steps, variance_noise=z), theirs)
        _compare_steps(s.ddpm_step(m, t, x, num_inference_steps, generator=torch.Generator().manual_seed(k)), theirs)


def test_ddpm_step_per_sample_timesteps_match_diffusers(d64, replay_noise):
    s = LinearScheduler(num_steps=1000, prediction_type="v", variance_type="fixed_large", timestep_spacing="trailing")
    ref = ddpm_reference(d64, s)
    ref.set_timesteps(20)
    t = torch.tensor([999, 49, 449, 549])  # per sample, all from the 20-step trailing schedule
    m, x, z = randn(4, 2, 3, 3, seed=1), randn(4, 2, 3, 3, seed=2), randn(4, 2, 3, 3, seed=3)
    x_prev, x0 = s.ddpm_step(m, t, x, 20, variance_noise=z)
    for i, ti in enumerate(t.tolist()):
        theirs = ref.step(m[i:i + 1], ti, x[i:i + 1], generator=_ReplayGenerator(z[i:i + 1]))
        _compare_steps((x_prev[i:i + 1], x0[i:i + 1]), theirs)


class _ReplayGenerator:
    """Stands in for a torch.Generator: diffusers' randn_tensor is patched to return the given noise."""

    def __init__(self, noise):
        self.noise = noise


@pytest.fixture
def replay_noise(monkeypatch):
    """Lets a test hand diffusers' DDPM step a given noise tensor (its step has no variance_noise argument)."""
    scheduling_ddpm = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
    original = scheduling_ddpm.randn_tensor

    def randn_tensor(shape, generator=None, **kwargs):
        if isinstance(generator, _ReplayGenerator):
            assert tuple(generator.noise.shape) == tuple(shape)
            return generator.noise
        return original(shape, generator=generator, **kwargs)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_step_matches_diffusers(d64, prediction_type, eta, spacing, set_alpha_to_one, clip_sample):
    s = CosineScheduler(num_steps=500, prediction_type=prediction_type, timestep_spacing=spacing,
                        set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
    ref = ddim_reference(d64, s)
    ref.set_timesteps(10)
    schedule = s.timesteps(10).tolist()
    assert schedule == ref.timesteps.tolist()
    for k, t in enumerate(schedule):  # every step, including the last (to final_alpha_cumprod)
        m, x, z = randn(2, 3, 4, 5, seed=k), randn(2, 3, 4, 5, seed=k + 50), randn(2, 3, 4, 5, seed=k + 99)
        theirs = ref.step(m, t, x, eta=eta, variance_noise=z, use_clipped_model_output=clip_sample)
        _compare_steps(s.ddim_step(m, t, x, 10, eta=eta, variance_noise=z), theirs)


def test_zero_terminal_snr_steps_match_diffusers(d64, replay_noise):
    s = LinearScheduler(num_steps=500, prediction_type="v", rescale_zero_terminal_snr=True,
                        timestep_spacing="trailing")
    ddim, ddpm = ddim_reference(d64, s), ddpm_reference(d64, s)
    ddim.set_timesteps(25)
    ddpm.set_timesteps(25)
    m, x, z = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2), randn(2, 3, 4, 4, seed=3)
    for t in (499, 259, 19):
        _compare_steps(s.ddim_step(m, t, x, 25, eta=1.0, variance_noise=z),
                       ddim.step(m, t, x, eta=1.0, variance_noise=z))
        _compare_steps(s.ddpm_step(m, t, x, 25, variance_noise=z), ddpm.step(m, t, x, generator=_ReplayGenerator(z)))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps,counts", [(500, [1, 7, 10, 50, 128, 498, 500]), (1000, [3, 20, 250, 999])])
def test_timesteps_match_diffusers(spacing, num_steps, counts):
    # (counts where diffusers' trailing spacing is right; see test_trailing_timesteps_never_include_minus_one)
    diffusers = pytest.importorskip("diffusers")
    s = CosineScheduler(num_steps=num_steps, timestep_spacing=spacing)
    ref = diffusers.DDPMScheduler(num_train_timesteps=num_steps, timestep_spacing=spacing)
    for n in counts:
        ref.set_timesteps(n)
        ours = s.timesteps(n)
        assert ours.dtype == torch.long
        assert ours.tolist() == ref.timesteps.tolist(), (spacing, n)
    assert s.timesteps().tolist() == list(range(num_steps - 1, -1, -1))


def test_trailing_timesteps_never_include_minus_one():
    """diffusers' trailing spacing yields n + 1 steps ending at -1 for some n (np.arange on floats); ours yields n."""
    diffusers = pytest.importorskip("diffusers")
    s = LinearScheduler(num_steps=1000, timestep_spacing="trailing")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ref.set_timesteps(61)
    ours = s.timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1].item() == -1  # the diffusers quirk this guards against
    assert len(ours) == 61 and ours.min().item() >= 0
    assert ours.tolist() == ref.timesteps[:61].tolist()


def test_previous_timestep():
    s = CosineScheduler(num_steps=500, timestep_spacing="linspace")
    assert s.previous_timestep(10) == 9 and s.previous_timestep(0) == -1
    schedule = s.timesteps(10).tolist()  # [499, 444, ..., 55, 0]
    for current, following in zip(schedule, schedule[1:] + [-1]):
        assert s.previous_timestep(current, 10) == following
    t = torch.tensor(schedule)
    assert s.previous_timestep(t, 10).tolist() == schedule[1:] + [-1]
    assert s.previous_timestep(t).tolist() == [v - 1 for v in schedule]
    assert s.previous_timestep(450, 10) == 444  # off the schedule: the next scheduled timestep below


# ----------------------------------------------------------------------------------------------------------------------
# Behaviour.
# ----------------------------------------------------------------------------------------------------------------------

def test_seed_snippet():
    latent = torch.randn(4, 16, 8, 8)
    timestep = torch.randint(0, 500, (4,))
    scheduler = SCHEDULER_REGISTRY["CosineScheduler"](num_steps=500)
    noise = scheduler.add_noise(latent, timestep)
    assert isinstance(noise, tuple) and len(noise) == 2
    x_t, eps = noise
    assert x_t.shape == eps.shape == latent.shape and x_t.dtype == torch.float32
    a = scheduler.sqrt_alphas_cumprod[timestep].float().reshape(-1, 1, 1, 1)
    b = scheduler.sqrt_one_minus_alphas_cumprod[timestep].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * latent + b * eps, rtol=1e-6, atol=1e-6)


def test_add_noise_draws_from_generator_and_caches_tables():
    s = LinearScheduler(num_steps=100)
    x0 = randn(3, 2, 4, 4, seed=0, dtype=torch.bfloat16)
    (x1, n1), (x2, n2) = (s.add_noise(x0, 50, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(x1, x2) and torch.equal(n1, n2)
    assert n1.dtype == x1.dtype == torch.bfloat16
    torch.testing.assert_close(n1, torch.randn(x0.shape, generator=torch.Generator().manual_seed(7),
                                               dtype=torch.bfloat16), rtol=0, atol=0)
    tables = s._device_tables(torch.device("cpu"), torch.float32)
    assert tables["sqrt_alphas_cumprod"].dtype == torch.float32 and tables is s._device_tables("cpu", torch.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_targets_and_predictions_invert(prediction_type):
    s = CosineScheduler(num_steps=200, prediction_type=prediction_type)
    x0, noise = randn(4, 3, 5, 5, seed=1), randn(4, 3, 5, 5, seed=2)
    t = torch.tensor([0, 1, 100, 199])
    x_t, _ = s.add_noise(x0, t, noise)
    target = s.training_target(x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v": s.get_velocity(x0, noise, t)}[prediction_type]
    assert torch.equal(target, expected)
    torch.testing.assert_close(s.predict_x0(target, x_t, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.predict_noise(target, x_t, t), noise, rtol=1e-9, atol=1e-9)
    if prediction_type == "v":
        a = s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        b = s.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - b * x0, rtol=1e-12, atol=1e-12)


def test_ddim_eta0_is_deterministic():
    s = CosineScheduler(num_steps=500)
    m, x = randn(2, 3, 4, 4, seed=3, dtype=torch.float32), randn(2, 3, 4, 4, seed=4, dtype=torch.float32)
    a, b = s.ddim_step(m, 250, x, 50), s.ddim_step(m, 250, x, 50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.float32
    noisy = s.ddim_step(m, 250, x, 50, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy[0], a[0])


def test_steps_accept_per_sample_timesteps():
    s = CosineScheduler(num_steps=500)
    m, x = randn(3, 2, 4, 4, seed=5), randn(3, 2, 4, 4, seed=6)
    t = torch.tensor([450, 100, 0])
    x_prev, x0 = s.ddim_step(m, t, x, 10)
    for i, ti in enumerate(t.tolist()):
        xi, x0i = s.ddim_step(m[i:i + 1], ti, x[i:i + 1], 10)
        torch.testing.assert_close((x_prev[i:i + 1], x0[i:i + 1]), (xi, x0i), rtol=1e-14, atol=1e-14)


ORACLE_CASES = [
    ("cosine-eps-leading", lambda: CosineScheduler(num_steps=500, prediction_type="epsilon"), 25, 0.0),
    ("cosine-v-trailing", lambda: CosineScheduler(num_steps=500, prediction_type="v", timestep_spacing="trailing"),
     20, 0.0),
    ("linear-eps-eta", lambda: LinearScheduler(num_steps=1000, prediction_type="epsilon"), 50, 0.5),
    ("linear-v-zero-snr", lambda: LinearScheduler(num_steps=1000, prediction_type="v", rescale_zero_terminal_snr=True,
                                                  timestep_spacing="trailing"), 10, 0.0),
    ("quadratic-v-linspace", lambda: QuadraticScheduler(num_steps=300, prediction_type="v",
                                                        timestep_spacing="linspace"), 30, 0.0),
]


@pytest.mark.parametrize("name,make,steps,eta", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_ddim_sampling_with_oracle_recovers_x0(name, make, steps, eta):
    """A model that knows x0 outputs the true noise of x_t (or its v): DDIM must walk back to x0, and with eta = 0
    every intermediate x must be exactly what the forward process gives at that timestep for the same noise."""
    s = make()
    x0, noise = randn(2, 4, 6, 6, seed=11), randn(2, 4, 6, 6, seed=12)
    schedule = s.timesteps(steps)
    x, _ = s.add_noise(x0, int(schedule[0]), noise)
    generator = torch.Generator().manual_seed(0)
    for t in schedule:  # 0-d tensors, as a sampling loop gets them
        acp = s.alphas_cumprod[t].item()
        eps = (x - math.sqrt(acp) * x0) / math.sqrt(1 - acp)          # the oracle's noise
        model_output = s.training_target(x0, eps, t)
        x, x0_pred = s.ddim_step(model_output, t, x, steps, eta=eta, generator=generator)
        torch.testing.assert_close(x0_pred, x0, rtol=1e-6, atol=1e-6)
        prev = s.previous_timestep(t, steps)
        if eta == 0.0 and prev >= 0:
            torch.testing.assert_close(x, s.add_noise(x0, prev, noise)[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)
    assert (x - x0).abs().max().item() < 1e-9


# ----------------------------------------------------------------------------------------------------------------------
# Configs and errors.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL)
def test_config_round_trips(cls):
    s = cls(num_steps=250, prediction_type="v", variance_type="fixed_large", clip_sample=True,
            timestep_spacing="trailing", rescale_zero_terminal_snr=True, set_alpha_to_one=False)
    config = yaml.safe_load(yaml.safe_dump(s.config))
    assert config["type"] == cls.__name__ and config["num_steps"] == 250
    rebuilt = build_scheduler(config)
    assert type(rebuilt) is cls and rebuilt.config == s.config
    assert torch.equal(rebuilt.alphas_cumprod, s.alphas_cumprod)
    assert build_scheduler(s) is s


def test_build_scheduler_from_dict():
    s = build_scheduler({"type": "CosineScheduler", "num_steps": 500, "prediction_type": "v"})
    assert isinstance(s, CosineScheduler) and s.num_steps == 500 and s.prediction_type == "v"
    assert set(SCHEDULER_REGISTRY) == {"LinearScheduler", "CosineScheduler", "QuadraticScheduler"}


@pytest.mark.parametrize("call,match", [
    (lambda: build_scheduler({"type": "Cosine", "num_steps": 500}),
     r"unknown scheduler type 'Cosine'; valid types: \['LinearScheduler', 'CosineScheduler', 'QuadraticScheduler'\]"),
    (lambda: build_scheduler({"type": "CosineScheduler", "num_step": 500}),
     r"num_step: unknown key for CosineScheduler; valid keys: \['type', 'num_steps', 'cosine_s'"),
    (lambda: build_scheduler({"type": "CosineScheduler", "beta_start": 1e-4}), r"beta_start: unknown key for CosineScheduler"),
    (lambda: build_scheduler({"num_steps": 500}), r"has no 'type'"),
    (lambda: SCHEDULER_REGISTRY["Cosine"], r"unknown scheduler 'Cosine'; valid schedulers"),
    (lambda: CosineScheduler(num_steps=0), r"CosineScheduler: num_steps must be >= 1, got 0"),
    (lambda: CosineScheduler(num_steps=500.0), r"num_steps must be an int, got float"),
    (lambda: CosineScheduler(prediction_type="v_prediction"), r"prediction_type must be one of \['epsilon', 'v'"),
    (lambda: CosineScheduler(variance_type="learned"), r"variance_type must be one of"),
    (lambda: CosineScheduler(timestep_spacing="uniform"), r"timestep_spacing must be one of"),
    (lambda: CosineScheduler(clip_sample="yes"), r"clip_sample must be a bool"),
    (lambda: CosineScheduler(clip_sample_range=0), r"clip_sample_range must be in \(0.0, inf\)"),
    (lambda: CosineScheduler(max_beta=0.0), r"max_beta must be in \(0.0, 1.0\]"),
    (lambda: LinearScheduler(beta_start=0.0), r"beta_start must be in \(0.0, 1.0\)"),
    (lambda: LinearScheduler(beta_start=0.1, beta_end=0.01), r"beta_end must be in \[0.1, 1.0\)"),
    (lambda: LinearScheduler(num_steps=10), r"beta_end \* 1000 / num_steps = 2.0 must be < 1"),
    (lambda: QuadraticScheduler(beta_end=1.5), r"QuadraticScheduler: beta_end must be in"),
    (lambda: LinearScheduler(1000), r"positional"),
])
def test_constructor_and_config_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


S = CosineScheduler(num_steps=100)
X = torch.zeros(2, 3, 4, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: S.add_noise(X, 100), r"t must be in \[0, 100\), got \[100, 100\]"),
    (lambda: S.add_noise(X, torch.tensor([5, -1])), r"t must be in \[0, 100\), got \[-1\]"),
    (lambda: S.add_noise(X, torch.tensor([1, 2, 3])), r"shape \[N\] = \[2\] \(the batch size of x0\)"),
    (lambda: S.add_noise(X, torch.tensor([0.5, 1.0])), r"t must hold integer timesteps"),
    (lambda: S.add_noise(X, 3, noise=torch.zeros(2, 3, 4)), r"noise shape \(2, 3, 4\) does not match x0"),
    (lambda: S.add_noise([1.0], 3), r"x0 must be a torch.Tensor"),
    (lambda: S.get_velocity(X, X[:1], 3), r"noise shape"),
    (lambda: S.training_target(X, X[:1], 3), r"noise shape"),
    (lambda: S.predict_x0(X[:1], X, 3), r"model_output shape \(1, 3, 4, 4\) does not match x_t"),
    (lambda: S.predict_noise(X, X, 100), r"t must be in \[0, 100\)"),
    (lambda: S.snr(-1), r"t must be in \[0, 100\)"),
    (lambda: S.timesteps(101), r"num_inference_steps must be <= num_steps = 100, got 101"),
    (lambda: S.timesteps(0), r"num_inference_steps must be >= 1"),
    (lambda: S.ddim_step(X, 50, X, 101), r"num_inference_steps must be <= num_steps = 100"),
    (lambda: S.ddim_step(X, 100, X, 10), r"t must be in \[0, 100\)"),
    (lambda: S.ddim_step(X, 50, X, 10, eta=2.0), r"eta must be in \[0.0, 1.0\]"),
    (lambda: S.ddim_step(X, 50, X, 10, eta=0.5, generator=torch.Generator(), variance_noise=X),
     r"pass generator or variance_noise, not both"),
    (lambda: S.ddpm_step(X[..., :2], 50, X), r"model_output shape"),
    (lambda: S.ddpm_step(X, 50, X, variance_noise=X[:1]), r"variance_noise shape"),
    (lambda: S.ddpm_step(X, torch.tensor([50, 200]), X), r"t must be in \[0, 100\), got \[200\]"),
    (lambda: S.previous_timestep(100, 10), r"t must be in \[0, 100\)"),
])
def test_bad_inputs_give_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------------------
# The two paths of the noise ops: the compiled extension (backend "auto", the default) and the PyTorch references.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_compiled_and_reference_paths_agree(prediction_type, dtype):
    """Schedulers use the compiled ops by default; use_backend("reference") switches them back in the same process,
    and every scheduler result is the same on both paths (to the last bits of a fused multiply-add)."""
    from layoutgen.kernels import noise_ops_status, use_backend

    assert noise_ops_status().compiled, noise_ops_status().reason
    s = CosineScheduler(num_steps=200, prediction_type=prediction_type, clip_sample=prediction_type == "sample")
    x0 = randn(3, 4, 8, 8, seed=1, dtype=dtype).to(memory_format=torch.channels_last)
    noise, model_out, z = (randn(3, 4, 8, 8, seed=k, dtype=dtype) for k in (2, 3, 4))
    t = torch.tensor([199, 57, 0])

    def run():
        x_t, _ = s.add_noise(x0, t, noise=noise)
        results = [x_t, s.training_target(x0, noise, t), s.get_velocity(x0, noise, t)]
        results += s.ddpm_step(model_out, t, x_t, variance_noise=z)
        results += s.ddpm_step(model_out, t, x_t, num_inference_steps=20, variance_noise=z)
        results += s.ddim_step(model_out, t, x_t, 20, eta=0.5, variance_noise=z)
        x = x_t  # a short deterministic DDIM loop
        for step in s.timesteps(5):
            x, _ = s.ddim_step(model_out * 0.5 + 0.1 * x, int(step), x, 5)
        return results + [x]

    with use_backend("reference"):
        expected = run()
    compiled = run()
    for out, ref in zip(compiled, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        eps = torch.finfo(dtype).eps
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(out, ref, rtol=4 * eps, atol=4 * eps * scale)
