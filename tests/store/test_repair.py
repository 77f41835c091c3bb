"""The store reports what was damaged and how it was made (``VerifyReport.repair``, a
``RepairPlan``); the CLI words the ``wsi-ssl embed --repair`` command from it."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from wsi_ssl.cli._repair import repair_command, with_repair_command
from wsi_ssl.errors import RepairSettingsError
from wsi_ssl.store import RepairPlan, TileStore

SETTINGS = {"mpp": 1.0, "tile_size": 64, "overlap": 0, "min_tissue": 0.25, "views": 2,
            "view_tiles": 4, "augment_preset": "light", "seed": 3, "dtype": "float32"}


def _damaged_store(tmp_path, **attrs) -> TileStore:
    s = TileStore(tmp_path / "s.zarr")
    s.bind_encoder("tiny-cnn", "fp", 8)
    rng = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        s.write_slide(sid, rng.normal(size=(5, 8)), rng.integers(0, 99, (5, 2)),
                      views=rng.normal(size=(2, 4, 8)), view_index=rng.integers(0, 5, (2, 4)),
                      attrs={"encoder": "tiny-cnn", "embed_settings": SETTINGS, **attrs})
    for sid in ("c", "a"):
        (s.path / "slides" / sid / "features" / "c.0.0").unlink()
    return s


def test_verify_returns_the_damaged_slides_and_their_settings(tmp_path):
    s = _damaged_store(tmp_path, encoder_weights="random", mpp_assumed=True, slide_mpp=0.25)
    rep = s.verify()
    plan = rep.repair
    assert isinstance(plan, RepairPlan) and set(plan.slide_ids) == {"a", "c"}
    assert plan.store == s.path and plan.encoder == "tiny-cnn" and not plan.imported
    assert (plan.mpp, plan.tile_size, plan.views, plan.view_tiles, plan.seed, plan.dtype,
            plan.augment, plan.assume_mpp) == (1.0, 64, 2, 4, 3, "float32", "light", 0.25)
    assert plan.settings() == {"encoder": "tiny-cnn", "mpp": 1.0, "tile_size": 64,
                               "min_tissue": 0.25, "views": 2, "view_tiles": 4,
                               "augment": "light", "seed": 3, "dtype": "float32",
                               "assume_mpp": 0.25}
    cmd, note = repair_command(plan).split("   (")
    assert note.startswith("add --weights FILE")
    # defaults (--min-tissue 0.25) left out, everything else as recorded
    assert shlex.split(cmd) == [
        "wsi-ssl", "embed", "--store", str(s.path), "--repair", "--encoder", "tiny-cnn",
        "--random-weights", "--mpp", "1.0", "--tile-size", "64", "--views", "2",
        "--view-tiles", "4", "--seed", "3", "--dtype", "float32", "--augment", "light",
        "--assume-mpp", "0.25"]


def test_imported_slides_are_re_imported_not_re_embedded(tmp_path):
    plan = _damaged_store(tmp_path, imported=True).verify().repair
    assert plan.imported
    assert repair_command(plan) == (f"re-import the damaged slides with TileStore("
                                    f"{str(plan.store)!r}).import_h5(paths, overwrite=True)")


def test_a_repair_settings_error_gets_the_command(tmp_path):
    plan = RepairPlan.from_attrs(tmp_path, ["x"], {"encoder": "tiny-cnn",
                                                   "embed_settings": SETTINGS})

    def refuse() -> None:
        raise RepairSettingsError("slide 'x' was embedded with other settings.", repair=plan)

    with pytest.raises(RepairSettingsError, match=r"other settings\. The command: wsi-ssl "
                       r"embed --store .* --repair --encoder tiny-cnn --mpp 1\.0") as info:
        with_repair_command(refuse)
    assert info.value.repair is plan
    assert with_repair_command(lambda a, b=0: a + b, 1, b=2) == 3
