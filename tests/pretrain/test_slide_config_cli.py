"""One set of names and defaults for slide SSL: ``wsi-ssl pretrain-slides``, ``pretrain_slides``
and ``SlideSSL``. Every CLI default is SlideSSL's (or the preset's), and a value given on the
command line arrives unchanged, under the same name, in the fitted model and its config.json."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from wsi_ssl.cli import build_parser, main
from wsi_ssl.pretrain import (
    AUTO_PARAMS,
    DEFAULT_PRESET,
    SLIDE_SSL_DEFAULTS,
    SlideSSL,
    pretrain_slides,
)
from wsi_ssl.store import TileStore

DIM = 8
SIGNATURE = inspect.signature(SlideSSL).parameters

#: flag, SlideSSL parameter, a value that is not the default (the table the CLI must follow)
MODEL_FLAGS = [
    ("--head", "head", "abmil"),
    ("--embed-dim", "embed_dim", 24),
    ("--weight-decay", "weight_decay", 0.01),
    ("--warmup-epochs", "warmup_epochs", 0),
    ("--checkpoint-every", "checkpoint_every", 2),
    ("--readers", "readers", 0),
    ("--device", "device", "cpu"),
    ("--seed", "seed", 3),
]
#: the settings a preset chooses: no flag = the preset's value
PRESET_FLAGS = [
    ("--tiles-per-view", "tiles_per_view", 6),
    ("--batch-size", "batch_size", 4),
    ("--epochs", "epochs", 1),
    ("--lr", "lr", 0.002),
    ("--temperature", "temperature", 0.2),
]


def _parse(*argv: str):
    return build_parser().parse_args(["pretrain-slides", "STORE", "--out", "OUT", *argv])


@pytest.mark.parametrize("flag, name, value", MODEL_FLAGS)
def test_cli_default_is_slide_ssl_default(flag, name, value):
    default = getattr(_parse(), name)  # the flag's destination is the parameter's own name
    assert default == SIGNATURE[name].default == SLIDE_SSL_DEFAULTS[name]
    assert value != default
    assert getattr(_parse(flag, str(value)), name) == value


@pytest.mark.parametrize("flag, name, value", PRESET_FLAGS)
def test_preset_settings_default_to_the_preset(flag, name, value):
    assert getattr(_parse(), name) is None  # not given: the preset decides
    assert getattr(_parse(flag, str(value)), name) == value
    assert SIGNATURE[name].default == SLIDE_SSL_DEFAULTS[name]  # SlideSSL(): the paper's


def test_the_table_covers_every_flag_and_the_preset_default_is_shared():
    args = vars(_parse())
    params = set(args) - {"store", "out", "preset", "resume", "_run", "command", "verbose"}
    assert params == {n for _, n, _ in MODEL_FLAGS + PRESET_FLAGS} | {"head_kwargs"}
    assert params <= set(SIGNATURE)  # no second name for a SlideSSL parameter
    assert set(AUTO_PARAMS) == {n for _, n, _ in PRESET_FLAGS}
    assert args["preset"] == DEFAULT_PRESET
    assert inspect.signature(pretrain_slides).parameters["preset"].default == DEFAULT_PRESET
    assert args["head_kwargs"] == [] and SLIDE_SSL_DEFAULTS["head_kwargs"] is None


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A real zarr tile store: 6 slides of 20 tiles with a bank of 3 versions of 8 tiles."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cfg") / "store.zarr"
    store = TileStore(path, mode="a")
    store.bind_encoder("synthetic-enc", "fp-synthetic-enc", DIM)
    xy = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 256
    for i in range(6):
        f = rng.normal(size=(20, DIM)) + i % 2
        vi = np.stack([rng.choice(20, 8, replace=False) for _ in range(3)])
        store.write_slide(f"s{i}", f, xy, views=f[vi] + 0.1 * rng.normal(size=(3, 8, DIM)),
                          view_index=vi)
    return path


def test_values_given_on_the_cli_arrive_unchanged_in_the_model(tiny_store, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["pretrain-slides", str(tiny_store), "--out", str(out), "--head-option", "attn_dim=5"]
    for flag, _, value in MODEL_FLAGS + PRESET_FLAGS:
        argv += [flag, str(value)]
    assert main(argv) == 0, capsys.readouterr()
    given = {name: value for _, name, value in MODEL_FLAGS + PRESET_FLAGS}
    given["head_kwargs"] = {"attn_dim": 5}
    model = SlideSSL.load(out)
    params = model.get_params(deep=False)
    saved = json.loads((out / "config.json").read_text())["params"]
    for name, value in given.items():
        assert params[name] == value, name
        assert saved[name] == value, name
    # the settings used are the ones given (no preset value slipped in)
    assert (model.tiles_per_view_, model.batch_size_, model.epochs_, model.lr_,
            model.temperature_) == (6, 4, 1, 0.002, 0.2)
    assert model.net_.head.attn_v.out_features == 5 and model.net_.head.embed_dim == 24
    # parameters without a flag keep SlideSSL's defaults
    for name in ("proj_dims", "optimizer", "inference_batch", "standardize"):
        assert saved[name] == json.loads(json.dumps(SLIDE_SSL_DEFAULTS[name])), name
