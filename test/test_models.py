"""Model preparation: the tiny model is built offline from the packaged tokenizer, once; the CLI parses."""

from __future__ import annotations

import json

import pytest

from ares.cli import build_parser
from ares.models import prepare_model


def test_tiny_model_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ARES_CACHE_DIR", str(tmp_path))
    path = prepare_model("tiny")
    assert path == tmp_path / "models" / "tiny"
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 49152)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    marker = path / "ares-model.json"
    before = marker.stat().st_mtime_ns
    assert prepare_model("tiny") == path
    assert marker.stat().st_mtime_ns == before, "a complete cached model must not be rebuilt"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary build dir left"


def test_prepare_cli_defaults_to_all_models_and_rejects_unknown():
    assert build_parser().parse_args(["model", "prepare"]).models == []
    assert build_parser().parse_args(["model", "prepare", "tiny"]).models == ["tiny"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "prepare", "bogus"])
    with pytest.raises(ValueError, match="unknown model"):
        prepare_model("bogus")
