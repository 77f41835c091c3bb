"""compare_embeddings / ``wsi-ssl compare``: a clearly better file wins with an interval that
excludes 0, identical files differ by exactly 0, slides missing from a file are dropped and
counted, survival joins with a time column, and the outputs are written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsi_ssl.cli import main
from wsi_ssl.errors import ConfigError
from wsi_ssl.eval import CompareReport, compare_embeddings
from wsi_ssl.store import SlideEmbeddings

FAST = dict(n_labeled=(20,), repeats=4, C=1.0, n_bootstrap=20)


def _noise(emb: SlideEmbeddings, seed: int = 9) -> SlideEmbeddings:
    x = np.random.default_rng(seed).normal(size=emb.embeddings.shape).astype(np.float32)
    return SlideEmbeddings(emb.slide_ids, x, {"source": "noise"})


@pytest.fixture(scope="module")
def planted(cohort) -> CompareReport:
    emb, table = cohort
    return compare_embeddings({"good": emb, "noise": _noise(emb)}, table, **FAST)


def test_planted_file_wins_with_interval_excluding_zero(planted):
    assert planted.names == ("good", "noise") and planted.n_dropped == 0
    assert planted.settings == ("n=20", "cv (5-fold)")
    for setting in ("cv", "n=20"):
        d = planted.difference(setting, "good", "noise")
        assert d.low > 0 and d.mean > 0.25 and d.excludes_zero
        assert planted.score(setting, "good").low > 0.5
        assert planted.score(setting, "noise").low < 0.5 < planted.score(setting, "noise").high
        back = planted.difference(setting, "noise", "good")
        assert (back.mean, back.low, back.high) == (-d.mean, -d.high, -d.low)
    # the paired difference is the difference of the per-split scores, on the same splits
    good, noise = planted.probes
    assert good.cv_fold_runs == noise.cv_fold_runs and good.heldout_runs == noise.heldout_runs
    cv = planted.difference("cv", "good", "noise")
    assert cv.mean == pytest.approx(good.cv.auc_mean - noise.cv.auc_mean, abs=1e-12)


def test_identical_files_differ_by_exactly_zero(cohort):
    emb, table = cohort
    rep = compare_embeddings({"a": emb, "b": emb}, table, **FAST)
    assert len(rep.differences) == 2
    for d in rep.differences:
        assert (d.mean, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert not d.excludes_zero


def test_slides_missing_from_a_file_are_dropped_and_counted(cohort):
    emb, table = cohort
    short = emb.subset(list(emb.slide_ids[5:]))
    with pytest.warns(UserWarning, match=r"5 of \d+ slides of .* not in every embedding file"):
        rep = compare_embeddings({"all": emb, "short": short}, table, n_labeled=(),
                                 C=1.0, n_bootstrap=0)
    assert rep.n_dropped == 5 and rep.dropped_ids == tuple(table["slide_id"][:5])
    assert rep.n_slides == len(table) - 5
    assert "5 slides of the table not in every file were left out" in rep.to_markdown()
    assert json.loads(rep.to_json())["n_dropped"] == 5


def test_survival_joins_with_a_time_column(cohort):
    emb, table = cohort
    rep = compare_embeddings({"good": emb, "noise": _noise(emb)}, table.drop(columns="label"),
                             time="time", event="event", n_bootstrap=20,
                             survival_kwargs={"alpha": 0.05, "l1_ratio": 0.5})
    assert rep.settings == ("survival",)
    d = rep.difference("survival", "good", "noise")
    assert d.metric == "C-index" and d.low > 0
    assert rep.score("survival", "good").mean > 0.62


def test_save_markdown_plot_and_html(planted, tmp_path):
    paths = planted.save(tmp_path / "cmp")
    frame = pd.read_csv(paths["csv"])
    assert list(frame["kind"].unique()) == ["score", "difference"]
    assert set(frame["name"]) == {"good", "noise", "good - noise"}
    md = paths["md"].read_text()
    assert "| cv (5-fold) | AUC |" in md and "good - noise" in md and "*" in md
    assert "patient bootstrap with refitting" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = paths["html"].read_text()
    assert "Comparison of slide embeddings" in html and "compare.png" in html


def test_cli_names_files_and_writes_the_report(cohort, tmp_path, capsys):
    emb, table = cohort
    a = emb.save(tmp_path / "slide_ssl.npz")
    b = _noise(emb).save(tmp_path / "mean_pool.npz")
    table.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "out"
    rc = main(["compare", str(a), f"noise={b}", "--labels", str(tmp_path / "labels.csv"),
               "--n-labeled", "20", "--repeats", "3", "--C", "1", "--bootstrap", "10",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "slide_ssl - noise" in text and "| n=20 | AUC |" in text
    assert {p.name for p in out.iterdir()} >= {"compare.csv", "compare.md", "compare.png",
                                               "compare.json", "compare.html"}
    rc = main(["compare", str(a), "--labels", str(tmp_path / "labels.csv"), "--out", str(out)])
    assert rc == 1 and "at least two embedding files" in capsys.readouterr().err


def test_config_errors(cohort):
    emb, table = cohort
    with pytest.raises(ConfigError, match="at least two"):
        compare_embeddings({"a": emb}, table)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        compare_embeddings({"a": emb, "b": emb}, table, label_col=None)
    with pytest.raises(ConfigError, match="both named 'x'"):
        compare_embeddings(["d1/x.npz", "d2/x.npz"], table)
