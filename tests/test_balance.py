"""Sample weights from manifest groups (``data.balance``)."""

from __future__ import annotations

import json

import pytest

from unclip.config import ConfigError
from unclip.data.balance import balance_weights, group_weights, manifest_labels

RECORDS = [
    {"key": "a1", "concept": "hand", "style": "noto"},
    {"key": "a2", "concept": "hand", "style": "noto"},
    {"key": "a3", "concept": "hand", "style": "noto"},
    {"key": "b1", "concept": "hand", "style": "twemoji"},
    {"key": "c1", "concept": "sun", "style": "noto"},
]


def test_labels_name_the_joint_value_of_the_fields():
    keys = ["c1", "a1", "b1", "a2", "a3"]
    assert manifest_labels(keys, RECORDS, ["concept", "style"], "x") == [0, 1, 2, 1, 1]
    assert manifest_labels(keys, RECORDS, ["concept"], "x") == [0, 1, 1, 1, 1]


def test_each_group_weighs_the_same_in_all():
    labels = manifest_labels(["a1", "a2", "a3", "b1", "c1"], RECORDS, ["concept", "style"], "x")
    weights = balance_weights(labels)
    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])
    assert sum(weights) == pytest.approx(3)  # three groups


def test_missing_samples_and_fields_are_named():
    with pytest.raises(ValueError, match="cfg.json: sample 'zz' is not in the manifest"):
        manifest_labels(["a1", "zz"], RECORDS, ["concept"], "cfg.json")
    with pytest.raises(ValueError, match="sample 'a1' has no 'colour'"):
        manifest_labels(["a1"], RECORDS, ["concept", "colour"], "cfg.json")


def test_group_weights_read_the_data_sets_manifest(tmp_path):
    assert group_weights(tmp_path, ["a1"], (), "cfg.json") is None  # no fields: uniform
    with pytest.raises(ConfigError, match="cfg.json: data.balance needs a manifest.jsonl"):
        group_weights(tmp_path, ["a1"], ["concept"], "cfg.json")
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert group_weights(tmp_path, ["a1", "c1"], ["style"], "cfg.json") == [0.5, 0.5]
    with pytest.raises(ConfigError, match="cfg.json: data.balance: sample 'a1' has no 'shape'"):
        group_weights(tmp_path, ["a1"], ["shape"], "cfg.json")
