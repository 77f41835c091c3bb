"""Slide-encoder weights from local files only: random weights saved in each model's published
layout (TITAN's model.safetensors with its text tower, Prov-GigaPath's slide_encoder.pth
``{"model": ...}``, PRISM's file with its decoder and shared layers stored once, FEATHER's with
a ``model.`` prefix) load strictly and bit-identically from the file, a ``--local-dir`` folder
and a Hugging Face cache tree; another slide encoder's file, a truncated file and missing
weights give one clear line each."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wsi_ssl.encoders import create_slide_encoder, get_slide_preset
from wsi_ssl.encoders.slide._model import build_slide_model
from wsi_ssl.errors import WeightsError

REV = "0123456789abcdef0123456789abcdef01234567"
TINY = {
    "titan": {"depth": 1},
    "gigapath-slide": {"depth": 1},
    "prism": {"depth": 3, "transformer_depth": 1},
    "feather": {},
    "feather-uni2": {},
}


def _weights(name: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """A reduced instance of ``name`` with random weights (tied modules kept tied)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_slide_model(get_slide_preset(name), TINY[name], meta=False)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _published_layout(name: str, sd: dict[str, torch.Tensor], folder) -> str:
    """Write ``sd`` the way the model's hub repo stores it; return the file name."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "titan":  # Titan PreTrainedModel: vision and text towers in one safetensors
        extra = {"text_encoder.token_embedding.weight": torch.zeros(4, 8),
                 "text_encoder.ln_final.weight": torch.ones(8)}
        save_file({**sd, **extra}, str(folder / "model.safetensors"))
        return "model.safetensors"
    if name == "gigapath-slide":  # torch.save({"model": state_dict}) by the MAE trainer
        torch.save({"model": sd}, folder / "slide_encoder.pth")
        (folder / "pytorch_model.bin").write_bytes(b"the tile encoder lives here")
        return "slide_encoder.pth"
    if name == "prism":  # save_pretrained: shared tensors once, text decoder and heads around
        seen, kept = set(), {}
        for k, v in sd.items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                kept[k] = v.clone()
        extra = {"text_decoder.model.embed_tokens.weight": torch.zeros(5, 4),
                 "img_to_latents.to_latents.weight": torch.zeros(8, 4),
                 "temperature": torch.zeros(())}
        save_file({**kept, **extra}, str(folder / "model.safetensors"))
        assert len(kept) < len(sd)  # the layout really drops the shared names
        return "model.safetensors"
    save_file({f"model.{k}": v for k, v in sd.items()}, str(folder / "model.safetensors"))
    return "model.safetensors"


def _hf_cache(root, repo: str, local) -> None:
    """huggingface_hub's cache layout: blobs, snapshot symlinks, refs/main."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(local.iterdir())):
        blob = folder / "blobs" / f"b{i:04d}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(blob)


@pytest.mark.parametrize("name", sorted(TINY))
def test_published_layout_round_trips_through_file_folder_and_cache(name, tmp_path,
                                                                    monkeypatch):
    preset = get_slide_preset(name)
    sd = _weights(name)
    local = tmp_path / preset.local_dir_name
    filename = _published_layout(name, sd, local)
    cache = tmp_path / "hub"
    _hf_cache(cache, preset.hub_repo, local)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    kw = {"model_kwargs": TINY[name], "device": "cpu"}
    encs = {"file": create_slide_encoder(name, weights=local / filename, **kw),
            "folder": create_slide_encoder(name, weights=local, **kw),
            "cache": create_slide_encoder(name, **kw)}
    assert str(encs["cache"].weights).endswith(f"snapshots/{REV}/{filename}")
    for how, enc in encs.items():
        own = enc.model.state_dict()
        assert set(own) == set(sd), how
        for k, v in sd.items():
            assert torch.equal(own[k], v), (how, k)
    rng = np.random.default_rng(0)
    dim = encs["file"].tile_dim
    feats = rng.normal(size=(12, dim)).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * 512
    ref = encs["file"].encode(feats, coords, 512.0)
    for how, enc in encs.items():
        np.testing.assert_array_equal(enc.encode(feats, coords, 512.0), ref, err_msg=how)
    rand = create_slide_encoder(name, random_weights=True, **kw)
    assert not np.allclose(rand.encode(feats, coords, 512.0), ref)


def test_another_slide_encoders_weights_are_named(tmp_path):
    torch.save({"model": _weights("gigapath-slide")}, tmp_path / "slide_encoder.pth")
    with pytest.raises(WeightsError, match=r"slide_encoder\.pth' do not fit slide encoder "
                       r"'titan': \d+ missing keys.*unexpected keys.*Likely cause: this looks "
                       r"like 'gigapath-slide' weights, not 'titan': use "
                       r"create_slide_encoder\('gigapath-slide', \.\.\.\) / --slide-encoder "
                       r"gigapath-slide"):
        create_slide_encoder("titan", weights=tmp_path / "slide_encoder.pth",
                             model_kwargs={"depth": 1})
    save_file(_weights("titan"), str(tmp_path / "titan.safetensors"))
    with pytest.raises(WeightsError, match="looks like 'titan' weights, not 'gigapath-slide'"):
        create_slide_encoder("gigapath-slide", weights=tmp_path / "titan.safetensors",
                             model_kwargs={"depth": 1})
    save_file(_weights("feather-uni2"), str(tmp_path / "f.safetensors"))
    with pytest.raises(WeightsError, match=r"do not fit slide encoder 'feather': 1 shape "
                       r"mismatches.*patch_embed\.0\.weight \(512, 1536\) vs \(512, 768\).*"
                       r"looks like 'feather-uni2' weights, not 'feather'"):
        create_slide_encoder("feather", weights=tmp_path / "f.safetensors")


def test_truncated_missing_and_tied_mismatch(tmp_path, monkeypatch):
    torch.save({"model": _weights("gigapath-slide")}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "slide_encoder.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"slide_encoder\.pth': the file looks truncated"):
        create_slide_encoder("gigapath-slide", weights=tmp_path / "slide_encoder.pth",
                             model_kwargs={"depth": 1})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as info:
        create_slide_encoder("titan")
    msg = str(info.value)
    assert "huggingface-cli download MahmoodLab/TITAN --local-dir TITAN/" in msg
    assert "--weights TITAN/" in msg and "gated" in msg and "\n" not in msg
    # a folder of Prov-GigaPath's repo without the slide file: the tile file is not taken
    folder = tmp_path / "prov-gigapath"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"holds no weights of preset 'gigapath-slide' "
                       r"\(looked for slide_encoder\.pth"):
        create_slide_encoder("gigapath-slide", weights=folder)
    sd = _weights("prism")
    k1 = "image_resampler.perceiver.layers.1.xattn.xattn.to_q.weight"
    k2 = "image_resampler.perceiver.layers.2.xattn.xattn.to_q.weight"
    broken = {k: v.clone() for k, v in sd.items()}
    broken[k2] = broken[k1] + 1
    save_file(broken, str(tmp_path / "prism.safetensors"))
    with pytest.raises(WeightsError, match="must be the same \\(shared\\) tensor"):
        create_slide_encoder("prism", weights=tmp_path / "prism.safetensors",
                             model_kwargs=TINY["prism"])
