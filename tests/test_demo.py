"""`wsi-ssl demo` end to end on a tiny cohort: every stage, the report, and resuming."""

from __future__ import annotations

import json

import pytest

from wsi_ssl._demo import DemoConfig, run_demo, summary_table
from wsi_ssl.cli import main

pytestmark = pytest.mark.slow

TINY = DemoConfig(n_slides=10, slide_epochs=3, views=4, view_tiles=16, repeats=2, test_size=0.3,
                  n_labeled=(4,), n_workers=1, device="cpu")


def test_demo_runs_every_stage_and_resumes(tmp_path):
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", TINY, say=lines.append)
    out = res.out_dir
    for rel in ("cohort/labels.csv", "tiles.zarr", "slide_model/config.json",
                "slide_embeddings.npz", "figures/tiling_qc.png", "summary.json"):
        assert (out / rel).exists(), rel
    html = res.report_html.read_text()
    assert "tiling_qc.png" in html and html.count("<img") >= 4
    s = json.loads((out / "summary.json").read_text())
    assert s["n_slides"] == 10 and s["embedding_dim"] == 512
    assert s["bytes_per_slide"] <= 2048
    assert set(s["probe"]) == {"slide-ssl", "mean-pool"}
    for rows in s["probe"].values():
        assert any(k.startswith("n=4") for k in rows)
        assert all(0.0 <= r["auc_mean"] <= 1.0 for r in rows.values())
    table = summary_table(s)
    assert "AUC slide-ssl" in table and "C-index" in table

    # a rerun reuses every finished step: nothing is embedded or trained again
    again: list[str] = []
    res2 = run_demo(tmp_path / "demo", TINY, say=again.append)
    text = "\n".join(again)
    assert "0 embedded, 10 reused" in text and "reusing the trained model" in text
    assert res2.summary["n_slides"] == 10


def test_demo_cli_help_and_bad_device(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--slides" in capsys.readouterr().out
