"""Tests for layoutgen.models.losses: every loss against a hand-written formula, plus errors, dtypes and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layoutgen.models.losses import (
    LOSS_REGISTRY,
    BaseLoss,
    CompositeLoss,
    CrossEntropyLoss,
    KLDLoss,
    L1Loss,
    LatentStandardizationLoss,
    MSELoss,
    build_loss,
    check_same_shape,
    get_input,
    kl_divergence_normal,
    reduce_loss,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def standardize_per_channel(x: torch.Tensor) -> torch.Tensor:
    """Exactly zero mean / unit (unbiased) std per channel of a [N, C, H, W] tensor."""
    dims = (0, 2, 3)
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------------
# Elementwise losses
# ---------------------------------------------------------------------------------------------------------------------


def test_mse_matches_formula():
    a, b = randn(2, 3, 5, 7, seed=0), randn(2, 3, 5, 7, seed=1)
    loss, logs = MSELoss(key="rgb", target="rgb")({"rgb": a}, {"rgb": b})
    expected = sum(((x - y) ** 2).item() for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {"rgb"}
    assert logs["rgb"].item() == pytest.approx(expected, rel=1e-5)


def test_l1_matches_formula():
    a, b = randn(4, 6, seed=2), randn(4, 6, seed=3)
    loss, logs = L1Loss(key="pred", target="gt", name="l1")({"pred": a}, {"gt": b})
    expected = sum(abs((x - y).item()) for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {"l1"}


@pytest.mark.parametrize("cls", [MSELoss, L1Loss])
def test_weight_scales_loss_but_not_logs(cls):
    a, b = randn(3, 4, seed=4), randn(3, 4, seed=5)
    base, base_logs = cls(key="x", target="y")({"x": a}, {"y": b})
    scaled, scaled_logs = cls(key="x", target="y", weight=2.5)({"x": a}, {"y": b})
    assert scaled.item() == pytest.approx(2.5 * base.item(), rel=1e-6)
    # Logs hold the unweighted value, so changing a weight does not change what is plotted.
    assert scaled_logs["x"].item() == pytest.approx(base_logs["x"].item(), rel=1e-6)
    zero, _ = cls(key="x", target="y", weight=0)({"x": a}, {"y": b})
    assert zero.item() == 0.0


def test_elementwise_shape_mismatch_names_key_target_and_shapes():
    loss = MSELoss(key="rgb_out", target="rgb_in")
    with pytest.raises(ValueError) as err:
        loss({"rgb_out": torch.zeros(2, 3, 4, 4)}, {"rgb_in": torch.zeros(2, 1, 4, 4)})
    msg = str(err.value)
    assert "rgb_out" in msg and "rgb_in" in msg
    assert "(2, 3, 4, 4)" in msg and "(2, 1, 4, 4)" in msg


def test_missing_key_error_lists_available_keys():
    loss = MSELoss(key="rgb", target="rgb")
    with pytest.raises(KeyError) as err:
        loss({"latent": torch.zeros(1), "rgb_out": torch.zeros(1)}, {"rgb": torch.zeros(1)})
    assert "MSELoss 'rgb': prediction key 'rgb' not found; available: ['latent', 'rgb_out']" in str(err.value)
    with pytest.raises(KeyError, match="target key 'rgb'.*'image'"):
        loss({"rgb": torch.zeros(1)}, {"image": torch.zeros(1)})


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1.0", True, None])
def test_invalid_weight_rejected(bad):
    with pytest.raises(ValueError, match="'weight'") as err:
        MSELoss(key="rgb", target="rgb", weight=bad)
    assert repr(bad) in str(err.value)


def test_base_loss_defaults_name_to_key_and_needs_compute():
    loss = BaseLoss(key="latent")
    assert loss.name == "latent" and loss.target is None
    with pytest.raises(NotImplementedError):
        loss({"latent": torch.zeros(1)}, {})
    assert MSELoss(key="rgb", target="rgb").name == "rgb"
    assert KLDLoss().name == "kl"
    assert KLDLoss(name=None).name == "kl"
    assert LatentStandardizationLoss().name == "latent_std"


# ---------------------------------------------------------------------------------------------------------------------
# KL divergence
# ---------------------------------------------------------------------------------------------------------------------


def kl_by_hand(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * (sigma^2 + mu^2 - 1 - log sigma^2), written with sigma explicitly."""
    sigma2 = torch.exp(logvar.double())
    return 0.5 * (sigma2 + mu.double() ** 2 - 1.0 - torch.log(sigma2))


def test_kl_elementwise_formula():
    mu, logvar = randn(2, 4, 3, 3, seed=10), randn(2, 4, 3, 3, seed=11)
    torch.testing.assert_close(kl_divergence_normal(mu, logvar).double(), kl_by_hand(mu, logvar), rtol=1e-5, atol=1e-6)
    # Standard normal posterior has zero divergence.
    assert kl_divergence_normal(torch.zeros(3), torch.zeros(3)).abs().max().item() == 0.0


def test_kl_reductions_match_formula():
    mu, logvar = randn(3, 4, 5, 5, seed=12), randn(3, 4, 5, 5, seed=13) * 0.5
    per = kl_by_hand(mu, logvar)
    predictions = {"mu": mu, "logvar": logvar}

    mean_loss, logs = KLDLoss(reduction="mean")(predictions, {})
    assert mean_loss.item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert set(logs) == {"kl"}

    sum_loss, _ = KLDLoss(reduction="sum_per_sample")(predictions, {})
    expected_sum = sum(per[i].sum().item() for i in range(per.shape[0])) / per.shape[0]
    assert sum_loss.item() == pytest.approx(expected_sum, rel=1e-5)
    # The two reductions differ exactly by the number of latent elements per sample (C*H*W), which is what the
    # docstring says about how the weight's meaning changes.
    assert sum_loss.item() == pytest.approx(mean_loss.item() * 4 * 5 * 5, rel=1e-5)


def test_kl_custom_keys_and_weight():
    mu, logvar = randn(2, 8, seed=14), randn(2, 8, seed=15)
    loss_fn = KLDLoss(key="z_mu", logvar_key="z_logvar", weight=1e-3, name="kl_z")
    loss, logs = loss_fn({"z_mu": mu, "z_logvar": logvar}, {})
    assert loss.item() == pytest.approx(1e-3 * kl_by_hand(mu, logvar).mean().item(), rel=1e-5)
    assert set(logs) == {"kl_z"}
    with pytest.raises(KeyError, match="'logvar'"):
        KLDLoss()({"mu": mu}, {})
    with pytest.raises(ValueError, match="mu.*logvar"):
        KLDLoss()({"mu": mu, "logvar": logvar[:, :4]}, {})


def test_kl_unknown_reduction():
    with pytest.raises(ValueError, match="'sum'.*mean.*sum_per_sample"):
        KLDLoss(reduction="sum")


def test_reduce_loss_helpers():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert reduce_loss(x, "mean").item() == pytest.approx(11.5)
    assert reduce_loss(x, "sum_per_sample").item() == pytest.approx((sum(range(12)) + sum(range(12, 24))) / 2)
    with pytest.raises(ValueError, match="'max'.*'mean', 'sum_per_sample'"):
        reduce_loss(x, "max")
    with pytest.raises(ValueError, match="batch"):
        reduce_loss(torch.tensor(1.0), "sum_per_sample")


def test_check_same_shape_and_get_input_helpers():
    with pytest.raises(ValueError, match=r"here.*\(2, 3\).*\(3, 2\)"):
        check_same_shape(torch.zeros(2, 3), torch.zeros(3, 2), "here")
    check_same_shape(torch.zeros(2, 3), torch.ones(2, 3), "here")
    t = torch.ones(2)
    assert get_input({"a": t}, "a", "X", "prediction") is t
    with pytest.raises(TypeError, match="'a'"):
        get_input({"a": [1, 2]}, "a", "X", "prediction")


# ---------------------------------------------------------------------------------------------------------------------
# Cross entropy
# ---------------------------------------------------------------------------------------------------------------------


def ce_by_hand(logits, target, ignore_index=-100, class_weights=None, label_smoothing=0.0):
    """Loop-based cross entropy with PyTorch's conventions, in float64.

    Per element i with label y: (1 - eps) * w[y] * -log p_y + eps / K * sum_c w[c] * -log p_c, summed over
    non-ignored elements and divided by sum of w[y] over them (w = 1 without class weights).
    """
    num_classes = logits.shape[1]
    flat_logits = logits.double().movedim(1, -1).reshape(-1, num_classes)
    flat_target = target.reshape(-1).tolist()
    w = [1.0] * num_classes if class_weights is None else [float(c) for c in class_weights]
    total, denom = 0.0, 0.0
    for row, y in zip(flat_logits.tolist(), flat_target):
        if y == ignore_index:
            continue
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        nll = -log_p[y]
        smooth = -sum(wc * lp for wc, lp in zip(w, log_p))
        total += (1 - label_smoothing) * w[y] * nll + label_smoothing / num_classes * smooth
        denom += w[y]
    return total / denom


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ignore_index": 255},
        {"class_weights": [0.5, 2.0, 1.0, 3.0]},
        {"label_smoothing": 0.1},
        {"ignore_index": 255, "class_weights": [0.5, 2.0, 1.0, 3.0], "label_smoothing": 0.2},
    ],
)
def test_cross_entropy_segmentation_matches_manual(kwargs):
    logits = randn(2, 4, 3, 5, seed=20) * 2
    target = torch.randint(0, 4, (2, 3, 5), generator=gen(21))
    if "ignore_index" in kwargs:
        target[0, 0, :3] = kwargs["ignore_index"]  # unlabeled pixels, out of class range on purpose
    loss, logs = CrossEntropyLoss(key="seg", target="seg_gt", **kwargs)({"seg": logits}, {"seg_gt": target})
    expected = ce_by_hand(logits, target, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {"seg"}
    # Same numbers as PyTorch's own mean reduction.
    reference = F.cross_entropy(
        logits,
        target,
        weight=None if "class_weights" not in kwargs else torch.tensor(kwargs["class_weights"]),
        ignore_index=kwargs.get("ignore_index", -100),
        label_smoothing=kwargs.get("label_smoothing", 0.0),
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_cross_entropy_ignored_pixels_do_not_matter():
    logits = randn(2, 3, 4, 4, seed=22)
    target = torch.randint(0, 3, (2, 4, 4), generator=gen(23))
    target[:, 0] = -100
    loss_fn = CrossEntropyLoss(key="seg", target="seg")
    base, _ = loss_fn({"seg": logits}, {"seg": target})
    changed = logits.clone()
    changed[:, :, 0] += 100.0  # only the ignored row changes
    again, _ = loss_fn({"seg": changed}, {"seg": target})
    assert again.item() == pytest.approx(base.item(), rel=1e-6)


def test_label_smoothing_textbook_formula():
    """Without class weights, smoothing is cross entropy against q = (1 - eps) * onehot + eps / K."""
    eps, num_classes = 0.3, 5
    logits = randn(6, num_classes, seed=24)
    labels = torch.randint(0, num_classes, (6,), generator=gen(25))
    q = torch.full((6, num_classes), eps / num_classes, dtype=torch.float64)
    q[torch.arange(6), labels] += 1 - eps
    expected = -(q * torch.log_softmax(logits.double(), dim=1)).sum(dim=1).mean()
    loss, _ = CrossEntropyLoss(key="cls", target="label", label_smoothing=eps)({"cls": logits}, {"label": labels})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_entropy_classification():
    logits = randn(8, 3, seed=26)
    labels = torch.randint(0, 3, (8,), generator=gen(27))
    loss, _ = CrossEntropyLoss(key="cls", target="label")({"cls": logits}, {"label": labels})
    expected = -sum(torch.log_softmax(logits[i].double(), 0)[labels[i]].item() for i in range(8)) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # int32 labels are accepted too.
    loss32, _ = CrossEntropyLoss(key="cls", target="label")({"cls": logits}, {"label": labels.int()})
    assert loss32.item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient():
    logits = randn(2, 3, 4, 4, seed=28).requires_grad_()
    target = torch.full((2, 4, 4), -100)
    loss, logs = CrossEntropyLoss(key="s", target="s", class_weights=[1.0, 2.0, 3.0])({"s": logits}, {"s": target})
    assert loss.item() == 0.0 and logs["s"].item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max().item() == 0.0


def test_cross_entropy_zero_weight_labels_with_smoothing_is_zero():
    # Every labeled pixel has class weight 0, so the normaliser is 0 while the smoothing term is not: PyTorch returns
    # inf here; the loss treats it like an all-ignored batch.
    logits = randn(2, 3, 4, 4, seed=29).requires_grad_()
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    loss_fn = CrossEntropyLoss(key="s", target="s", class_weights=[0.0, 1.0, 1.0], label_smoothing=0.1)
    loss, _ = loss_fn({"s": logits}, {"s": target})
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_cross_entropy_class_weights_buffer():
    loss = CrossEntropyLoss(key="s", target="s", class_weights=[1, 2, 3])
    assert isinstance(loss.class_weights, torch.Tensor)
    assert loss.class_weights.tolist() == [1.0, 2.0, 3.0]
    assert "class_weights" in dict(loss.named_buffers())
    assert "class_weights" in loss.state_dict()
    assert CrossEntropyLoss(key="s", target="s").class_weights is None


def test_cross_entropy_errors():
    logits = torch.zeros(2, 4, 3, 3)
    loss = CrossEntropyLoss(key="seg", target="seg_gt")
    with pytest.raises(ValueError, match="integer.*float32"):
        loss({"seg": logits}, {"seg_gt": torch.zeros(2, 3, 3)})
    with pytest.raises(ValueError, match=r"seg_gt.*\(2, 3, 3\).*\(2, 3, 4\)"):
        loss({"seg": logits}, {"seg_gt": torch.zeros(2, 3, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="class_weights.*3.*4"):
        CrossEntropyLoss(key="seg", target="seg_gt", class_weights=[1, 1, 1])(
            {"seg": logits}, {"seg_gt": torch.zeros(2, 3, 3, dtype=torch.long)}
        )
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            CrossEntropyLoss(key="seg", target="seg_gt", label_smoothing=bad)
    with pytest.raises(ValueError, match="class_weights"):
        CrossEntropyLoss(key="seg", target="seg_gt", class_weights=[1.0, -1.0])


# ---------------------------------------------------------------------------------------------------------------------
# Latent standardization
# ---------------------------------------------------------------------------------------------------------------------


def test_latent_standardization_zero_for_standardized_data():
    z = standardize_per_channel(randn(4, 3, 8, 8, seed=30) * torch.tensor([0.3, 2.0, 5.0]).view(1, 3, 1, 1) + 7.0)
    for penalty in ("l2", "l1"):
        loss, logs = LatentStandardizationLoss(penalty=penalty)({"latent": z}, {})
        assert loss.item() < 1e-5
        assert abs(logs["latent_std_mean"].item()) < 1e-5
        assert logs["latent_std_std"].item() == pytest.approx(1.0, abs=1e-5)
    # Data merely drawn from N(0, 1) is close to zero too (sampling noise only).
    loss, _ = LatentStandardizationLoss()({"latent": randn(16, 4, 16, 16, seed=31)}, {})
    assert loss.item() < 1e-3


def test_latent_standardization_exact_values_and_growth():
    z = standardize_per_channel(randn(4, 3, 8, 8, seed=32))
    # A shift by m leaves the std at 1: l2 loss is m^2, l1 loss is |m|.
    l2, logs = LatentStandardizationLoss(penalty="l2")({"latent": z + 0.5}, {})
    assert l2.item() == pytest.approx(0.25, rel=1e-4)
    assert logs["latent_std_mean"].item() == pytest.approx(0.5, rel=1e-4)
    l1, _ = LatentStandardizationLoss(penalty="l1")({"latent": z + 0.5}, {})
    assert l1.item() == pytest.approx(0.5, rel=1e-4)
    # A scale by s leaves the mean at 0: l2 loss is (s - 1)^2.
    scaled, logs = LatentStandardizationLoss()({"latent": z * 3.0}, {})
    assert scaled.item() == pytest.approx(4.0, rel=1e-4)
    assert logs["latent_std_std"].item() == pytest.approx(3.0, rel=1e-4)

    loss_fn = LatentStandardizationLoss()
    shifted = [loss_fn({"latent": z + m}, {})[0].item() for m in (0.0, 0.5, 1.0, 2.0)]
    scaled = [loss_fn({"latent": z * s}, {})[0].item() for s in (1.0, 1.5, 2.0, 4.0)]
    assert all(a < b for a, b in zip(shifted, shifted[1:]))
    assert all(a < b for a, b in zip(scaled, scaled[1:]))


def test_latent_standardization_per_channel_vs_global():
    # Channels 0/2 have mean +1 and channels 1/3 mean -1, each with unit std: per channel every mean is off by 1,
    # while globally the means cancel and only the spread is too wide.
    z = standardize_per_channel(randn(4, 4, 6, 6, seed=33)) + torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1)
    per_channel, pc_logs = LatentStandardizationLoss(per_channel=True)({"latent": z}, {})
    global_, gl_logs = LatentStandardizationLoss(per_channel=False)({"latent": z}, {})
    assert per_channel.item() == pytest.approx(1.0, rel=1e-4)
    expected_global = z.double().mean().item() ** 2 + (z.double().std().item() - 1.0) ** 2
    assert global_.item() == pytest.approx(expected_global, rel=1e-4)
    assert abs(gl_logs["latent_std_mean"].item()) < 1e-5
    assert gl_logs["latent_std_std"].item() == pytest.approx(z.double().std().item(), rel=1e-5)
    assert pc_logs["latent_std_std"].item() == pytest.approx(1.0, rel=1e-4)
    assert per_channel.item() != pytest.approx(global_.item(), rel=1e-2)


def test_latent_standardization_needs_two_elements():
    with pytest.raises(ValueError, match="at least 2"):
        LatentStandardizationLoss()({"latent": torch.zeros(1, 4, 1, 1)}, {})
    with pytest.raises(ValueError, match="at least 2"):
        LatentStandardizationLoss(per_channel=False)({"latent": torch.zeros(1)}, {})
    # Globally the same tensor has 4 elements, which is enough.
    LatentStandardizationLoss(per_channel=False)({"latent": torch.randn(1, 4, 1, 1, generator=gen(34))}, {})
    with pytest.raises(ValueError, match="penalty"):
        LatentStandardizationLoss(penalty="l3")


def test_latent_standardization_constant_latent_gradient_is_finite():
    z = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    loss, _ = LatentStandardizationLoss()({"latent": z}, {})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# Composite, registry, build_loss
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(seed: int = 40):
    predictions = {
        "rgb": randn(2, 3, 4, 4, seed=seed),
        "segmentation": randn(2, 5, 4, 4, seed=seed + 1),
        "mu": randn(2, 4, 2, 2, seed=seed + 2),
        "logvar": randn(2, 4, 2, 2, seed=seed + 3) * 0.3,
        "latent": randn(2, 4, 2, 2, seed=seed + 4),
    }
    batch = {
        "rgb": randn(2, 3, 4, 4, seed=seed + 5),
        "segmentation": torch.randint(0, 5, (2, 4, 4), generator=gen(seed + 6)),
    }
    return predictions, batch


def test_seed_snippet_runs():
    from layoutgen.models.losses.base_loss import CompositeLoss, CrossEntropyLoss, MSELoss

    loss_fn = MSELoss(key="rgb", target="rgb", weight=1.0)
    loss_fn = CompositeLoss(losses=[
        MSELoss(key="rgb", target="rgb", weight=1.0),
        CrossEntropyLoss(key="segmentation", target="segmentation", weight=0.05)
    ])
    predictions, batch = make_inputs()
    total, logs = loss_fn(predictions, batch)
    assert set(logs) == {"rgb", "segmentation", "loss"}
    assert total.item() == pytest.approx(logs["rgb"].item() + 0.05 * logs["segmentation"].item(), rel=1e-6)


def test_composite_sums_weighted_parts_and_logs_everything():
    predictions, batch = make_inputs()
    parts = [
        MSELoss(key="rgb", target="rgb", weight=2.0),
        CrossEntropyLoss(key="segmentation", target="segmentation", weight=0.1, name="ce"),
        KLDLoss(weight=1e-2),
        LatentStandardizationLoss(weight=0.5),
    ]
    total, logs = CompositeLoss(losses=parts)(predictions, batch)
    expected = 0.0
    for part in parts:
        weighted, part_logs = part(predictions, batch)
        expected += weighted.item()
        for k, v in part_logs.items():
            assert logs[k].item() == pytest.approx(v.item(), rel=1e-6)
    assert set(logs) == {"rgb", "ce", "kl", "latent_std", "latent_std_mean", "latent_std_std", "loss"}
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert logs["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_composite_errors_and_flattening():
    with pytest.raises(ValueError, match="empty"):
        CompositeLoss(losses=[])
    with pytest.raises(ValueError, match="duplicate loss name 'rgb'"):
        CompositeLoss(losses=[MSELoss(key="rgb", target="rgb"), L1Loss(key="rgb", target="rgb")])
    with pytest.raises(ValueError, match="'loss'"):
        CompositeLoss(losses=[MSELoss(key="rgb", target="rgb", name="loss")])
    with pytest.raises(ValueError, match="losses\\[1\\]"):
        CompositeLoss(losses=[MSELoss(key="rgb", target="rgb"), torch.nn.MSELoss()])
    # Distinct names make the same key usable twice.
    CompositeLoss(losses=[MSELoss(key="rgb", target="rgb"), L1Loss(key="rgb", target="rgb", name="rgb_l1")])
    inner = CompositeLoss(losses=[MSELoss(key="rgb", target="rgb"), KLDLoss()])
    outer = CompositeLoss(losses=[inner, LatentStandardizationLoss()])
    assert [p.name for p in outer.losses] == ["rgb", "kl", "latent_std"]
    # Extra logs colliding with another loss's name are caught at call time.
    clash = CompositeLoss(
        losses=[LatentStandardizationLoss(), MSELoss(key="rgb", target="rgb", name="latent_std_mean")]
    )
    predictions, batch = make_inputs()
    with pytest.raises(ValueError, match="duplicate log name 'latent_std_mean'"):
        clash(predictions, batch)


def test_registry_contents():
    assert set(LOSS_REGISTRY) == {
        "MSELoss", "L1Loss", "KLDLoss", "CrossEntropyLoss", "LatentStandardizationLoss", "CompositeLoss"
    }
    assert LOSS_REGISTRY["MSELoss"] is MSELoss


def test_build_loss_from_dict_list_and_composite():
    single = build_loss({"type": "MSELoss", "key": "rgb", "target": "rgb", "weight": 0.5})
    assert isinstance(single, MSELoss) and single.weight == 0.5 and single.key == "rgb"

    configs = [
        {"type": "MSELoss", "key": "rgb", "target": "rgb"},
        {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05,
         "class_weights": [1, 1, 2, 2, 1], "label_smoothing": 0.1},
        {"type": "KLDLoss", "reduction": "sum_per_sample", "weight": 1e-6},
    ]
    from_list = build_loss(configs)
    from_composite = build_loss({"type": "CompositeLoss", "losses": configs})
    for built in (from_list, from_composite):
        assert isinstance(built, CompositeLoss)
        assert [type(p).__name__ for p in built.losses] == ["MSELoss", "CrossEntropyLoss", "KLDLoss"]
        assert built.losses[1].class_weights.tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]
        assert built.losses[2].reduction == "sum_per_sample"
    predictions, batch = make_inputs()
    torch.testing.assert_close(from_list(predictions, batch)[0], from_composite(predictions, batch)[0])
    assert build_loss(single) is single
    # The config dict is not consumed.
    cfg = {"type": "L1Loss", "key": "a", "target": "b"}
    build_loss(cfg)
    assert cfg == {"type": "L1Loss", "key": "a", "target": "b"}


def test_build_loss_errors_name_the_problem():
    with pytest.raises(ValueError) as err:
        build_loss({"type": "PerceptualLoss", "key": "rgb"})
    assert "PerceptualLoss" in str(err.value) and "MSELoss" in str(err.value)

    with pytest.raises(ValueError) as err:
        build_loss({"type": "MSELoss", "key": "rgb", "target": "rgb", "wieght": 1.0})
    msg = str(err.value)
    assert "MSELoss" in msg and "wieght: unknown key" in msg and "'weight'" in msg and "'target'" in msg

    with pytest.raises(ValueError, match="MSELoss.*'target'"):
        build_loss({"type": "MSELoss", "key": "rgb"})
    with pytest.raises(ValueError, match="KLDLoss.*'weight'.*-1"):
        build_loss({"type": "KLDLoss", "weight": -1})
    with pytest.raises(ValueError, match="'type'"):
        build_loss({"key": "rgb", "target": "rgb"})
    with pytest.raises(ValueError, match="weight: unknown key for CompositeLoss"):
        build_loss({"type": "CompositeLoss", "losses": [], "weight": 1.0})
    with pytest.raises(ValueError, match="empty"):
        build_loss([])
    with pytest.raises(ValueError, match="Nope"):
        build_loss([{"type": "MSELoss", "key": "a", "target": "a"}, {"type": "Nope"}])


# ---------------------------------------------------------------------------------------------------------------------
# Precision and gradients
# ---------------------------------------------------------------------------------------------------------------------


ALL_LOSSES = [
    pytest.param(lambda: MSELoss(key="rgb", target="rgb"), id="mse"),
    pytest.param(lambda: L1Loss(key="rgb", target="rgb"), id="l1"),
    pytest.param(lambda: KLDLoss(), id="kl"),
    pytest.param(lambda: KLDLoss(reduction="sum_per_sample"), id="kl_sum"),
    pytest.param(lambda: CrossEntropyLoss(key="segmentation", target="segmentation", label_smoothing=0.1), id="ce"),
    pytest.param(lambda: LatentStandardizationLoss(), id="latent_std"),
]


def cast_floats(d: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()}


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_bf16_inputs_give_float32_loss_close_to_fp32(make_loss):
    loss_fn = make_loss()
    predictions, batch = make_inputs()
    half_pred, half_batch = cast_floats(predictions, torch.bfloat16), cast_floats(batch, torch.bfloat16)
    half_loss, half_logs = loss_fn(half_pred, half_batch)
    assert half_loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in half_logs.values())
    # Against fp32 on the very same (bf16-rounded) values, only float32 rounding remains.
    same_values, _ = loss_fn(cast_floats(half_pred, torch.float32), cast_floats(half_batch, torch.float32))
    assert half_loss.item() == pytest.approx(same_values.item(), rel=1e-6, abs=1e-7)
    # Against the original fp32 inputs, the difference is bf16 input rounding (~0.4% per element).
    full, _ = loss_fn(predictions, batch)
    assert half_loss.item() == pytest.approx(full.item(), rel=2e-2, abs=1e-3)


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_cpu_autocast_keeps_float32(make_loss):
    loss_fn = make_loss()
    predictions, batch = make_inputs()
    full, _ = loss_fn(predictions, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, logs = loss_fn(predictions, batch)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.is_autocast_enabled("cpu") is False  # the context was restored


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_gradients_flow_to_predictions_and_logs_are_detached(make_loss):
    loss_fn = make_loss()
    predictions, batch = make_inputs()
    predictions = {k: v.clone().requires_grad_() for k, v in predictions.items()}
    loss, logs = loss_fn(predictions, batch)
    loss.backward()
    used = {loss_fn.key} | ({loss_fn.logvar_key} if isinstance(loss_fn, KLDLoss) else set())
    for key in used:
        grad = predictions[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum().item() > 0
    for value in logs.values():
        assert value.ndim == 0 and not value.requires_grad and value.dtype == torch.float32


@pytest.mark.parametrize("make_loss", [p for p in ALL_LOSSES if p.id != "l1"])  # |x| is not smooth at 0
def test_gradcheck_float64(make_loss):
    loss_fn = make_loss()
    predictions, batch = make_inputs(seed=50)
    predictions = cast_floats(predictions, torch.float64)
    batch = cast_floats(batch, torch.float64)
    keys = sorted({loss_fn.key} | ({loss_fn.logvar_key} if isinstance(loss_fn, KLDLoss) else set()))

    def fn(*tensors):
        return loss_fn({**predictions, **dict(zip(keys, tensors))}, batch)[0]

    inputs = tuple(predictions[k].clone().requires_grad_() for k in keys)
    assert fn(*inputs).dtype == torch.float64  # float64 is kept, not downcast to float32
    assert torch.autograd.gradcheck(fn, inputs)


def test_kl_helper_half_input_is_float32():
    mu, logvar = randn(4, 4, seed=60), randn(4, 4, seed=61)
    out = kl_divergence_normal(mu.half(), logvar.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_divergence_normal(mu.half().float(), logvar.half().float()))
