"""slide_ssl_preset: the rule behind ``wsi-ssl pretrain-slides --preset auto|paper``."""

from __future__ import annotations

import dataclasses

import pytest

from wsi_ssl.errors import ConfigError
from wsi_ssl.pretrain import SlideSSLPreset, slide_ssl_preset


def test_paper_is_giga_ssl_exactly_whatever_the_cohort():
    for n, bank, device in ((10, 8, "cpu"), (11_000, 256, "cuda")):
        p = slide_ssl_preset("paper", n_slides=n, bank_tiles=bank, device=device)
        assert p.settings() == {"tiles_per_view": 5, "batch_size": 256, "epochs": 3000,
                                "lr": 0.03, "temperature": 0.05}


@pytest.mark.parametrize("n, batch", [(10, 8), (40, 8), (48, 8), (128, 32), (500, 64),
                                      (1000, 128)])
def test_auto_small_cohort_uses_the_ablation_winner(n, batch):
    p = slide_ssl_preset("auto", n_slides=n, bank_tiles=256)
    assert p.settings() == {"tiles_per_view": 64, "batch_size": batch, "epochs": 300,
                            "lr": 1e-3, "temperature": 0.1}
    assert f"{n} slides" in p.reason and "k=64" in p.reason and "ablation" in p.reason


def test_auto_caps_k_at_the_bank_and_follows_the_device_on_large_cohorts():
    small_bank = slide_ssl_preset("auto", n_slides=128, bank_tiles=16)
    assert small_bank.tiles_per_view == 16 and "capped at the bank's 16" in small_bank.reason
    gpu = slide_ssl_preset("auto", n_slides=11_000, bank_tiles=256, device="cuda:0")
    cpu = slide_ssl_preset("auto", n_slides=11_000, bank_tiles=256, device="cpu")
    assert (gpu.batch_size, gpu.lr, gpu.temperature, gpu.epochs) == (256, 0.03, 0.05, 3000)
    assert cpu.epochs == 300 and gpu.tiles_per_view == cpu.tiles_per_view == 64
    assert "beyond the measured cohorts" in gpu.reason


def test_preset_is_frozen_and_described():
    p = slide_ssl_preset("auto", n_slides=128, bank_tiles=64)
    assert isinstance(p, SlideSSLPreset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.epochs = 1  # type: ignore[misc]
    assert p.describe().startswith("preset auto: tiles_per_view=64 batch_size=32 epochs=300 "
                                   "lr=0.001 temperature=0.1. 128 slides")


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="fast", n_slides=10, bank_tiles=8), r"preset='fast'"),
    (dict(preset="auto", n_slides=1, bank_tiles=8), r"at least 2 slides"),
    (dict(preset="auto", n_slides=10, bank_tiles=0), r"--views N"),
])
def test_bad_inputs(kwargs, match):
    preset = kwargs.pop("preset")
    with pytest.raises(ConfigError, match=match):
        slide_ssl_preset(preset, **kwargs)
