"""transformers presets load hub checkpoints in the transformers-4 layout they were published in
(and in transformers-5 names), offline and strictly, through transformers' own key conversion.

The legacy checkpoints are fabricated here by inverting the renames transformers lists for each
class in ``transformers/conversion_mapping.py`` (ViT: ``encoder.layer.N.attention.attention.
query``, ``intermediate.dense``, ...; DINOv2: ``attention.attention.query``, the packed SwiGLU
``mlp.weights_in`` = cat(gate, up)); the library itself never renames keys.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.encoders.test_preset_weights import perturbed_trunk
from wsi_ssl.encoders import create_encoder, get_preset
from wsi_ssl.encoders._presets import PresetModel
from wsi_ssl.errors import WeightsError

D1 = {"num_hidden_layers": 1}


def _source(name: str) -> torch.nn.Module:
    """A depth-1 instance of ``name`` with weights unlike the default random init."""
    return perturbed_trunk(name, D1, seed=3)


def _legacy_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 ViTModel names -> the transformers-4 names of owkin/phikon."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", k)
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            k = k.replace(new, old)
        out[k] = v
    return out


def _legacy_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 Dinov2(WithRegisters)Model names -> transformers-4 names (SwiGLU packed)."""
    out = {}
    for k, v in sd.items():
        if ".mlp.up_proj." in k:
            continue
        if ".mlp.gate_proj." in k:
            out[k.replace("gate_proj", "weights_in")] = torch.cat(
                [v, sd[k.replace("gate_proj", "up_proj")]], dim=0)
            continue
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.down_proj", "mlp.weights_out")):
            k = k.replace(new, old)
        out[k] = v
    return out


CASES = {"phikon": _legacy_vit, "phikon-v2": _legacy_dinov2, "midnight-12k": _legacy_dinov2,
         "hibou-b": _legacy_dinov2}


@pytest.fixture()
def tiles():
    return np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", list(CASES))
def test_hub_layout_of_transformers_4_loads_exactly(name, tiles, tmp_path):
    from safetensors.torch import save_file

    preset = get_preset(name)
    src = _source(name)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    legacy = CASES[name](sd)
    assert set(legacy) != set(sd)  # the fabricated checkpoint really uses the old names
    if name == "midnight-12k":  # the packed SwiGLU of DINOv2 is what transformers must split
        assert any(k.endswith("mlp.weights_in.weight") for k in legacy)
    if name == "phikon":  # a pooler in the file is not part of the CLS output: ignored
        legacy["pooler.dense.weight"] = torch.zeros(768, 768)
        legacy["pooler.dense.bias"] = torch.zeros(768)
    folder = tmp_path / preset.local_dir_name  # `huggingface-cli download REPO --local-dir`
    folder.mkdir()
    save_file(legacy, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "from the hub, not read"}')
    torch.save(legacy, tmp_path / "legacy.bin")
    save_file(sd, str(tmp_path / "current.safetensors"))

    encs = {how: create_encoder(name, weights=w, model_kwargs=D1, device="cpu")
            for how, w in (("local-dir", folder), ("bin", tmp_path / "legacy.bin"),
                           ("current-names", tmp_path / "current.safetensors"))}
    for how, enc in encs.items():
        loaded = enc.model.trunk.state_dict()
        assert set(loaded) == set(sd), how
        for k, v in sd.items():
            assert torch.equal(loaded[k], v), (how, k)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = PresetModel(src, family="transformers", output=preset.output)(x)
        got = encs["local-dir"].model(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert want.shape == (2, preset.embed_dim)
    ref = encs["local-dir"].embed(tiles)
    for how, enc in encs.items():
        torch.testing.assert_close(enc.embed(tiles), ref, atol=0, rtol=0, msg=how)
    rand = create_encoder(name, random_weights=True, model_kwargs=D1, device="cpu")
    assert not torch.allclose(rand.embed(tiles), ref)


def test_wrong_transformers_checkpoints_give_the_clear_error(tmp_path):
    from safetensors.torch import save_file

    phikon = _legacy_vit({k: v.contiguous() for k, v in _source("phikon").state_dict().items()})
    save_file(phikon, str(tmp_path / "phikon.safetensors"))
    with pytest.raises(WeightsError, match=r"weights '.*phikon\.safetensors' do not fit encoder "
                       r"'phikon-v2': \d+ missing keys \(e\.g\. \[.*\]\); \d+ unexpected keys.*"
                       r"Likely cause: check that the file is owkin/phikon-v2's model\."
                       r"safetensors \(architecture overrides in use"):
        create_encoder("phikon-v2", weights=tmp_path / "phikon.safetensors", model_kwargs=D1)
    # right model, wrong depth: the second block's keys are missing, named
    with pytest.raises(WeightsError, match=r"do not fit encoder 'phikon': \d+ missing keys "
                       r"\(e\.g\. \['layers\.1\."):
        create_encoder("phikon", weights=tmp_path / "phikon.safetensors",
                       model_kwargs={"num_hidden_layers": 2})
    # a changed width: shape mismatches, not a silent re-initialisation
    wide = dict(phikon)
    wide["embeddings.cls_token"] = torch.zeros(1, 1, 32)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(WeightsError, match=r"'phikon': 1 shape mismatches \(e\.g\. \["
                       r"'embeddings\.cls_token \(1, 1, 32\) vs \(1, 1, 768\)'"):
        create_encoder("phikon", weights=tmp_path / "wide.safetensors", model_kwargs=D1)
    data = (tmp_path / "phikon.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match=r"cut\.safetensors': the file looks truncated"):
        create_encoder("phikon", weights=tmp_path / "cut.safetensors", model_kwargs=D1)


def test_wrapped_bfloat16_checkpoint_loads_as_float32(tmp_path):
    """A ``vit.``-prefixed (ViTForImageClassification-style) bfloat16 file: transformers strips
    its own base-model prefix; the tensors arrive as float32, equal to the file's values."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _source("phikon").state_dict().items()}
    save_file({f"vit.{k}": v.to(torch.bfloat16) for k, v in _legacy_vit(sd).items()},
              str(tmp_path / "model.safetensors"))
    enc = create_encoder("phikon", weights=tmp_path, model_kwargs=D1, device="cpu")
    loaded = enc.model.trunk.state_dict()
    for k, v in sd.items():
        assert loaded[k].dtype == torch.float32, k
        assert torch.equal(loaded[k], v.to(torch.bfloat16).float()), k
