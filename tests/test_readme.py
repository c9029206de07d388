"""Every ```python block of README.md runs, in order, in one namespace, and does what its comments say.

The blocks run in a temporary folder holding a copy of experiments/, so the files they write (ae.safetensors,
data/synth) land there. No thread limit here: the 256x256 forward passes of the seed model run faster on every
core than single-threaded (measured on the 2-core CI machine: about 3.6 s against 4.9 s).
"""
import ast
import csv
import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


# The README builds the seed-size autoencoder at 256x256: all threads help there.
USE_ALL_THREADS = True


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _commented_shapes(block: str, line_start: str) -> dict[str, list[int]]:
    """`output = model(x)  # {"rgb": [1, 3, 256, 256], ...}` -> {"rgb": [1, 3, 256, 256], ...}."""
    for line in block.splitlines():
        if line.startswith(line_start) and "#" in line:
            comment = line.split("#", 1)[1]
            return {k: [int(d) for d in v.split(",")] for k, v in re.findall(r'"(\w+)":\s*\[([\d,\s]+)\]', comment)}
    return {}


@pytest.fixture(scope="module")
def readme_namespace(tmp_path_factory):
    blocks = _python_blocks()
    assert len(blocks) >= 5, "README.md lost its python examples"
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "experiments", work / "experiments")
    namespace: dict = {"__name__": "readme"}
    steps = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for index, block in enumerate(blocks):
            try:
                exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
            except Exception as err:  # name the block in the failure
                pytest.fail(f"README.md python block {index + 1} failed: {type(err).__name__}: {err}\n{block}")
            steps.append(dict(namespace))
    return {"blocks": blocks, "steps": steps, "work": work}


def _block(readme: dict, marker: str) -> tuple[str, dict]:
    """The first block containing `marker`, and the namespace right after it ran."""
    for block, namespace in zip(readme["blocks"], readme["steps"]):
        if marker in block:
            return block, namespace
    pytest.fail(f"no README.md python block contains {marker!r}")


def test_every_block_is_valid_python():
    for index, block in enumerate(_python_blocks()):
        ast.parse(block, filename=f"README.md python block {index + 1}")


def test_usage_block_shapes_match_its_comments(readme_namespace):
    block, ns = _block(readme_namespace, "output = model(x)")
    x, output = ns["x"], ns["output"]
    claimed = _commented_shapes(block, "output = model(x)")
    assert claimed, "the output comment of the usage block names no shapes"
    for key, shape in claimed.items():
        assert list(output[key].shape) == shape, f"README claims {key} {shape}, got {list(output[key].shape)}"
    # the seed example: 4 downsampling steps, 16 latent channels, an RGB head the size of the input
    n, _, h, w = x.shape
    assert output["rgb"].shape == x.shape
    assert output["latent"].shape == (n, 16, h // 16, w // 16)
    assert set(ns["latent"]) == {"latent"}                       # deterministic encoder: {"latent": z}
    assert set(ns["reconstruction"]) == {"rgb"}                  # every head's output
    assert ns["reconstruction"]["rgb"].shape == x.shape
    # decode(encode(x)) is the forward pass (eval mode is not needed: no dropout, deterministic encoder)
    torch.testing.assert_close(ns["reconstruction"]["rgb"], output["rgb"])


def test_encoder_decoder_block_outputs_every_head(readme_namespace):
    _, ns = _block(readme_namespace, "outputs = decoder(")
    outputs = ns["outputs"]
    assert set(outputs) == {"rgb", "segmentation", "classification"}
    assert outputs["rgb"].shape == (1, 3, 256, 256)
    assert outputs["segmentation"].shape == (1, 11, 256, 256)
    assert outputs["classification"].shape == (1, 4)


def test_losses_block_logs_every_part_and_the_total(readme_namespace):
    _, ns = _block(readme_namespace, "total, logs = loss_fn(")
    total, logs = ns["total"].detach(), ns["logs"]
    assert total.ndim == 0 and torch.isfinite(total)
    assert {"rgb", "segmentation", "loss"} <= set(logs)
    assert float(logs["loss"]) == pytest.approx(float(total), rel=1e-5)
    # parts are logged unweighted: the total is rgb * 1.0 + segmentation * 0.05
    assert float(logs["rgb"]) + 0.05 * float(logs["segmentation"]) == pytest.approx(float(total), rel=1e-5)
    # the second loss is for a VAE's outputs: it reads mu and logvar
    vae_outputs = {"rgb": torch.zeros(1, 3, 8, 8), "mu": torch.zeros(1, 4, 2, 2), "logvar": torch.zeros(1, 4, 2, 2)}
    vae_total, vae_logs = ns["loss_fn"](vae_outputs, {"rgb": torch.zeros(1, 3, 8, 8)})
    assert float(vae_total) == 0.0 and "kl" in vae_logs


def test_checkpoint_block_round_trips(readme_namespace):
    (_, ns), work = _block(readme_namespace, "save_checkpoint("), readme_namespace["work"]
    assert (work / "ae.safetensors").is_file()
    from layoutgen.models.autoencoder import Autoencoder
    model = ns["model"]
    assert isinstance(model, Autoencoder)                        # BaseModel.from_checkpoint rebuilt the right class
    assert model.config == Autoencoder.from_config(ns["config"]["autoencoder"]).config
    assert model.num_parameters(trainable_only=True) == 0         # frozen
    assert model.num_parameters() > 0


def test_synthetic_block(readme_namespace):
    (_, ns), work = _block(readme_namespace, "write_synthetic_dataset("), readme_namespace["work"]
    layout = ns["layout"]
    size = layout.rgb.shape[0]
    assert layout.rgb.shape == (size, size, 3)
    assert layout.segmentation.shape == (size, size)
    assert int(layout.segmentation.max()) < len(ns["CLASS_NAMES"]) <= len(ns["PALETTE"])
    manifest = work / "data" / "synth" / "manifest.csv"
    assert manifest.is_file()
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    assert len(rows) == len(list((work / "data" / "synth" / "images").glob("*.png")))


def test_diffusion_block(readme_namespace):
    _, ns = _block(readme_namespace, "DiffusionModel.from_config")
    assert ns["x_t"].shape == ns["noise"].shape == ns["latent"].shape
    assert ns["pred_noise"].shape == ns["latent"].shape
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"])
    assert ns["generated_latent"].shape == (2, 16, 32, 32)


def test_controlnet_block(readme_namespace):
    _, ns = _block(readme_namespace, "ControlNetDiffusion.from_base")
    assert ns["latents"].shape == (2, 16, 32, 32) and torch.isfinite(ns["latents"]).all()
