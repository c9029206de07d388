"""Tiny model configs the training and command-line tests share: an 8-channel autoencoder with the three heads and
their losses, and an 8-channel UNet, small enough for a few CPU training steps in well under a second."""

CODEC = dict(latent_channels=4, base_channels=8, norm_groups=4)
HEADS = [
    {"type": "RGBHead", "name": "rgb", "out_channels": 3},
    {"type": "SegmentationHead", "name": "segmentation", "num_classes": 11},
    {"type": "ClassificationHead", "name": "classification", "num_classes": 4},
]
LOSS = [
    {"type": "MSELoss", "key": "rgb", "target": "rgb"},
    {"type": "CrossEntropyLoss", "key": "segmentation", "target": "segmentation", "weight": 0.05},
    {"type": "CrossEntropyLoss", "key": "classification", "target": "label", "weight": 0.01},
]
# 8x8 latents of 4 channels, 4 classes, no attention
UNET = dict(in_channels=4, base_channels=8, depth=2, num_res_blocks=1, time_dim=16, norm_groups=4, num_heads=2,
            attention_levels=[], num_classes=4)


def autoencoder(heads=HEADS) -> dict:
    """The autoencoder section: 2 downsampling steps, `heads` on the decoder."""
    return {"encoder": dict(downsampling_steps=2, **CODEC), "decoder": dict(upsampling_steps=2, heads=heads, **CODEC)}
