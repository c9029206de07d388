"""Tests for checkpoints: bit-exact round trips, truncated/tampered/malicious files, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct

import pytest
import torch
from safetensors.torch import save as safetensors_save

import layoutgen
from layoutgen.models.autoencoder import Autoencoder
from layoutgen.models.components.base_model import BaseModel
from layoutgen.models.encoder import Encoder
from layoutgen.utils import atomic
from layoutgen.utils.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from layoutgen.utils.checkpoint import (
    CHECKSUM_KEY,
    METADATA_CHECKSUM_KEY,
    CheckpointError,
    load_checkpoint_file,
    metadata_checksum,
    save_checkpoint_file,
    tensor_checksum,
)

TINY_AE = {
    "encoder": {"base_channels": 8, "downsampling_steps": 2, "latent_channels": 4, "norm_groups": 4},
    "decoder": {"base_channels": 8, "upsampling_steps": 2, "latent_channels": 4, "norm_groups": 4},
}


def tiny_autoencoder(seed: int = 0, variational: bool = False) -> Autoencoder:
    torch.manual_seed(seed)
    encoder = {**TINY_AE["encoder"], "variational": variational}
    model = Autoencoder(encoder=encoder, decoder=TINY_AE["decoder"])
    # non-default values in every tensor, norm buffers/affine included, so a load that skips a tensor is caught
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(**TINY_AE["encoder"])


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a.eval()
    b.eval()
    x = image()
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    assert sorted(out_a) == sorted(out_b)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------------------------- round trips
def test_round_trip_is_bit_exact(tmp_path):
    model = tiny_autoencoder()
    path = tmp_path / "ae.safetensors"
    model.save_checkpoint(path)
    loaded = Autoencoder.from_checkpoint(path)
    assert type(loaded) is Autoencoder
    assert loaded.config == model.config
    assert loaded.cfg == model.cfg
    assert_same_state(model, loaded)
    assert_same_outputs(model, loaded)
    # a freshly built model with another seed differs, so the equalities above are not vacuous
    other = tiny_autoencoder(seed=5)
    assert not torch.equal(other.encoder.conv_in.weight, loaded.encoder.conv_in.weight)


def test_round_trip_through_base_model_picks_the_class(tmp_path):
    model = tiny_autoencoder()
    path = tmp_path / "ae.safetensors"
    model.save_checkpoint(path)
    loaded = BaseModel.from_checkpoint(path)
    assert type(loaded) is Autoencoder
    assert loaded.config == model.config
    assert_same_state(model, loaded)

    enc = tiny_encoder()
    enc_path = tmp_path / "enc.safetensors"
    enc.save_checkpoint(enc_path)
    loaded_enc = BaseModel.from_checkpoint(enc_path)
    assert type(loaded_enc) is Encoder
    assert_same_state(enc, loaded_enc)
    assert_same_outputs(enc, loaded_enc)


def test_round_trip_variational(tmp_path):
    model = tiny_autoencoder(variational=True)
    path = tmp_path / "vae.safetensors"
    model.save_checkpoint(path)
    loaded = Autoencoder.from_checkpoint(path)
    assert loaded.variational and loaded.config["encoder"]["variational"] is True
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert_same_outputs(model, loaded)  # eval mode: the latent is mu, deterministic
    x = image()
    with torch.no_grad():
        out = loaded.eval()(x)
    assert {"mu", "logvar", "latent"} <= set(out)


def test_checkpoint_holds_config_and_metadata(tmp_path):
    model = tiny_autoencoder()
    path = tmp_path / "ae.safetensors"
    model.save_checkpoint(path, metadata={"step": "123"})
    tensors, meta = load_checkpoint_file(path)
    assert meta["model_class"] == "Autoencoder"
    assert json.loads(meta["config"]) == model.config
    assert meta["layoutgen_version"] == layoutgen.__version__
    assert meta["step"] == "123"
    assert meta[CHECKSUM_KEY] == tensor_checksum(tensors)
    assert sorted(tensors) == sorted(model.state_dict())
    # safetensors data, not a pickle
    data = path.read_bytes()
    assert json.loads(data[8:8 + header_length(data)])["__metadata__"]["model_class"] == "Autoencoder"


def test_save_overwrites_previous_checkpoint(tmp_path):
    path = tmp_path / "ae.safetensors"
    tiny_autoencoder(seed=0).save_checkpoint(path)
    second = tiny_autoencoder(seed=1)
    second.save_checkpoint(path)
    assert_same_state(second, Autoencoder.from_checkpoint(path))
    assert listing(tmp_path) == ["ae.safetensors"]


def test_channels_last_model_saves_and_loads(tmp_path):
    model = tiny_autoencoder().to(memory_format=torch.channels_last)
    assert not model.encoder.conv_in.weight.is_contiguous()
    path = tmp_path / "cl.safetensors"
    model.save_checkpoint(path)
    loaded = Autoencoder.from_checkpoint(path)
    assert_same_state(model, loaded)
    # the two memory formats take different conv kernels: equal up to rounding
    x = image()
    with torch.no_grad():
        out_cl, out = model.eval()(x)["rgb"], loaded.eval()(x)["rgb"]
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    # and loading into a channels_last model works too
    target = tiny_autoencoder(seed=3).to(memory_format=torch.channels_last)
    target.load_state_file(path)
    assert_same_state(model, target)


def test_subclass_refuses_another_models_checkpoint(tmp_path):
    path = tmp_path / "ae.safetensors"
    tiny_autoencoder().save_checkpoint(path)
    with pytest.raises(CheckpointError) as info:
        Encoder.from_checkpoint(path)
    msg = str(info.value)
    assert "Autoencoder" in msg and "Encoder" in msg.replace("Autoencoder", "")
    assert str(path) in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.safetensors"
    with pytest.raises(CheckpointError, match="not found") as info:
        Autoencoder.from_checkpoint(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------ truncated and tampered
@pytest.fixture
def saved(tmp_path):
    model = tiny_autoencoder()
    path = tmp_path / "good.safetensors"
    model.save_checkpoint(path)
    return model, path, path.read_bytes()


@pytest.mark.parametrize("where", ["empty", "in-length", "after-length", "mid-header", "end-of-header",
                                   "start-of-data", "mid-data", "last-byte"])
def test_truncated_checkpoint_is_rejected(saved, tmp_path, where):
    _, _, data = saved
    n = header_length(data)
    cut = {"empty": 0, "in-length": 5, "after-length": 8, "mid-header": 8 + n // 2, "end-of-header": 8 + n,
           "start-of-data": 8 + n + 3, "mid-data": (8 + n + len(data)) // 2, "last-byte": len(data) - 1}[where]
    assert cut < len(data)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    for load in (Autoencoder.from_checkpoint, BaseModel.from_checkpoint, tiny_autoencoder(seed=2).load_state_file):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert isinstance(info.value, ValueError)
        assert str(path) in str(info.value)


def test_flipped_byte_in_tensor_data_fails_the_checksum(saved, tmp_path):
    _, _, data = saved
    n = header_length(data)
    for offset in (8 + n, (8 + n + len(data)) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        path = tmp_path / f"tampered_{offset}.safetensors"
        path.write_bytes(bytes(tampered))
        with pytest.raises(CheckpointError, match="checksum") as info:
            Autoencoder.from_checkpoint(path)
        assert str(path) in str(info.value)
        with pytest.raises(CheckpointError, match="checksum"):
            tiny_autoencoder().load_state_file(path)


def rewrite(path, tensors, meta) -> None:
    """A valid safetensors file (checksums intact, the metadata one recomputed) with other metadata."""
    meta = dict(meta, **{METADATA_CHECKSUM_KEY: metadata_checksum(meta)})
    path.write_bytes(safetensors_save(tensors, metadata=meta))


@pytest.mark.parametrize("key", ["config", "model_class", "layoutgen_version", "tensor_sha256"])
def test_metadata_edited_after_saving_fails_the_metadata_checksum(saved, tmp_path, key):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    meta[key] = meta[key].replace("3", "4") if "3" in meta[key] else meta[key] + " "
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(safetensors_save(tensors, metadata=meta))   # the stored metadata checksum left as it was
    for load in (Autoencoder.from_checkpoint, tiny_autoencoder().load_state_file, load_checkpoint_file):
        with pytest.raises(CheckpointError, match="checksum mismatch") as info:
            load(bad)
        assert str(bad) in str(info.value)


def test_a_file_without_the_metadata_checksum_still_loads(saved, tmp_path):
    model, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    del meta[METADATA_CHECKSUM_KEY]   # as written before the metadata checksum existed
    old = tmp_path / "old.safetensors"
    old.write_bytes(safetensors_save(tensors, metadata=meta))
    loaded = Autoencoder.from_checkpoint(old)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_tampered_config_with_unknown_key_names_it(saved, tmp_path):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    config = json.loads(meta["config"])
    config["encoder"]["lattent_channels"] = 4
    meta["config"] = json.dumps(config)
    bad = tmp_path / "badcfg.safetensors"
    rewrite(bad, tensors, meta)
    assert load_checkpoint_file(bad)[1]["config"] == meta["config"]  # the file itself is fine
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert "autoencoder.encoder.lattent_channels" in msg and "unknown key" in msg


def test_tampered_config_with_invalid_value_names_it(saved, tmp_path):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    config = json.loads(meta["config"])
    config["decoder"]["norm_groups"] = True
    meta["config"] = json.dumps(config)
    bad = tmp_path / "badcfg.safetensors"
    rewrite(bad, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        Autoencoder.from_checkpoint(bad)
    assert "autoencoder.decoder.norm_groups" in str(info.value) and "True" in str(info.value)


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", "5", "null", '"text"'])
def test_tampered_config_that_is_not_a_mapping(saved, tmp_path, config):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    meta["config"] = config
    bad = tmp_path / "badcfg.safetensors"
    rewrite(bad, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(bad)
    assert str(bad) in str(info.value) and "config" in str(info.value)


def test_tampered_model_class_is_refused(saved, tmp_path):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    meta["model_class"] = "os.system"
    bad = tmp_path / "badclass.safetensors"
    rewrite(bad, tensors, meta)
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(bad)
    assert "os.system" in str(info.value) and "unknown model class" in str(info.value)


def test_tensor_renamed_in_file_is_caught(saved, tmp_path):
    _, path, _ = saved
    tensors, meta = load_checkpoint_file(path)
    tensors["encoder.conv_in.weightt"] = tensors.pop("encoder.conv_in.weight")
    bad = tmp_path / "renamed.safetensors"
    rewrite(bad, tensors, meta)  # the stored checksum covers names
    with pytest.raises(CheckpointError, match="checksum"):
        Autoencoder.from_checkpoint(bad)


def test_non_layoutgen_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    model = tiny_autoencoder()
    path.write_bytes(safetensors_save({k: v.contiguous() for k, v in model.state_dict().items()}))
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "model_class" in msg and "load_state_file" in msg
    with pytest.raises(CheckpointError):
        Autoencoder.from_checkpoint(path)
    # its weights can still be loaded into a model built from a config
    target = tiny_autoencoder(seed=4)
    target.load_state_file(path)
    assert_same_state(model, target)


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 8 + b"hello world")
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(path)
    assert str(path) in str(info.value)
    path.write_bytes(struct.pack("<Q", 4) + b"[1,]")
    with pytest.raises(CheckpointError, match="header") as info:
        BaseModel.from_checkpoint(path)


# ----------------------------------------------------------------------------------------- pickles and .pt
def _write_sentinel(path: str) -> None:
    with open(path, "w") as fh:
        fh.write("pwned")


class FunctionPayload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_write_sentinel, (self.path,))


class SystemPayload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _evil_state(payload) -> dict:
    return {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "extra": payload}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload_cls", [FunctionPayload, SystemPayload])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload_cls, writer, suffix):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / f"evil{suffix}"
    obj = _evil_state(payload_cls(str(sentinel)))
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    model = tiny_autoencoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        model.load_state_file(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert not sentinel.exists()
    # nothing was loaded
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    # from_checkpoint refuses it too, still without running the payload
    with pytest.raises(CheckpointError):
        BaseModel.from_checkpoint(path)
    assert not sentinel.exists()


def test_payload_is_live_so_the_refusal_test_means_something(tmp_path):
    # The same pickle, loaded the unsafe way, does run the payload.
    sentinel = tmp_path / "sentinel"
    pickle.loads(pickle.dumps(_evil_state(FunctionPayload(str(sentinel)))))
    assert sentinel.read_text() == "pwned"


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.safetensors"
    torch.save(_evil_state(FunctionPayload(str(sentinel))), path)
    with pytest.raises(CheckpointError) as info:
        BaseModel.from_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        tiny_autoencoder().load_state_file(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("wrap", [False, True])
def test_plain_state_dict_pt_loads(tmp_path, wrap):
    source = tiny_autoencoder(seed=0)
    path = tmp_path / "weights.pt"
    state = source.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    target = tiny_autoencoder(seed=1)
    report = target.load_state_file(path)
    assert report.missing == [] and report.unexpected == []
    assert_same_state(source, target)
    # but it is not a self-describing checkpoint
    with pytest.raises(CheckpointError, match="model_class"):
        BaseModel.from_checkpoint(path)


def test_pt_file_with_non_tensor_values_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="mapping of parameter names to tensors"):
        tiny_autoencoder().load_state_file(path)


def test_corrupt_pt_file_is_refused(tmp_path):
    source = tiny_autoencoder()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        tiny_autoencoder().load_state_file(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- atomicity
def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("fail_in", ["fsync", "write", "replace"])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    good = tiny_autoencoder(seed=0)
    path = tmp_path / "ae.safetensors"
    good.save_checkpoint(path)
    good_bytes = path.read_bytes()
    seen_during_write: list[list[str]] = []

    def fail(*args, **kwargs):
        seen_during_write.append(listing(tmp_path))
        raise KeyboardInterrupt

    if fail_in == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", fail)
    elif fail_in == "replace":
        monkeypatch.setattr(atomic.os, "replace", fail)
    else:
        real_fdopen = os.fdopen

        class FailingFile:
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                self.fh.write(data[: len(data) // 2])  # part of it reaches the temp file
                fail()

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.fh.__exit__(*exc)

        monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: FailingFile(real_fdopen(*a, **k)))

    with pytest.raises(KeyboardInterrupt):
        tiny_autoencoder(seed=1).save_checkpoint(path)
    monkeypatch.undo()

    # the failure happened while a temp file existed next to the target
    assert len(seen_during_write) == 1
    temps = [name for name in seen_during_write[0] if name != "ae.safetensors"]
    assert len(temps) == 1 and temps[0].endswith(".tmp")
    # afterwards: the old checkpoint untouched and loadable, no temp file left
    assert listing(tmp_path) == ["ae.safetensors"]
    assert path.read_bytes() == good_bytes
    assert_same_state(good, Autoencoder.from_checkpoint(path))


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "fsync", _raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny_autoencoder().save_checkpoint(tmp_path / "ae.safetensors")
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_save_fsyncs_before_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    tiny_autoencoder().save_checkpoint(tmp_path / "ae.safetensors")
    monkeypatch.undo()
    assert "replace" in events
    assert events.index("fsync") < events.index("replace")
    assert listing(tmp_path) == ["ae.safetensors"]


def test_atomic_open_error_in_block_keeps_old_content(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write("new, half written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["notes.txt"]


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "sub" / "data.bin"  # the folder is created
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("text \u00e9")
    assert path.read_text(encoding="utf-8") == "text \u00e9"
    assert listing(path.parent) == ["data.bin"]


@pytest.mark.parametrize("mode", ["a", "ab", "r", "rb", "w+", "wb+", "x", "r+b"])
def test_atomic_open_rejects_other_modes(tmp_path, mode):
    path = tmp_path / "f.bin"
    with pytest.raises(ValueError, match="mode") as info:
        with atomic_open(path, mode):
            pass
    assert repr(mode) in str(info.value)
    assert listing(tmp_path) == []


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    # A new file gets what a plain open() would (0666 less the umask), not mkstemp's 0600 ...
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as fh:
            fh.write(b"x")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode) == 0o644
    # ... and a replaced file keeps its own mode.
    path = tmp_path / "kept.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    atomic_write_bytes(path, b"new")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert path.read_bytes() == b"new"


# ------------------------------------------------------------------------------------- low-level file API
def test_save_checkpoint_file_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="step"):
        save_checkpoint_file(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"step": 3})
    assert listing(tmp_path) == []


def test_checksum_covers_dtype_shape_and_name():
    base = {"a": torch.arange(4, dtype=torch.float32)}
    ref = tensor_checksum(base)
    assert tensor_checksum({"a": torch.arange(4, dtype=torch.float32)}) == ref
    assert tensor_checksum({"b": base["a"]}) != ref
    assert tensor_checksum({"a": base["a"].reshape(2, 2)}) != ref
    assert tensor_checksum({"a": base["a"].view(torch.int32)}) != ref
    changed = base["a"].clone()
    changed[1] = 1.0000001
    assert tensor_checksum({"a": changed}) != ref


def test_load_checkpoint_file_verify_false_skips_the_checksum(saved, tmp_path):
    _, _, data = saved
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    path = tmp_path / "t.safetensors"
    path.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint_file(path)
    tensors, meta = load_checkpoint_file(path, verify=False)
    assert meta["model_class"] == "Autoencoder" and tensors
