"""Slide-encoder presets: meta-device builds with the published parameter counts, pinned
state-dict manifests, and each architecture's position handling and output rule against an
independent computation written here (ALiBi from its definition, TITAN's grid from planted
coordinates at 20x and 40x, MAE's sine-cosine table, LongNet's dilated attention against a dense
reference, ABMIL's gated attention, PRISM's padding).

Regenerate the manifests after a deliberate change with ``WSI_SSL_UPDATE_MANIFESTS=1 pytest
tests/encoders/test_slide_presets.py`` and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.cli import main
from wsi_ssl.encoders import create_slide_encoder, get_slide_preset, list_slide_encoders
from wsi_ssl.encoders.slide import grid_positions
from wsi_ssl.encoders.slide._gigapath import dilated_attention, longnet_segment_lengths
from wsi_ssl.encoders.slide._layers import alibi_bias, alibi_slopes
from wsi_ssl.encoders.slide._model import slide_expected_shapes, slide_param_count

MANIFESTS = Path(__file__).parent / "manifests"
REQUIRED = ["titan", "gigapath-slide", "prism", "feather", "feather-uni2"]
# published parameter counts (millions) of what is built; sources in docs/slide-encoders.md
PUBLISHED = {"titan": 48.5, "gigapath-slide": 87.0, "prism": 99.0, "feather": 0.788,
             "feather-uni2": 1.181, "feather-uni": 0.919}


def test_required_presets_are_listed_with_aliases(capsys):
    names = list_slide_encoders()
    assert set(REQUIRED) <= set(names)
    assert get_slide_preset("TITAN").name == "titan"
    assert get_slide_preset("abmil.base.uni_v2.pc108-24k").name == "feather-uni2"
    facts = {n: (p.tile_encoder, p.mpp, p.tile_size, p.embed_dim)
             for n in names if (p := get_slide_preset(n))}
    assert facts["titan"] == ("conch-v1.5", 0.5, 512, 768)
    assert facts["gigapath-slide"] == ("prov-gigapath", 0.5, 256, 768)
    assert facts["prism"] == ("virchow", 0.5, 224, 1280)
    assert facts["feather-uni2"][0] == "uni2-h" and facts["feather"][0] == "conch-v1.5"
    assert main(["encoders", "--slide"]) == 0
    out = capsys.readouterr().out
    assert "huggingface-cli download MahmoodLab/TITAN --local-dir TITAN/" in out
    assert "gigapath-slide  prov-gigapath" in out and "48.5 M" in out


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_build_has_the_published_parameter_count(name):
    n = slide_param_count(get_slide_preset(name)) / 1e6
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n)


def _manifest(name: str) -> dict:
    shapes = slide_expected_shapes(get_slide_preset(name))
    items = sorted((k, list(s)) for k, s in shapes.items())
    return {"preset": name, "n_keys": len(shapes),
            "n_params_unique": slide_param_count(get_slide_preset(name)),
            "sha256_keys_shapes": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
            "keys": {k: s for k, s in items}}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_state_dict_keys_and_shapes_are_pinned(name):
    path = MANIFESTS / f"slide-{name}.json"
    got = _manifest(name)
    if os.environ.get("WSI_SSL_UPDATE_MANIFESTS"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert got["keys"] == want["keys"]
    assert got == want


def test_published_key_names_spot_checks():
    titan = slide_expected_shapes(get_slide_preset("titan"))
    assert titan["vision_encoder.patch_embed.0.weight"] == (768, 768)
    assert titan["vision_encoder.blocks.modules_list.5.attn.qkv.weight"] == (2304, 768)
    assert titan["vision_encoder.attn_pool_contrastive.attn.in_proj_weight"] == (2304, 768)
    assert titan["vision_encoder.attn_pool.query"] == (128, 768)
    assert titan["vision_encoder.proj"] == (768, 768)
    giga = slide_expected_shapes(get_slide_preset("gigapath-slide"))
    assert giga["patch_embed.proj.weight"] == (768, 1536)
    assert giga["encoder.layers.11.self_attn.inner_attn_ln.weight"] == (768,)
    assert giga["encoder.layers.0.ffn.ffn_layernorm.weight"] == (3072,)
    assert "pos_embed" not in giga and giga["encoder.layer_norm.weight"] == (768,)
    prism = slide_expected_shapes(get_slide_preset("prism"))
    assert prism["image_resampler.perceiver.latents"] == (513, 1280)
    assert prism["image_resampler.perceiver.layers.0.xattn.xattn.to_kv.weight"] == (2560, 2560)
    assert prism["image_resampler.perceiver.layers.7.tf.5.mhsa.mha.in_proj_weight"] == \
        (3840, 1280)
    feather = slide_expected_shapes(get_slide_preset("feather-uni2"))
    assert feather == {"patch_embed.0.weight": (512, 1536), "patch_embed.0.bias": (512,),
                       "global_attn.attention_a.0.weight": (384, 512),
                       "global_attn.attention_a.0.bias": (384,),
                       "global_attn.attention_b.0.weight": (384, 512),
                       "global_attn.attention_b.0.bias": (384,),
                       "global_attn.attention_c.weight": (1, 384),
                       "global_attn.attention_c.bias": (1,)}


def test_prism_shares_layers_as_published():
    enc = create_slide_encoder("prism", random_weights=True, device="cpu",
                               model_kwargs={"depth": 4, "transformer_depth": 1,
                                             "latent_seq": 4, "latent_dim": 16,
                                             "context_dim": 8, "mhsa_heads": 2})
    layers = enc.model.image_resampler.perceiver.layers
    assert layers[0]["xattn"] is not layers[1]["xattn"]
    assert layers[1]["xattn"] is layers[2]["xattn"] is layers[3]["xattn"]
    assert all(layers[i]["tf"] is layers[0]["tf"] for i in range(4))


# -- positions -----------------------------------------------------------------------------------
def test_alibi_slopes_and_bias_from_the_definition():
    # Press et al.: n a power of 2 -> 2^(-8 i / n), i = 1..n
    assert alibi_slopes(8) == pytest.approx([2 ** (-i) for i in range(1, 9)])
    assert alibi_slopes(16) == pytest.approx([2 ** (-i / 2) for i in range(1, 17)])
    # 12 heads: the 8-head slopes, then the odd-indexed 16-head ones
    assert alibi_slopes(12) == pytest.approx([2 ** (-i) for i in range(1, 9)]
                                             + [2 ** (-(2 * i - 1) / 2) for i in range(1, 5)])
    pts = torch.tensor([[0, 0], [0, 0], [3, 4], [1, 1]])
    prefix = torch.tensor([True, False, False, False])
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, pts, pts, prefix, prefix)
    for h, m in enumerate((0.5, 0.25)):
        for i in range(4):
            for j in range(4):
                want = 0.0 if i == 0 or j == 0 else -m * math.dist(pts[i].tolist(),
                                                                   pts[j].tolist())
                assert bias[h, i, j].item() == pytest.approx(want)
    # a whole grid, bit for bit as TITAN's float64 distance table cast to float32
    xy = np.stack(np.meshgrid(np.arange(30), np.arange(30), indexing="ij"), -1).reshape(-1, 2)
    table = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    slope = alibi_slopes(12)[3]
    no = torch.zeros(len(xy), dtype=torch.bool)
    got = alibi_bias(torch.tensor([slope]), torch.tensor(xy), torch.tensor(xy), no, no)[0]
    want = torch.tensor(table, dtype=torch.float32) * torch.tensor(slope) * -1
    assert torch.equal(got, want)


def _planted_cells() -> np.ndarray:
    cells = np.array([(x, y) for x in range(7) for y in range(5) if (x * 3 + y) % 4 != 0])
    return cells + np.array([2, 3])  # tissue does not start at the slide's corner


def test_titan_grid_is_the_same_from_20x_and_40x_coordinates():
    titan = get_slide_preset("titan")
    cells = _planted_cells()
    at20 = cells * 512 + np.array([37, 11])  # level-0 px of a 20x scan, stride 512
    at40 = cells * 1024 + np.array([70, 5])  # the same tissue scanned at 40x, stride 1024
    odd = np.rint(cells * 1024.4).astype(np.int64)  # 0.2441 µm/px scanner: fractional stride
    want = cells - cells.min(axis=0)
    for coords, stride in ((at20, 512.0), (at40, 1024.0), (odd, 1024.4)):
        np.testing.assert_array_equal(grid_positions(titan, coords, stride), want)
    # the trap the issue describes: a 40x slide read with the 20x patch size spreads the grid
    assert grid_positions(titan, at40, 512.0).max() == 2 * want.max()
    enc = create_slide_encoder("titan", random_weights=True, device="cpu",
                               model_kwargs={"depth": 1})
    feats = np.random.default_rng(0).normal(size=(len(cells), 768)).astype(np.float32)
    e20, e40 = enc.encode(feats, at20, 512.0), enc.encode(feats, at40, 1024.0)
    np.testing.assert_array_equal(e20, e40)
    assert not np.allclose(enc.encode(feats, at40, 512.0), e20)  # positions matter


def test_gigapath_positions_and_sincos_table():
    giga = get_slide_preset("gigapath-slide")
    coords = np.array([[0, 0], [512, 0], [1024, 1536]])
    np.testing.assert_array_equal(grid_positions(giga, coords, 512.0), [[0, 0], [1, 0], [2, 3]])
    with pytest.raises(Exception, match=r"outside its 1000 x 1000 position table"):
        grid_positions(giga, np.array([[0, 0], [600_000, 0]]), 512.0)
    # MAE's table for a small grid, from its definition: meshgrid(w, h), first half encodes w
    dim, side = 16, 6
    gw, gh = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    enc = create_slide_encoder("gigapath-slide", random_weights=True, device="cpu",
                               model_kwargs={"depth": 1, "dim": dim, "heads": 2, "ffn_dim": 8,
                                             "in_dim": 4, "slide_ngrids": side})
    grid = torch.tensor([[x, y] for x in range(side) for y in range(side)])
    pos_index = grid[:, 0] * side + grid[:, 1]  # LongNetViT.coords_to_pos, minus the cls slot
    got = enc.model.position_embedding(grid).numpy()
    np.testing.assert_allclose(got, table[pos_index.numpy()].astype(np.float32), atol=1e-6)


# -- output rules ----------------------------------------------------------------------------------
def _dense_dilated(q, k, v, segments, ratios):
    """One softmax per (query, head) over the multiset union of the keys each branch shows it:
    same segment (of the zero-padded sequence), same residue mod r as the head's group; padded
    keys count (score 0, value 0)."""
    B, L, H, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                num, den = torch.zeros(d, dtype=torch.float64), 0.0
                for w, r in zip(segments, ratios, strict=True):
                    g = min(w, L)
                    group = h // (-(-H // r) * r // r)
                    seg, p = divmod(i, g)
                    if p % r != group:
                        continue
                    gp = -(-g // r) * r
                    for pj in range(group, gp, r):
                        j = seg * g + pj
                        real = pj < g and j < L
                        s = float((q[b, i, h] @ k[b, j, h]) / math.sqrt(d)) if real else 0.0
                        num += math.exp(s) * (v[b, j, h].double() if real else 0)
                        den += math.exp(s)
                out[b, i, h] = (num / den).float()
    return out


@pytest.mark.parametrize("L,segments,ratios", [(11, [4, 8], [1, 2]), (9, [3, 16], [1, 4]),
                                               (6, [1024, 4], [1, 2])])
def test_longnet_dilated_attention_matches_a_dense_reference(L, segments, ratios):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(1, L, 4, 3, generator=g) for _ in range(3))
    got = dilated_attention(q, k, v, segments, ratios)
    torch.testing.assert_close(got, _dense_dilated(q, k, v, segments, ratios), atol=1e-5,
                               rtol=1e-4)
    small = dilated_attention(q, k, v, segments, ratios, chunk_bytes=64)  # one query at a time
    torch.testing.assert_close(small, got, atol=1e-6, rtol=1e-5)


def test_longnet_published_segment_lengths():
    assert longnet_segment_lengths() == [1024, 5792, 32768, 185363, 1048576]


def test_titan_output_against_an_explicit_computation():
    enc = create_slide_encoder("titan", random_weights=True, device="cpu",
                               model_kwargs={"depth": 1, "dim": 16, "heads": 2, "in_dim": 8,
                                             "pooler_heads": 2, "pooler_queries": 3})
    m = enc.model.vision_encoder
    with torch.no_grad():  # non-trivial norms so that a wrong LayerNorm would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rng = np.random.default_rng(1)
    cells = np.array([[0, 0], [0, 2], [1, 1], [3, 0]])
    feats = rng.normal(size=(4, 8)).astype(np.float32)
    feats = np.concatenate([feats, np.zeros((1, 8), np.float32)])  # an empty cell: dropped
    cells = np.concatenate([cells, [[2, 2]]])
    got = enc.encode(feats, cells * 512, 512.0)

    def ln(x, mod, eps):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], mod.weight, mod.bias, eps)

    x = torch.tensor(feats[:4]) @ m.patch_embed[0].weight.T + m.patch_embed[0].bias
    x = torch.cat([m.cls_token[0], torch.nn.functional.gelu(x)])
    pos = [None] + [tuple(c) for c in cells[:4]]
    blk = m.blocks.modules_list[0]
    h = ln(x, blk.norm1, 1e-6)
    qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(5, 3, 2, 8)
    heads = []
    for hd, slope in enumerate(alibi_slopes(2)):
        q, k, v = qkv[:, 0, hd], qkv[:, 1, hd], qkv[:, 2, hd]
        s = q @ k.T / math.sqrt(8)
        for i in range(1, 5):
            for j in range(1, 5):
                s[i, j] -= slope * math.dist(pos[i], pos[j])
        heads.append(torch.softmax(s, -1) @ v)
    x = x + torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = ln(x, blk.norm2, 1e-6)
    h = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    x = ln(x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias, m.norm, 1e-6)
    pool = m.attn_pool_contrastive
    kv = ln(x, pool.ln_k, 1e-5)
    qv = ln(pool.query, pool.ln_q, 1e-5)
    w, b = pool.attn.in_proj_weight, pool.attn.in_proj_bias
    q, k, v = qv @ w[:16].T + b[:16], kv @ w[16:32].T + b[16:32], kv @ w[32:].T + b[32:]
    outs = [torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(8), -1) @ v[:, s]
            for s in (slice(0, 8), slice(8, 16))]
    want = torch.cat(outs, -1) @ pool.attn.out_proj.weight.T + pool.attn.out_proj.bias
    np.testing.assert_allclose(got, want[0].detach().numpy(), atol=1e-5)
    # chunked attention (a few query rows at a time) gives the same embedding
    enc.model.chunk_bytes = 64
    np.testing.assert_allclose(enc.encode(feats, cells * 512, 512.0), got, atol=1e-6)


def test_feather_output_rule_and_padded_batches():
    enc = create_slide_encoder("feather", random_weights=True, device="cpu")
    rng = np.random.default_rng(2)
    slides = [rng.normal(size=(n, 768)).astype(np.float32) for n in (5, 17, 1)]
    m = enc.model
    f = torch.tensor(slides[1])
    h = torch.relu(f @ m.patch_embed[0].weight.T + m.patch_embed[0].bias)
    ga = m.global_attn
    a = torch.tanh(h @ ga.attention_a[0].weight.T + ga.attention_a[0].bias)
    b = torch.sigmoid(h @ ga.attention_b[0].weight.T + ga.attention_b[0].bias)
    score = (a * b) @ ga.attention_c.weight.T + ga.attention_c.bias
    want = (torch.softmax(score[:, 0], 0)[:, None] * h).sum(0)
    one = enc.encode(slides[1])
    np.testing.assert_allclose(one, want.detach().numpy(), atol=1e-5)
    batch = enc.encode_many([(s, None, None) for s in slides], batch_size=3)
    single = np.stack([enc.encode(s) for s in slides])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(enc.encode(slides[1][::-1].copy()), one, atol=1e-5)


def test_prism_padding_mask_is_exact_and_order_free():
    enc = create_slide_encoder("prism", random_weights=True, device="cpu",
                               model_kwargs={"depth": 3, "transformer_depth": 1,
                                             "latent_seq": 4, "latent_dim": 16,
                                             "context_dim": 2560, "mhsa_heads": 2})
    rng = np.random.default_rng(3)
    slides = [rng.normal(size=(n, 2560)).astype(np.float32) for n in (3, 9)]
    batch = enc.encode_many([(s, None, None) for s in slides], batch_size=2)
    single = np.stack([enc.encode(s) for s in slides])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(enc.encode(slides[1][::-1].copy()), single[1], atol=1e-5)
    assert batch.shape == (2, 16) and not np.allclose(batch[0], batch[1])
