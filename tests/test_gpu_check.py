"""The CPU twin of benchmarks/gpu_check.py: the same functions at toy sizes, so the GPU check
cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_cpu_twin_writes_every_field(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--cpu-twin", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    sizes = gpu_check.CPU_TWIN
    assert res["mode"] == "cpu-twin" and res["device"] == "cpu" and res["schema"] == 1
    assert res["batch_size"] == 64  # embed_slides's default batch size
    assert set(res["encoders"]) == {"resnet50", "vit_l_uni"}
    assert res["data"]["slides"] == sizes.n_slides
    for key, r in res["encoders"].items():
        assert r["model"] == dict(sizes.encoders)[key]
        assert r["dtype"] == r["device_dtype"] == "bfloat16"
        # bf16 autocast vs float32 on the same tiles: what the GPU run checks against 0.999
        assert 0.999 <= r["min_cosine"] <= r["mean_cosine"] <= 1.0 + 1e-6
        assert r["agree_tiles"] == sizes.agree_tiles
        assert r["alone_tiles_per_s"] > 0
        plain, bank = r["e2e"], r["e2e_bank"]
        assert plain["tiles"] == bank["tiles"] > 20  # the same slides, the same grid
        assert plain["view_tiles"] == 0
        assert bank["view_tiles"] == sizes.n_slides * sizes.views * sizes.view_tiles
        for e in (plain, bank):
            assert math.isclose(e["tiles_per_s"], (e["tiles"] + e["view_tiles"]) / e["seconds"])
            assert math.isclose(e["ratio_to_alone"], e["tiles_per_s"] / r["alone_tiles_per_s"])
            assert e["peak_gpu_mb"] is None and e["gpu_util_mean"] is None  # no GPU here
            assert e["peak_host_mb"] > 100 and e["warmup_s"] > 0
            assert 0 < e["encoder_busy"] < 1
    ssl = res["slide_ssl"]
    for dev in ("cpu", "device"):
        assert len(ssl[dev]["loss"]) == sizes.ssl_epochs
        assert all(math.isfinite(v) and v > 0 for v in ssl[dev]["loss"])
        assert ssl[dev]["views_per_s"] > 0
    assert ssl["max_rel_loss_gap"] < 1e-6  # CPU twice from one seed: the very same curve
    stream = res["slide_ssl_stream"]  # store vs memory: the same batches, so the same losses
    assert stream["same_losses"] is True and stream["slides"] == sizes.stream_slides
    assert stream["steps"] == sizes.stream_epochs * (sizes.stream_slides // sizes.stream_batch)
    assert math.isclose(stream["ratio"],
                        stream["store_steps_per_s"] / stream["memory_steps_per_s"])
    names = {t["name"] for t in res["targets"]}
    assert names == set(gpu_check.TARGETS)
    by = {t["name"]: t for t in res["targets"]}
    assert by["resnet50.min_cosine"]["held"] and by["slide_ssl.max_rel_loss_gap"]["held"]
    assert by["vit_l_uni.e2e_ratio"]["value"] == res["encoders"]["vit_l_uni"]["e2e"]["ratio_to_alone"]
    last = printed.strip().splitlines()[-2]
    assert last.startswith("TARGETS held: ") and "| NOT held: " in last
    assert "resnet50.min_cosine" in last.split("|")[0]


def test_judge_marks_a_missed_target(gpu_check):
    enc = {"e2e": {"ratio_to_alone": 0.5}, "e2e_bank": {"ratio_to_alone": 0.9},
           "min_cosine": 0.99}
    res = {"encoders": {"vit_l_uni": enc}, "slide_ssl": {"max_rel_loss_gap": 0.2}}
    held = {t["name"]: t["held"] for t in gpu_check.judge(res)}
    assert held == {"vit_l_uni.e2e_ratio": False, "vit_l_uni.e2e_bank_ratio": True,
                    "vit_l_uni.min_cosine": False, "slide_ssl.max_rel_loss_gap": False}
