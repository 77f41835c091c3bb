"""``wsi-ssl probe`` and ``wsi-ssl survival`` through wsi_ssl.cli.main."""

from __future__ import annotations

import json

import pytest

from wsi_ssl.cli import main


@pytest.fixture()
def files(cohort, tmp_path):
    emb, table = cohort
    npz = emb.save(tmp_path / "slides.npz")
    csv = tmp_path / "other_tool.csv"
    emb.to_pandas().reset_index().rename(columns={"slide_id": "case"}).to_csv(csv, index=False)
    labels = tmp_path / "labels.csv"
    table.rename(columns={"slide_id": "sid", "label": "msi", "time": "os_days",
                          "event": "dead"}).to_csv(labels, index=False)
    return npz, csv, labels


def test_probe_cli_writes_report(files, tmp_path, capsys):
    npz, csv, labels = files
    out = tmp_path / "probe"
    rc = main(["probe", str(npz), str(labels), "--label-col", "msi", "--id-col", "sid",
               "--n-labeled", "10", "all", "--repeats", "2", "--C", "1", "--bootstrap", "20",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cv (5-fold)" in text and "n=10" in text and "auc_mean" in text
    data = json.loads((out / "probe.json").read_text())
    assert data["config"]["label_col"] == "msi" and len(data["results"]) == 3
    assert (out / "probe.png").stat().st_size > 1000
    # another tool's CSV table of embeddings, CV only
    rc = main(["probe", str(csv), str(labels), "--label-col", "msi", "--id-col", "sid",
               "--n-labeled", "--C", "10", "--no-groups", "--bootstrap", "0",
               "--out", str(tmp_path / "probe2")])
    assert rc == 0
    data2 = json.loads((tmp_path / "probe2" / "probe.json").read_text())
    assert [r["setting"] for r in data2["results"]] == ["cv"]
    assert data2["results"][0]["auc_mean"] > 0.85


def test_survival_cli_writes_report(files, tmp_path, capsys):
    npz, _, labels = files
    out = tmp_path / "surv"
    rc = main(["survival", str(npz), str(labels), "--id-col", "sid", "--time-col", "os_days",
               "--event-col", "dead", "--alpha", "0.05", "--l1-ratio", "0.5", "--bootstrap", "20",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "C-index" in text and "log-rank" in text and "n_nonzero" in text
    assert "level slide" in text and "0 failed inner fits" in text
    data = json.loads((out / "survival.json").read_text())
    assert data["config"]["time"] == "os_days" and data["c_index_mean"] > 0.6
    assert (out / "survival.png").exists() and (out / "survival_risk.csv").exists()


def test_cli_errors_are_one_line(files, tmp_path, capsys):
    npz, _, labels = files
    rc = main(["probe", str(npz), str(labels), "--id-col", "sid", "--out", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "wsi-ssl probe: error:" in err and "no label column 'label'" in err
    rc = main(["survival", str(npz), str(labels), "--id-col", "sid", "--time-col", "os_days",
               "--event-col", "msi", "--out", str(tmp_path)])
    assert rc == 1
    assert "values not in {0, 1} in 'msi'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --event-col and --censor-col are exclusive
        main(["survival", str(npz), str(labels), "--event-col", "dead", "--censor-col", "alive",
              "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    rc = main(["probe", str(npz), str(labels), "--label-col", "msi", "--id-col", "sid",
               "--n-labeled", "ten", "--out", str(tmp_path)])
    assert rc == 1
    assert "--n-labeled 'ten'" in capsys.readouterr().err
