"""The typed configuration layer (llmpipe.config) and `llmpipe params check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.config import ParamsError, Params, load_params, load_stage_params, parse_params, read_yaml
from llmpipe.config.base import Section

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _with(edit) -> dict:
    data = read_yaml(PARAMS)
    edit(data)
    return data


def _errors(data) -> str:
    with pytest.raises(ParamsError) as exc:
        parse_params(data, "params.yaml")
    return str(exc.value)


def test_committed_params_validate():
    p = load_params(PARAMS)
    assert isinstance(p, Params)
    assert p.validate_.inputs and p.model.max_seq_len > 0 and p.eval.schema_.endswith(".json")


@pytest.mark.parametrize("section, bad, near", [
    ("validate", "strictt", "validate.strict"),
    ("train", "learning_rat", "train.learning_rate"),
    ("lora", "alpah", "lora.alpha"),
    ("quantize", "n_thread", "quantize.n_threads"),
    ("deploy", "stepz", "deploy.steps"),
])
def test_misspelled_key_names_full_path_and_nearest(section, bad, near):
    def edit(d):
        d[section][bad] = d[section].get(near.split(".")[-1])
    msg = _errors(_with(edit))
    assert f"{section}.{bad}: unknown key" in msg
    assert f"did you mean '{near}'" in msg


def test_nested_misspelling_and_several_problems_at_once():
    def edit(d):
        d["eval"]["fewshot"]["kk"] = 3
        d["deploy"]["thresholds"]["max_error_rat"] = 0.1
        d["train"]["epochs"] = "many"
        del d["gate"]["min_task_accuracy"]
    msg = _errors(_with(edit))
    assert "eval.fewshot.kk: unknown key (did you mean 'eval.fewshot.k'?)" in msg
    assert "deploy.thresholds.max_error_rat: unknown key (did you mean 'deploy.thresholds.max_error_rate'?)" in msg
    assert "train.epochs:" in msg
    assert "gate.min_task_accuracy: required key is missing" in msg


def test_unknown_section_is_an_error():
    msg = _errors(_with(lambda d: d.__setitem__("trian", {})))
    assert "trian: unknown key (did you mean 'train'?)" in msg


def _all_models(model: type[Section]):
    yield model
    for f in model.model_fields.values():
        for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, Section):
                yield from _all_models(t)


def test_no_defaults_in_code():
    # defaults live in params.yaml only: every field of every section model is required
    with_defaults = [f"{m.__name__}.{name}" for m in _all_models(Params)
                     for name, f in m.model_fields.items() if not f.is_required()]
    assert not with_defaults, f"fields with a default in code: {with_defaults}"


def test_stage_view_allows_declared_keys_only(tmp_path):
    cfg = load_stage_params(["validate", "model.max_seq_len"], PARAMS)
    assert cfg.validate.strict in (True, False)
    assert cfg.model.max_seq_len == load_params(PARAMS).model.max_seq_len
    with pytest.raises(ParamsError, match="reads params key 'model.dtype' but does not declare it"):
        cfg.model.dtype
    with pytest.raises(ParamsError, match="reads params key 'train'"):
        cfg.train
    with pytest.raises(ParamsError, match="declared params key 'model.nope' does not exist"):
        load_stage_params(["model.nope"], PARAMS)


def test_params_check_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "llmpipe.cli", "params", "check", "--params", str(PARAMS)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    bad = tmp_path / "params.yaml"
    data = read_yaml(PARAMS)
    data["split"]["seeed"] = data["split"].pop("seed")
    bad.write_text(yaml.safe_dump(data))
    res = subprocess.run([sys.executable, "-m", "llmpipe.cli", "params", "check", "--params", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert "split.seeed: unknown key (did you mean 'split.seed'?)" in res.stderr
    assert "split.seed: required key is missing" in res.stderr
