"""Preset weights from local files only: .bin, .safetensors, a ``--local-dir`` folder and a real
Hugging Face cache tree (found through huggingface_hub's offline lookup) load strictly and give
identical embeddings; wrong, truncated, pickled and missing weights give clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from wsi_ssl.encoders import create_encoder, get_preset
from wsi_ssl.encoders._presets import build_trunk
from wsi_ssl.errors import WeightsError

D1 = {"depth": 1}
REV = "0123456789abcdef0123456789abcdef01234567"


def perturbed_trunk(name: str, overrides=D1, seed: int = 7) -> torch.nn.Module:
    """A reduced instance of preset ``name`` with weights unlike its default random instance
    (also used by test_transformers_presets)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = build_trunk(get_preset(name), overrides)
        with torch.no_grad():
            for t in trunk.parameters():
                t.add_(0.05 * torch.randn_like(t))
    return trunk.eval()


def _state_dict(name: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A depth-1 checkpoint of ``name``."""
    return {k: v.contiguous() for k, v in perturbed_trunk(name, seed=seed).state_dict().items()}


def _hf_cache(root, repo: str, filename: str, payload) -> None:
    """The layout huggingface_hub writes: blobs, a snapshot symlink per file, refs/main."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    blob = folder / "blobs" / "5eb0c0ffee"
    shutil.copyfile(payload, blob)
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(blob)
    (snap / "config.json").write_text('{"architecture": "vit_large_patch16_224"}')


@pytest.fixture(scope="module")
def uni_sd():
    return _state_dict("uni")


@pytest.fixture()
def tiles():
    return np.random.default_rng(0).integers(0, 255, (3, 256, 256, 3), dtype=np.uint8)


def test_every_layout_loads_strictly_and_embeds_identically(uni_sd, tiles, tmp_path,
                                                             monkeypatch):
    from safetensors.torch import save_file

    torch.save(uni_sd, tmp_path / "pytorch_model.bin")
    save_file(uni_sd, str(tmp_path / "model.safetensors"))
    local = tmp_path / "UNI"  # what `huggingface-cli download MahmoodLab/UNI --local-dir UNI` writes
    local.mkdir()
    shutil.copy(tmp_path / "pytorch_model.bin", local / "pytorch_model.bin")
    (local / "config.json").write_text("{}")
    cache = tmp_path / "hub"
    _hf_cache(cache, "MahmoodLab/UNI", "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    encs = {"bin": create_encoder("uni", weights=tmp_path / "pytorch_model.bin",
                                  model_kwargs=D1, device="cpu"),
            "safetensors": create_encoder("uni", weights=tmp_path / "model.safetensors",
                                          model_kwargs=D1, device="cpu"),
            "local-dir": create_encoder("uni", weights=local, model_kwargs=D1, device="cpu"),
            "hf-cache": create_encoder("uni", model_kwargs=D1, device="cpu")}
    assert encs["hf-cache"].spec["weights"].endswith(f"snapshots/{REV}/pytorch_model.bin")
    # the weights really are the file's: every tensor equal, and unlike a random instance
    trunk = encs["hf-cache"].model.trunk
    for k, v in uni_sd.items():
        assert torch.equal(trunk.state_dict()[k], v), k
    assert not any(t.is_meta for t in trunk.parameters())
    ref = encs["bin"].embed(tiles)
    for how, enc in encs.items():
        assert enc.fingerprint == encs["bin"].fingerprint, how
        torch.testing.assert_close(enc.embed(tiles), ref, atol=0, rtol=0)
    rand = create_encoder("uni", random_weights=True, model_kwargs=D1, device="cpu")
    assert rand.fingerprint != encs["bin"].fingerprint
    assert not torch.allclose(rand.embed(tiles), ref)


def test_folder_prefers_safetensors_and_tolerates_prefixes_and_heads(uni_sd, tiles, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "UNI"
    d.mkdir()
    torch.save({"junk": torch.zeros(1)}, d / "pytorch_model.bin")  # would fail if chosen
    save_file(uni_sd, str(d / "model.safetensors"))
    a = create_encoder("uni", weights=d, model_kwargs=D1, device="cpu")
    wrapped = {"model": {f"module.{k}": v for k, v in uni_sd.items()}
               | {"module.head.weight": torch.zeros(2, 1024), "mask_token": torch.zeros(1, 1024)}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    b = create_encoder("uni", weights=tmp_path / "wrapped.pth", model_kwargs=D1, device="cpu")
    assert a.fingerprint == b.fingerprint
    torch.testing.assert_close(a.embed(tiles), b.embed(tiles))


def test_virchow_weights_into_virchow2_name_the_mix_up(tmp_path):
    torch.save(_state_dict("virchow"), tmp_path / "virchow.bin")
    with pytest.raises(WeightsError, match=r"'.*virchow\.bin' do not fit encoder 'virchow2': "
                       r"1 missing keys \(e\.g\. \['reg_token'\]\).*shape mismatches.*pos_embed"
                       r".*looks like 'virchow' weights, not 'virchow2'"):
        create_encoder("virchow2", weights=tmp_path / "virchow.bin", model_kwargs=D1)
    torch.save(_state_dict("virchow2"), tmp_path / "virchow2.bin")
    with pytest.raises(WeightsError, match="looks like 'virchow2' weights, not 'virchow'"):
        create_encoder("virchow", weights=tmp_path / "virchow2.bin", model_kwargs=D1)
    torch.save(_state_dict("uni"), tmp_path / "uni.bin")
    with pytest.raises(WeightsError, match=r"encoder 'h-optimus-0'.*missing keys.*Likely cause: "
                       r"this looks like 'uni' weights"):
        create_encoder("h-optimus-0", weights=tmp_path / "uni.bin", model_kwargs=D1)


def test_truncated_pickled_and_foreign_files(uni_sd, tmp_path):
    from safetensors.torch import save_file

    torch.save(uni_sd, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin': the file looks truncated "
                       r"\([\d,]+ bytes; an interrupted download"):
        create_encoder("uni", weights=tmp_path / "pytorch_model.bin", model_kwargs=D1)
    save_file(uni_sd, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match=r"cut\.safetensors': the file looks truncated"):
        create_encoder("uni", weights=tmp_path / "cut.safetensors", model_kwargs=D1)
    trunk = build_trunk(get_preset("uni"), D1)
    torch.save(trunk, tmp_path / "whole_model.pth")  # a pickled nn.Module, not a state dict
    with pytest.raises(WeightsError, match=r"whole_model\.pth': it holds pickled Python objects"
                       r".*weights_only=True.*save model\.state_dict\(\)"):
        create_encoder("uni", weights=tmp_path / "whole_model.pth", model_kwargs=D1)
    torch.save({"a": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(WeightsError, match=r"do not fit encoder 'uni': .*missing keys.*Likely "
                       r"cause: check that the file is MahmoodLab/UNI's pytorch_model\.bin"):
        create_encoder("uni", weights=tmp_path / "other.bin", model_kwargs=D1)


def test_missing_weights_give_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as info:
        create_encoder("uni")
    msg = str(info.value)
    assert "huggingface-cli download MahmoodLab/UNI --local-dir UNI/" in msg
    assert str(tmp_path / "empty-cache") in msg and "--weights UNI/" in msg
    assert "gated" in msg and "\n" not in msg
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(WeightsError, match=r"bioptimus/H-optimus-0 is not in the local Hugging "
                       r"Face cache '.*hf-home/hub'.*--local-dir H-optimus-0/"):
        create_encoder("hoptimus0")
    empty = tmp_path / "UNI"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    with pytest.raises(WeightsError, match=r"folder '.*UNI' holds no weights of preset 'uni' "
                       r"\(looked for pytorch_model\.bin; it holds README\.md\)"):
        create_encoder("uni", weights=empty)
    with pytest.raises(WeightsError, match=r"'.*nowhere\.bin' for encoder 'uni' do not exist"):
        create_encoder("uni", weights=tmp_path / "nowhere.bin")
