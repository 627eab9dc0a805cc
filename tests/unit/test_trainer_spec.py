"""The canon name -> TRAIN_* environment contract, and models.toml parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gardener.core.canon import check_gf16_hidden, parse
from gardener.errors import ConfigError, GF16HiddenTooSmall
from gardener.trainer.spec import (
    VARIABLES,
    hidden_size_for,
    load_models_config,
    parse_models_config,
    trainer_variables,
)


@pytest.fixture(scope="module")
def models():
    return load_models_config()


def test_repo_config_maps_every_race_model(models):
    from gardener.core.canon import DEFAULT_MODELS

    assert set(DEFAULT_MODELS) <= set(models.models)
    assert {m.arch for m in models.models.values()} == {"mlp", "resmlp", "hybrid"}
    # Every default satisfies L-R9 so a plain GF16 name is deployable.
    assert all(m.hidden >= 256 for m in models.models.values())


def test_plain_name(models):
    canon = parse("IGLA-HYBRID-FP32-WSD-E0005-seed200")
    env = trainer_variables(canon, steps=500, corpus=None, models=models)
    assert tuple(env) == VARIABLES
    assert env["TRAIN_CANON_NAME"] == "IGLA-HYBRID-FP32-WSD-E0005-seed200"
    assert env["TRAIN_MODEL"] == "HYBRID"
    assert env["TRAIN_FORMAT"] == "FP32"
    assert env["TRAIN_SEED"] == "200"
    assert env["TRAIN_STEPS"] == "500"
    assert env["TRAIN_SCHEDULE"] == "wsd"
    assert env["TRAIN_HIDDEN"] == str(models.models["HYBRID"].hidden)
    assert float(env["TRAIN_LR"]) == models.models["HYBRID"].lr
    assert env["TRAIN_CORPUS"] == "stdlib"
    assert env["TRAIN_EXP_ID"] == "0005"
    assert env["TRAIN_EVAL_EVERY"] == "10"
    assert all(isinstance(v, str) for v in env.values())


def test_tags_set_variables(models):
    canon = parse("IGLA-JEPA-T-BF16-BS8-EMA10-GRADFIX-h512-SMOKE-seed520")
    env = trainer_variables(canon, steps=500, corpus="/data/x.txt", models=models)
    assert env["TRAIN_MODEL"] == "JEPA-T"
    assert env["TRAIN_BATCH"] == "8"
    assert float(env["TRAIN_EMA"]) == pytest.approx(0.9)
    assert float(env["TRAIN_GRAD_CLIP"]) == 1.0
    assert env["TRAIN_HIDDEN"] == "512"
    assert env["TRAIN_SCHEDULE"] == models.schedule
    assert env["TRAIN_CORPUS"] == "/data/x.txt"
    assert env["TRAIN_EXP_ID"] == ""


def test_untagged_defaults(models):
    env = trainer_variables(parse("IGLA-TRAIN_V2-GF16-CHAMP-seed300"), steps=10, corpus="",
                            models=models)
    assert env["TRAIN_BATCH"] == str(models.batch)
    assert float(env["TRAIN_EMA"]) == 0.0
    assert float(env["TRAIN_GRAD_CLIP"]) == 0.0
    assert env["TRAIN_CORPUS"] == "stdlib"


def test_hidden_size_override_and_lr9(models):
    canon = parse("IGLA-NCA-GF16-h128-SMOKE-seed501")
    assert hidden_size_for(canon, models) == 128
    with pytest.raises(GF16HiddenTooSmall):
        check_gf16_hidden(canon, hidden_size_for(canon, models))
    env = trainer_variables(canon, steps=5, corpus=None, models=models, hidden_size=768)
    assert env["TRAIN_HIDDEN"] == "768"
    plain = parse("IGLA-NCA-GF16-SMOKE-seed501")
    assert hidden_size_for(plain, models) == models.models["NCA"].hidden
    check_gf16_hidden(plain, hidden_size_for(plain, models))


def test_unknown_model_in_config_is_a_config_error(models):
    canon = parse("IGLA-ZETA-FP32-SMOKE-seed1", models=("ZETA",))
    with pytest.raises(ConfigError, match="ZETA"):
        trainer_variables(canon, steps=5, corpus=None, models=models)


def test_bad_config_rejected(tmp_path: Path):
    with pytest.raises(ConfigError, match="arch"):
        parse_models_config({"models": {"X": {"arch": "rnn", "hidden": 8, "lr": 1e-3,
                                              "context": 4}}})
    with pytest.raises(ConfigError, match="no \\[models"):
        parse_models_config({})
    with pytest.raises(ConfigError, match="schedule"):
        parse_models_config({"models": {"X": {"arch": "mlp", "hidden": 8, "lr": 1e-3,
                                              "context": 4}},
                             "tags": {"W": {"schedule": "linear"}}})
    bad = tmp_path / "m.toml"
    bad.write_text("[models\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_models_config(bad)


def test_explicit_path_round_trip(tmp_path: Path):
    p = tmp_path / "m.toml"
    p.write_text('[defaults]\nbatch = 4\n[tags.FAST]\nlr = 0.01\n'
                 '[models.HYBRID]\narch = "mlp"\nhidden = 300\nlr = 0.001\ncontext = 3\n')
    cfg = load_models_config(p)
    env = trainer_variables(parse("IGLA-HYBRID-FP32-FAST-SMOKE-seed2"), steps=3, corpus=None,
                            models=cfg)
    assert env["TRAIN_BATCH"] == "4"
    assert float(env["TRAIN_LR"]) == 0.01
    assert env["TRAIN_HIDDEN"] == "300"
