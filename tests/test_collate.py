"""collate_dicts: dict samples -> dict batches, with skipped samples and optional keys."""
import pytest
import torch

from layoutgen.models.datasets.collate import collate_dicts


def sample(i, **extra):
    return {"rgb": torch.full((3, 4, 4), float(i)), "label": torch.tensor(i), "index": torch.tensor(i), **extra}


def test_stacks_tensors_and_plain_values():
    batch = collate_dicts([sample(0, name="a", flag=True, w=0.5, n=3), sample(1, name="b", flag=False, w=1.5, n=4)])
    assert batch["rgb"].shape == (2, 3, 4, 4) and batch["rgb"][1].eq(1).all()
    assert batch["label"].tolist() == [0, 1] and batch["label"].dtype == torch.int64
    assert batch["flag"].dtype == torch.bool and batch["flag"].tolist() == [True, False]
    assert batch["w"].dtype == torch.float32 and batch["n"].dtype == torch.int64
    assert batch["name"] == ["a", "b"]
    assert "has_rgb" not in batch


def test_none_samples_are_dropped():
    batch = collate_dicts([None, sample(2), None, sample(5)])
    assert batch["index"].tolist() == [2, 5]
    assert collate_dicts([None, None]) == {}


def test_optional_keys_are_zero_filled_with_a_mask():
    latent = torch.ones(2, 3, 3)
    batch = collate_dicts([sample(0, latent=latent), sample(1), sample(2, latent=None), sample(3, latent=latent * 2)])
    assert batch["latent"].shape == (4, 2, 3, 3)
    assert batch["has_latent"].tolist() == [True, False, False, True]
    assert batch["latent"][1].eq(0).all() and batch["latent"][2].eq(0).all() and batch["latent"][3].eq(2).all()
    # a key no sample has is absent
    assert "control" not in collate_dicts([sample(0, control=None), sample(1, control=None)])


def test_mismatched_shapes_name_the_key_and_suggest_image_size():
    other = sample(1)
    other["rgb"] = torch.zeros(3, 5, 5)
    with pytest.raises(ValueError, match=r"'rgb'.*image_size"):
        collate_dicts([sample(0), other])


def test_optional_non_tensor_key_is_an_error():
    with pytest.raises(ValueError, match="optional key 'name'"):
        collate_dicts([sample(0, name="a"), sample(1)])
