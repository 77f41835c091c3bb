"""Clinical tables as the field writes them: the SurvPath/CLAM layout (``case_id, slide_id,
survival_months, censorship, ...``, ids with ``.svs``, several slides per patient), the
censoring flag, patient level, and outcome columns that must never become features."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest

from wsi_ssl.cli import main
from wsi_ssl.errors import InputError, LabelError
from wsi_ssl.eval import linear_probe, survival
from wsi_ssl.store import SlideEmbeddings


def _uuid(s: str) -> str:
    h = hashlib.sha1(s.encode()).hexdigest().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@pytest.fixture(scope="module")
def survpath(cohort):
    """Embeddings keyed by the file stem (as ``wsi-ssl embed`` writes them) and a SurvPath-style
    table whose slide ids carry ``.svs``; outcomes and labels are per patient."""
    emb, table = cohort
    stems = [f"{s}.{_uuid(s)}" for s in emb.slide_ids]
    emb = SlideEmbeddings(tuple(stems), emb.embeddings, {"source": "synthetic"})
    case = table["slide_id"].str[:12]
    first = table.groupby(case).transform("first")
    clinical = pd.DataFrame({
        "case_id": case, "slide_id": [s + ".svs" for s in stems],
        "survival_months": 12.0 * first["time"], "censorship": 1 - first["event"],
        "oncotree_code": np.where(first["label"] == "tumor", "IDC", "ILC"),
        "train": 1.0, "age": np.linspace(40, 80, len(table)),
    })
    return emb, clinical


SURV = dict(id_col="slide_id", patient_col="case_id", time="survival_months",
            censor_col="censorship", alpha=0.05, l1_ratio=0.5, n_bootstrap=20)


def test_survpath_table_runs_with_extension_ids_and_censorship(survpath, caplog):
    emb, clinical = survpath
    assert clinical["case_id"].duplicated().any()  # several slides per patient
    with caplog.at_level(logging.INFO, logger="wsi_ssl.eval._inputs"):
        rep = survival(emb, clinical, **SURV)
    lines = [r.getMessage() for r in caplog.records if "extension stripped" in r.getMessage()]
    assert len(lines) == 1 and f"{len(clinical)} of {len(clinical)} slide ids" in lines[0]
    assert rep.n_slides == len(clinical) and rep.level == "slide"
    assert rep.n_events == int((clinical["censorship"] == 0).sum())
    assert rep.c_index_mean > 0.6
    # the censoring flag is exactly the inverse event column
    as_event = survival(emb, clinical.assign(dead=1 - clinical["censorship"]),
                        **{**SURV, "censor_col": None, "event": "dead"})
    assert as_event.c_index_mean == rep.c_index_mean and as_event.risk == rep.risk


def test_true_mismatch_is_still_the_clear_error(survpath):
    emb, clinical = survpath
    bad = clinical.copy()
    bad.loc[3, "slide_id"] = "TCGA-ZZ-9999-01Z-00-DX1.ABC.svs"
    with pytest.raises(LabelError, match=r"not in the embeddings: \['TCGA-ZZ-9999.*\(1 in all\)"):
        survival(emb, bad, **SURV)


def test_patient_level_is_one_row_per_patient(survpath):
    emb, clinical = survpath
    rep = survival(emb, clinical, level="patient", **SURV)
    n_pat = clinical["case_id"].nunique()
    assert rep.level == "patient" and rep.n_rows == n_pat and rep.n_slides == len(clinical)
    assert rep.n_patients == n_pat and sorted(rep.slide_ids) == sorted(clinical["case_id"].unique())
    assert f"{len(clinical)} slides, {n_pat} patients" in rep.summary
    assert "level patient" in rep.summary
    # the row of a patient is the mean of its slides' embeddings
    probe = linear_probe(emb, clinical, id_col="slide_id", patient_col="case_id",
                         label_col="oncotree_code", level="patient", n_labeled=(), folds=3,
                         n_bootstrap=0, C=1.0)
    assert probe.level == "patient" and probe.n_rows == n_pat
    assert probe.n_slides == len(clinical) and probe.cv.auc_mean > 0.8
    x = pd.DataFrame(emb.embeddings.astype(np.float64), index=list(emb.slide_ids))
    stems = clinical["slide_id"].str[:-4]
    mean = x.loc[stems].groupby(clinical["case_id"].to_numpy()).mean()
    by_slide = linear_probe(mean, clinical.groupby("case_id", as_index=False).first()
                            .assign(slide_id=lambda d: d["case_id"]), label_col="oncotree_code",
                            n_labeled=(), folds=3, n_bootstrap=0, C=1.0)
    np.testing.assert_allclose(probe.cv.auc_runs, by_slide.cv.auc_runs, atol=1e-9)


def test_patient_level_refuses_disagreeing_slides(survpath):
    emb, clinical = survpath
    multi = clinical["case_id"][clinical["case_id"].duplicated()].iloc[0]
    bad = clinical.copy()
    bad.loc[bad.index[bad["case_id"] == multi][0], "survival_months"] += 5.0
    with pytest.raises(LabelError, match=rf"patients \['{multi}'\].*'survival_months'"):
        survival(emb, bad, level="patient", **SURV)


def test_outcome_columns_never_become_features(survpath, tmp_path):
    emb, clinical = survpath
    table = emb.to_pandas().reset_index()
    table["slide_id"] = table["slide_id"] + ".svs"
    leaky = table.merge(clinical[["slide_id", "survival_months", "censorship"]], on="slide_id")
    path = tmp_path / "features.csv"  # (parquet reads the same way; pyarrow is not installed)
    leaky.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"'survival_months' \(the time column\).*--feature-cols"):
        survival(path, clinical, **SURV)
    with pytest.raises(InputError, match=r"'censorship' \(the censoring column\)"):
        survival(path, clinical, **{**SURV, "time": "age"})
    feats = [c for c in table.columns if c != "slide_id"]
    rep = survival(path, clinical, feature_cols=feats, **SURV)
    ref = survival(emb, clinical, **SURV)
    np.testing.assert_allclose(rep.risk, ref.risk, atol=1e-4)
    with pytest.raises(InputError, match=r"'survival_months' \(the time column\)"):
        survival(path, clinical, feature_cols=[*feats, "survival_months"], **SURV)
    with pytest.raises(InputError, match=r"'oncotree_code' \(the label column\)"):
        linear_probe(clinical.assign(oncotree_code=1.0), clinical, label_col="oncotree_code",
                     patient_col="case_id", embedding_id_col="slide_id", n_labeled=())


def test_cli_on_a_survpath_table(survpath, tmp_path, capsys):
    emb, clinical = survpath
    npz = emb.save(tmp_path / "slides.npz")
    csv = tmp_path / "tcga_brca_all_clean.csv"
    clinical.to_csv(csv, index=False)
    out = tmp_path / "os"
    rc = main(["survival", str(npz), str(csv), "--patient-col", "case_id", "--time-col",
               "survival_months", "--censor-col", "censorship", "--level", "patient",
               "--alpha", "0.05", "--l1-ratio", "0.5", "--bootstrap", "100", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads((out / "survival.json").read_text())
    assert data["level"] == "patient" and data["n_slides"] == len(clinical)
    assert data["n_rows"] == data["n_patients"] == clinical["case_id"].nunique()
    assert data["config"]["censor_col"] == "censorship" and "level patient" in text
    rc = main(["probe", str(npz), str(csv), "--label-col", "oncotree_code", "--patient-col",
               "case_id", "--level", "patient", "--n-labeled", "--C", "1", "--folds", "3",
               "--bootstrap", "0", "--out", str(tmp_path / "probe")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"{len(clinical)} slides, {clinical['case_id'].nunique()} patients, level patient" \
        in text
