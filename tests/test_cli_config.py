"""One source per embed setting (issue 22 §1): every default of ``wsi-ssl embed`` / ``wsi-ssl
tile`` (and of ``tile_grid`` / ``tile_slides``) is the EmbedConfig field's, a value given on the
command line arrives unchanged in the store's slide attrs, and ``tile`` and ``embed`` cut the
same grid for the same encoder preset."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import numpy as np
import pytest

from wsi_ssl.cli import build_parser, main
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import (
    PRESET_FIELDS,
    EmbedConfig,
    grid_settings,
    load_grid,
    tile_grid,
    tile_slides,
)

FIELDS = [f.name for f in dataclasses.fields(EmbedConfig)]
#: fields that are not options: recorded by embed_slides itself
NOT_OPTIONS = {"settings_from_preset"}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _config_actions(name: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _subparser(name)._actions if a.dest in FIELDS}


@pytest.mark.parametrize("command", ["embed", "tile"])
def test_every_cli_default_is_the_config_default(command):
    actions = _config_actions(command)
    assert actions, f"wsi-ssl {command} has no EmbedConfig options"
    for dest, action in actions.items():
        assert action.option_strings == ["--" + dest.replace("_", "-")], dest
        if dest in PRESET_FIELDS:  # None = the encoder preset's, else the field default
            assert action.default is None, (command, dest, action.default)
        else:
            assert action.default == EmbedConfig.default(dest), (command, dest, action.default)
            assert type(action.default) is type(EmbedConfig.default(dest)), (command, dest)
    # the preset fields without a preset resolve to the field defaults
    assert grid_settings(None) == (EmbedConfig.default("mpp"), EmbedConfig.default("tile_size"),
                                   None)
    assert grid_settings("tiny-cnn") == grid_settings(None)


def test_embed_offers_every_setting_and_tile_the_grid_ones():
    assert set(_config_actions("embed")) == set(FIELDS) - NOT_OPTIONS
    assert set(_config_actions("tile")) == {"mpp", "tile_size", "min_tissue", "overlap",
                                            "assume_mpp", "backend"}


@pytest.mark.parametrize("fn", [tile_grid, tile_slides])
def test_library_grid_defaults_are_the_config_defaults(fn):
    params = inspect.signature(fn).parameters
    for name in ("mpp", "tile_size", "overlap", "min_tissue"):
        assert params[name].default == EmbedConfig.default(name), (fn.__name__, name)


# --------------------------------------------------------------- CLI value -> stored attrs

#: a non-default value per stored setting: (field, CLI value, value in embed_settings)
STORED = [
    ("mpp", "2.0", 2.0),
    ("tile_size", "64", 64),
    ("overlap", "8", 8),
    ("min_tissue", "0.1", 0.1),
    ("views", "2", 2),
    ("view_tiles", "8", 8),
    ("seed", "3", 3),
    ("dtype", "float32", "float32"),
    ("backend", "tiffslide", "tiffslide"),
]
#: run-only settings (not stored): they reach the EmbedConfig unchanged
RUN_ONLY = [
    ("batch_size", "16", 16),
    ("read_threads", "2", 2),
    ("prefetch", "2", 2),
    ("device", "cpu", "cpu"),
    ("assume_mpp", "0.3", 0.3),
]


def test_the_tables_cover_every_setting():
    covered = {f for f, _, _ in STORED + RUN_ONLY} | {"augment"}
    assert covered == set(FIELDS) - NOT_OPTIONS


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, slides_dir):
    """One ``wsi-ssl embed`` of a real slide with every setting at a non-default value."""
    store = tmp_path_factory.mktemp("cli") / "s.zarr"
    argv = ["embed", str(slides_dir / "cmu-1-small-region.svs"), "--store", str(store),
            "--encoder", "tiny-cnn", "--scheduler", "sync", "--augment", "none"]
    for field, value, _ in STORED + RUN_ONLY:
        argv += ["--" + field.replace("_", "-"), value]
    assert main(argv) == 0
    ts = TileStore(store, mode="r")
    return ts.slide_attrs(ts.slide_ids[0])


@pytest.mark.parametrize("field,value,stored", STORED, ids=[s[0] for s in STORED])
def test_a_cli_setting_arrives_unchanged_in_the_store(embedded, field, value, stored):
    assert EmbedConfig.default(field) != stored  # a value that proves something
    assert embedded["embed_settings"][field] == stored
    assert embedded["embed_settings"]["settings_from_preset"] is None


def test_the_augment_preset_arrives_in_the_store(embedded):
    assert EmbedConfig.default("augment") != "none"
    assert embedded["embed_settings"]["augment_preset"] == "none"
    assert embedded["n_views"] == 2 and embedded["view_tiles"] == 8
    assert embedded["mpp"] == 2.0 and embedded["slide_mpp"] == pytest.approx(0.499)


@pytest.mark.parametrize("field,value,expected", RUN_ONLY, ids=[s[0] for s in RUN_ONLY])
def test_a_run_only_cli_setting_reaches_the_config(field, value, expected):
    from wsi_ssl.cli._embed import config_overrides
    from wsi_ssl.tiling._config import embed_config

    args = build_parser().parse_args(["embed", "x.svs", "--store", "s.zarr", "--encoder",
                                      "tiny-cnn", "--" + field.replace("_", "-"), value])
    assert EmbedConfig.default(field) != expected
    assert getattr(embed_config("tiny-cnn", None, config_overrides(args)), field) == expected


# --------------------------------------------------------------- tile and embed: one grid


@pytest.fixture()
def small_preset():
    """A user preset with its own resolution (2 µm/px, 96 px) and a one-block ViT-S."""
    from wsi_ssl.encoders import get_preset
    from wsi_ssl.encoders._presets import _BY_NAME, _USER, register_preset

    base = get_preset("kaiko-vits16")
    preset = register_preset(dataclasses.replace(base, name="test-grid-preset", aliases=(),
                                                 mpp=2.0, tile_size=96,
                                                 kwargs={**base.kwargs, "depth": 1}))
    yield preset
    _USER.pop(preset.name, None)
    _BY_NAME.pop(preset.name, None)


def test_tile_and_embed_cut_the_same_grid_for_the_same_encoder(small_preset, slides_dir,
                                                               tmp_path):
    slide = slides_dir / "cmu-1-small-region.svs"
    assert main(["tile", str(slide), "--out", str(tmp_path / "tiles"), "--encoder",
                 small_preset.name, "--no-plot"]) == 0
    saved = load_grid(tmp_path / "tiles" / "cmu-1-small-region")
    assert (saved.grid.mpp, saved.grid.tile_size) == (2.0, 96)
    store = tmp_path / "s.zarr"
    assert main(["embed", str(slide), "--store", str(store), "--encoder", small_preset.name,
                 "--random-weights", "--scheduler", "sync", "--batch-size", "16"]) == 0
    ts = TileStore(store, mode="r")
    rec = ts[ts.slide_ids[0]]
    assert rec.attrs["embed_settings"]["settings_from_preset"] == small_preset.name
    assert len(rec.coords) > 5
    np.testing.assert_array_equal(np.asarray(rec.coords), saved.grid.coords)
    # without --encoder, tile falls back to the EmbedConfig defaults, as embed does
    assert main(["tile", str(slide), "--out", str(tmp_path / "plain"), "--no-plot"]) == 0
    plain = load_grid(tmp_path / "plain" / "cmu-1-small-region")
    assert (plain.grid.mpp, plain.grid.tile_size) == (EmbedConfig.default("mpp"),
                                                      EmbedConfig.default("tile_size"))
