"""CONCH v1.5 (the tile encoder TITAN and FEATHER need): position-table interpolation and the
contrastive pooler against explicit computations written here, and its published weight file
(``pytorch_model_vision.bin``) loading strictly from a ``--local-dir`` folder."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from wsi_ssl.encoders import create_encoder, get_preset
from wsi_ssl.encoders._presets import build_trunk

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "out_dim": 16, "pooler_heads": 2}


def test_conch_v15_forward_against_an_explicit_computation():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = build_trunk(get_preset("conch-v1.5"), TINY).eval()
        with torch.no_grad():
            for p in tower.parameters():
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)  # a 4 x 4 patch grid against the 14 x 14 table
    t = tower.trunk
    tokens = F.conv2d(x, t.patch_embed.proj.weight, t.patch_embed.proj.bias, stride=16)
    tokens = tokens.flatten(2).transpose(1, 2)
    table = t.pos_embed[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    # DINO's recipe: scale factor (w0 + 0.1) / sqrt(N), bicubic, no antialiasing
    table = F.interpolate(table, scale_factor=(4.1 / 14, 4.1 / 14), mode="bicubic")
    assert table.shape[-2:] == (4, 4)
    pos = torch.cat([t.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, 16, 32)], 1)
    h = torch.cat([t.cls_token.expand(2, -1, -1), tokens], 1) + pos
    blk = t.blocks[0]
    a = blk.norm1(h)
    q, k, v = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(2, 17, 3, 2, 16).unbind(2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(2, 17, 32)
    h = h + blk.ls1.gamma * (o @ blk.attn.proj.weight.T + blk.attn.proj.bias)
    m = F.gelu(blk.norm2(h) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    h = t.norm(h + blk.ls2.gamma * (m @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias))
    pool = tower.attn_pool_contrast
    qv = pool.to_q(pool.ln_q(pool.query))  # (1, 16)
    kk, vv = pool.to_kv(pool.ln_k(h)).chunk(2, dim=-1)
    heads = []
    for sl in (slice(0, 8), slice(8, 16)):
        w = torch.softmax(qv[:, sl] @ kk[..., sl].transpose(1, 2) / math.sqrt(8), -1)
        heads.append(w @ vv[..., sl])
    want = tower.ln_contrast(pool.to_out(torch.cat(heads, -1))[:, 0])
    torch.testing.assert_close(tower(x), want, atol=1e-5, rtol=1e-4)


def test_conch_v15_published_file_loads_strictly_from_a_folder(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        sd = {k: v.contiguous() for k, v in build_trunk(get_preset("conch-v1.5"),
                                                        {"depth": 1}).state_dict().items()}
    assert "trunk.blocks.0.ls1.gamma" in sd and sd["trunk.pos_embed"].shape == (1, 197, 1024)
    assert sd["attn_pool_contrast.to_kv.weight"].shape == (1536, 1024)
    folder = tmp_path / "conchv1_5"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model_vision.bin")
    (folder / "meta.yaml").write_text("model: conch_v1_5\n")
    enc = create_encoder("conch_v15", weights=folder, model_kwargs={"depth": 1}, device="cpu")
    own = enc.model.trunk.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    tiles = np.random.default_rng(0).integers(0, 255, (2, 512, 512, 3), dtype=np.uint8)
    feats = enc.embed(tiles)
    assert feats.shape == (2, 768) and enc.input_size == 448 and enc.resize_size == 448
    rand = create_encoder("conch-v1.5", random_weights=True, model_kwargs={"depth": 1},
                          device="cpu")
    assert not torch.allclose(rand.embed(tiles), feats)
