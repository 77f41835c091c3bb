"""The shared estimator plumbing: declarative parameter validation and the one persistence
format (safetensors + versioned JSON) used by every fitted estimator."""

import json
import re

import numpy as np
import pytest
import torch

from wsi_ssl._persist import CONFIG_FILE, MODEL_FILE, load_estimator, save_estimator
from wsi_ssl._validation import Interval, Options, Pattern, describe, validate_params
from wsi_ssl.errors import ConfigError, WeightsError


@pytest.mark.parametrize("c, good, bad", [
    (Interval(int, 1, None), [1, 7, np.int64(3)], [0, 1.5, True, "2", None]),
    (Interval(float, 0, 1, closed="neither"), [0.5, 1e-9], [0, 1, float("nan"), float("inf")]),
    (Interval(float, 0, 1, closed="left"), [0, 0.99], [1, -0.1]),
    (Options({"balanced"}), ["balanced"], ["Balanced", None, ["balanced"]]),
    (Pattern(r"cuda(:\d+)?", "cuda or cuda:N"), ["cuda", "cuda:1"], ["cuda:", "gpu", 1]),
])
def test_constraints_accept_and_refuse(c, good, bad):
    for v in good:
        validate_params("Thing", {"p": v}, {"p": [c]})
    for v in bad:
        with pytest.raises(ConfigError, match="^" + re.escape(f"Thing(p={v!r}) must be ")):
            validate_params("Thing", {"p": v}, {"p": [c]})


def test_one_wording_names_owner_value_and_rule():
    with pytest.raises(ConfigError) as e:
        validate_params("MILClassifier", {"epochs": 0, "lr": 1.0},
                        {"lr": [Interval(float, 0, None, closed="neither")],
                         "epochs": [Interval(int, 1, None)]})
    assert str(e.value) == "MILClassifier(epochs=0) must be an integer >= 1."
    assert describe([Interval(int, 1, None), None]) == "an integer >= 1 or None"
    validate_params("X", {"early_stopping": None}, {"early_stopping": [Interval(int, 1, None), None]})
    with pytest.raises(ConfigError, match=r"X\(name=''\) must be a non-empty string"):
        validate_params("X", {"name": ""}, {"name": [str]})


def test_estimators_share_the_wording():
    from wsi_ssl.demo import DemoConfig
    from wsi_ssl.mil import MILClassifier
    from wsi_ssl.pretrain import TileSSLConfig

    with pytest.raises(ConfigError, match=r"^MILClassifier\(epochs=0\) must be an integer >= 1\.$"):
        MILClassifier(epochs=0).fit([np.zeros((2, 3))] * 4, [0, 1, 0, 1])
    with pytest.raises(ConfigError, match=r"^TileSSLConfig\(lr=0\) must be a number > 0\.$"):
        TileSSLConfig(lr=0)
    with pytest.raises(ConfigError, match=r"^DemoConfig\(repeats=0\) must be an integer >= 1\.$"):
        DemoConfig(repeats=0)


def test_persistence_round_trip_and_refusals(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_estimator(tmp_path / "m", format="fmt-a", params={"k": 3}, tensors=t,
                   state={"history": [1.0, 0.5]})
    cfg, tensors = load_estimator(tmp_path / "m", format="fmt-a", owner="Thing", hint="fit one")
    assert cfg["params"] == {"k": 3} and cfg["history"] == [1.0, 0.5]
    assert cfg["format_version"] == 1 and "version" in cfg
    assert torch.equal(tensors["w"], t["w"])
    with pytest.raises(WeightsError, match=r"holds format 'fmt-a', not a Other \('fmt-b'\)"):
        load_estimator(tmp_path / "m", format="fmt-b", owner="Other", hint="fit one")
    with pytest.raises(WeightsError, match=r"not a Thing directory .*fit one"):
        load_estimator(tmp_path / "missing", format="fmt-a", owner="Thing", hint="fit one")
    cfg_path = tmp_path / "m" / CONFIG_FILE
    newer = json.loads(cfg_path.read_text()) | {"format_version": 2}
    cfg_path.write_text(json.dumps(newer))
    with pytest.raises(WeightsError, match="newer wsi-ssl"):
        load_estimator(tmp_path / "m", format="fmt-a", owner="Thing", hint="fit one")
    cfg_path.write_text(json.dumps(newer | {"format_version": 1}))
    (tmp_path / "m" / MODEL_FILE).write_bytes(b"\x00" * 5)  # truncated weights
    with pytest.raises(WeightsError, match=MODEL_FILE):
        load_estimator(tmp_path / "m", format="fmt-a", owner="Thing", hint="fit one")
    with pytest.raises(ConfigError, match="not JSON serialisable"):
        save_estimator(tmp_path / "n", format="fmt-a", params={"k": object()}, tensors=t, state={})
