"""`wsi-ssl demo` end to end on a tiny cohort: every stage, a quiet console, the HTML report
(parsed: real tables, the pictures), and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from wsi_ssl.cli import main
from wsi_ssl.demo import QUICK, DemoConfig, run_demo, summary_table
from wsi_ssl.errors import ConfigError
from wsi_ssl.eval import linear_probe
from wsi_ssl.pretrain import mean_pool_embeddings
from wsi_ssl.store import SlideEmbeddings, TileStore

pytestmark = pytest.mark.slow


class _Page(HTMLParser):
    """Collects headings, tables (rows of cell texts) and image sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.pre = 0
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h1", "h2"):
            self._heading = []
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("h1", "h2") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        for buf in (self._cell, self._heading):
            if buf is not None:
                buf.append(data)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, str]:
    """``wsi-ssl demo --quick`` run once, end to end, as a user runs it (a fresh process):
    ``(output folder, console text)``."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "demo"
    env = {**os.environ, "WSI_SSL_PROGRESS": "0", "MPLBACKEND": "Agg"}
    env.pop("DASK_LOGGING__DISTRIBUTED", None)
    proc = subprocess.run([sys.executable, "-m", "wsi_ssl", "demo", "--quick", "--out", str(out)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_demo_cli_runs_every_stage_quietly(quick_demo):
    out, console = quick_demo
    # our own progress lines only: no dask scheduler / nanny / worker INFO chatter
    assert "[8] report" in console and "AUC slide-ssl" in console
    assert "INFO" not in console and "distributed.scheduler" not in console, console[-3000:]
    for rel in ("cohort/labels.csv", "tiles.zarr", "slide_model/config.json",
                "slide_embeddings.npz", "figures/tiling_qc.png", "figures/retrieval.png",
                "summary.json", "report.md", "retrieval/slide-ssl/retrieval.json"):
        assert (out / rel).exists(), rel
    s = json.loads((out / "summary.json").read_text())
    assert s["n_slides"] == 10 and s["embedding_dim"] == 512 and s["bytes_per_slide"] <= 2048
    assert set(s["probe"]) == set(s["retrieval"]["value"]) == {"slide-ssl", "mean-pool"}
    assert set(s["retrieval"]["value"]["slide-ssl"]) == {"acc@1", "acc@3", "acc@5", "mAP@5"}
    assert s["localisation"]["slides"] >= 1
    assert "C-index" in summary_table(s) and "mAP@5" in summary_table(s)


def test_demo_html_report_has_real_tables_and_pictures(quick_demo):
    out, _ = quick_demo
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.pre == 0  # no raw text blocks: real tables
    assert page.headings[0] == "wsi-ssl demo report"
    assert {"Few-shot classification: slide SSL vs mean pooling", "Survival",
            "Where the slide encoder looks", "Slide retrieval"} <= set(page.headings)
    settings, auc = page.tables[0], page.tables[1]
    assert [r[0] for r in settings][:3] == ["setting", "slides", "tiles"]
    assert auc[0] == ["labelled slides", "AUC slide-ssl", "AUC mean-pool"]
    assert auc[1][0].startswith("n=4") and "±" in auc[1][1]
    retrieval = next(t for t in page.tables if t[0][0] == "metric")
    assert [r[0] for r in retrieval[1:]] == ["acc@1", "acc@3", "acc@5", "mAP@5"]
    srcs = [img["src"] for img in page.images]
    assert any("tiling_qc.png" in x for x in srcs) and any("retrieval.png" in x for x in srcs)
    heat = [x for x in srcs if x.startswith("heatmaps/") and x.endswith("_attention.png")]
    assert len(heat) == 2  # one positive, one negative slide
    assert any(x.endswith("_clusters.png") for x in srcs)
    for img in page.images:  # every picture exists, has alt text and a screen-sized width
        assert (out / img["src"]).is_file(), img["src"]
        assert img["alt"] and int(img["width"]) <= 1000


def test_demo_tables_hold_what_the_steps_computed(quick_demo):
    """Each probe row is what linear_probe gives on the saved slide-SSL embeddings and on the
    mean-pooled tile features of the store (the means do not depend on the bootstrap, so the
    check skips the intervals: ``n_bootstrap=0``); the retrieval values are the saved ones."""
    out, _ = quick_demo
    s = json.loads((out / "summary.json").read_text())
    ssl = SlideEmbeddings.load(out / "slide_embeddings.npz")
    labels = pd.read_csv(out / "cohort" / "labels.csv", dtype={"slide_id": str})
    store = TileStore(out / "tiles.zarr", mode="r")
    for name, emb in (("slide-ssl", ssl), ("mean-pool", mean_pool_embeddings(store, ssl.slide_ids))):
        rep = linear_probe(emb, labels, n_labeled=(*QUICK.n_labeled, None), repeats=QUICK.repeats,
                           test_size=QUICK.test_size, seed=QUICK.seed, n_bootstrap=0
                           ).to_frame().set_index("name")
        assert set(s["probe"][name]) == set(rep.index)
        for row, vals in s["probe"][name].items():
            assert vals["auc_mean"] == pytest.approx(rep.loc[row, "auc_mean"], abs=1e-9), (name, row)
    for name in ("slide-ssl", "mean-pool"):
        saved = json.loads((out / "retrieval" / name / "retrieval.json").read_text())["metrics"]
        assert {m: v["value"] for m, v in saved.items()} == pytest.approx(
            s["retrieval"]["value"][name])


def test_demo_rerun_reuses_every_finished_step(quick_demo):
    out, _ = quick_demo
    again: list[str] = []
    res2 = run_demo(out, QUICK, say=again.append)  # nothing is embedded or trained again
    text = "\n".join(again)
    assert "0 embedded, 10 reused" in text and "reusing the trained model" in text
    assert res2.summary["n_slides"] == 10
    assert Path(res2.report_html).stat().st_size > 2000


def test_demo_cli_bad_device_is_a_one_line_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--device", "tpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "device='tpu'" in err and "--device" in err
    assert not out.exists()  # refused before the cohort is generated


def test_demo_config_is_keyword_only_and_validated():
    with pytest.raises(TypeError):
        DemoConfig(10)  # the positional form is refused
    assert DemoConfig(n_slides=10, n_labeled=[4, 8]).n_labeled == (4, 8)  # stored as a tuple
    for bad, match in (({"n_slides": 2}, "n_slides=2"), ({"test_size": 1.0}, "test_size=1.0"),
                       ({"n_labeled": ()}, "n_labeled=()"), ({"n_labeled": (1,)}, "n_labeled=1"),
                       ({"mpp": 0}, "mpp=0"), ({"n_workers": 0}, "n_workers=0"),
                       ({"slide_epochs": 2.5}, "slide_epochs=2.5"), ({"device": "gpu"}, "gpu")):
        with pytest.raises(ConfigError, match=match):
            DemoConfig(**bad)


def test_demo_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--slides" in text and "--quick" in text
