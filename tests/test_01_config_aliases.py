"""The records' launch-line names (RECORD_ENV_ALIASES, issue 8): a name with an exact equivalent
gives the same Hyperparameters as our own variable and logs the mapping; a value without one, an
alias set together with its target, or two aliases that disagree raise a ConfigError naming our
variable; unknown owned names are still refused.

    python3 -m pytest -q tests/test_01_config_aliases.py
"""

import dataclasses

import pytest

import train_gpt as tg

# The #0329 (PR #1060) command from its README (stack.md 13), USE_GPTQ has no owned prefix.
LINE_1060 = dict(BIGRAM_VOCAB_SIZE="2816", BIGRAM_DIM="112", XSA_LAST_N="11", USE_GPTQ="1",
                 GPTQ_RESERVE_MS="14000", TTT_ENABLED="0")

# alias env -> the same run written with our names
EQUIVALENT = [
    ({"GPTQ_RESERVE_MS": "14000"}, {"GPTQ_RESERVE_SECONDS": "14"}),
    ({"GPTQ_RESERVE_MS": "500"}, {"GPTQ_RESERVE_SECONDS": "0.5"}),
    ({"GPTQ_CALIB_SAMPLES": "64"}, {"GPTQ_CALIB_BATCHES": "64"}),
    ({"GPTQ_CALIBRATION_BATCHES": "16"}, {"GPTQ_CALIB_BATCHES": "16"}),
    ({"EMA_ENABLED": "1"}, {"WEIGHT_AVERAGE": "ema"}),
    ({"SWA_ENABLED": "1"}, {}),
    ({"SWA_ENABLED": "0"}, {"WEIGHT_AVERAGE": "ema"}),
    ({"VE_ENABLED": "1", "VE_LAYERS": "9,10", "VE_DIM": "128"}, {"VE_LAYERS": "9,10", "VE_DIM": "128"}),
    ({"VE_ENABLED": "0"}, {"VE_LAYERS": ""}),
    ({"QUANT_CLIP_RANGE": "31"}, {}),
    ({"ROPE_YARN": "0", "ROPE_TRAIN_SEQ_LEN": "2048"}, {}),
    ({"VAL_DOC_FRACTION": "1.0"}, {}),
]


@pytest.mark.parametrize("alias_env,ours", EQUIVALENT, ids=[" ".join(a) for a, _ in EQUIVALENT])
def test_alias_gives_the_same_hyperparameters_as_our_name(alias_env, ours):
    got = tg.Hyperparameters.from_env(alias_env)
    assert got == tg.Hyperparameters.from_env(ours)
    for alias in set(alias_env) & set(tg.RECORD_ENV_ALIASES):
        assert any(line.startswith(f"env_alias:{alias}={alias_env[alias]} -> ")
                   for line in tg.env_aliases(alias_env)[1])


def test_the_1060_launch_line_runs_here_with_its_reserve():
    h = tg.Hyperparameters.from_env(LINE_1060)
    assert (h.gptq_reserve_seconds, h.bigram_vocab_size, h.ttt_enabled) == (14.0, 2816, False)
    assert tg.env_aliases(LINE_1060)[1] == ["env_alias:GPTQ_RESERVE_MS=14000 -> GPTQ_RESERVE_SECONDS=14.0"]


def test_the_549_averaging_names_together_export_the_ema():
    env = {"EMA_ENABLED": "1", "SWA_ENABLED": "1", "SWA_EVERY": "50", "VE_ENABLED": "1"}
    h = tg.Hyperparameters.from_env(env)
    assert h.weight_average == "ema" and h.swa_every == 50 and h.ve_layer_ids == (9, 10)
    assert tg.env_aliases(env)[1] == ["env_alias:EMA_ENABLED=1 -> WEIGHT_AVERAGE=ema",
                                      "env_alias:SWA_ENABLED=1 -> (no effect here)",
                                      "env_alias:VE_ENABLED=1 -> (no effect here)"]


@pytest.mark.parametrize("env,names", [
    ({"EMA_ENABLED": "0"}, "EMA_DECAY"),
    ({"ROPE_YARN": "1"}, "ROPE_BASE"),
    ({"QUANT_CLIP_RANGE": "15"}, "INT6_SCALE_FLOOR"),
    ({"VAL_BATCH_SIZE": "524288"}, "EVAL_BATCH_SEQS"),
    ({"GPTQ_CALIB_SAMPLES": "64", "GPTQ_CALIB": "selfgen"}, "GPTQ_CALIB_BATCHES"),
    ({"VE_ENABLED": "2"}, "only 1|0"),
    ({"VAL_DOC_FRACTION": "0.5"}, "every validation document"),
], ids=["ema_off", "yarn_on", "clip_range", "val_batch", "samples_with_selfgen", "ve_bad_value", "val_subset"])
def test_no_exact_equivalent_raises_naming_ours(env, names):
    alias = next(k for k in env if k in tg.RECORD_ENV_ALIASES)
    with pytest.raises(tg.ConfigError, match=f"^{alias}={env[alias]}: .*{names}"):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env,match", [
    ({"GPTQ_RESERVE_MS": "14000", "GPTQ_RESERVE_SECONDS": "14"}, "also set; set only GPTQ_RESERVE_SECONDS"),
    ({"VE_ENABLED": "0", "VE_LAYERS": ""}, "also set; set only VE_LAYERS"),
    ({"EMA_ENABLED": "1", "WEIGHT_AVERAGE": "ema"}, "also set; set only WEIGHT_AVERAGE"),
    ({"GPTQ_CALIB_SAMPLES": "64", "GPTQ_CALIBRATION_BATCHES": "16"},
     "^GPTQ_CALIB_SAMPLES=64: gives GPTQ_CALIB_BATCHES='64', but GPTQ_CALIBRATION_BATCHES=16 gives"),
    ({"GPTQ_RESERVE_MS": "14s"}, "not a valid float"),
], ids=["reserve_twice", "ve_twice", "ema_twice", "two_aliases_disagree", "malformed"])
def test_conflicts_and_bad_values_raise(env, match):
    with pytest.raises(tg.ConfigError, match=match):
        tg.Hyperparameters.from_env(env)


def test_aliases_are_not_fields_and_unknown_names_still_raise():
    fields = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    assert not fields & set(tg.RECORD_ENV_ALIASES)  # a field added later would be shadowed
    assert all(a.startswith(tg.OWNED_ENV_PREFIXES) for a in tg.RECORD_ENV_ALIASES)
    for var in ("GPTQ_CALIB_SAMPLE", "EMA_ENABLE", "SWA_ENABLE"):
        with pytest.raises(tg.ConfigError, match=f"^{var}: unknown variable"):
            tg.Hyperparameters.from_env({var: "1"})


def test_main_logs_the_mapping(tiny_data, tmp_path, monkeypatch, capsys):
    """The run logs each translated name (a DATA_PATH without shards then stops it: exit 2)."""
    monkeypatch.chdir(tmp_path)
    env = {"PRESET": "tiny", "RUN_ID": "alias", "TOKENIZER_PATH": str(tiny_data / "tokenizer.model"), "VOCAB_SIZE": "512",
           "DATA_PATH": str(tmp_path), "GPTQ_RESERVE_MS": "14000", "VE_ENABLED": "1"}
    assert tg.main(env) == 2
    log = (tmp_path / "logs" / "alias.txt").read_text()
    assert ("env_alias:GPTQ_RESERVE_MS=14000 -> GPTQ_RESERVE_SECONDS=14.0\n"
            "env_alias:VE_ENABLED=1 -> (no effect here)\n") in log
    assert "hparam:gptq_reserve_seconds=14.0\n" in log
    assert "error: DATA_PATH: no shards match" in capsys.readouterr().err


def test_frontier_eval_names_map_or_name_ours(tiny_data):
    """The 1.0611 launch line's eval names: TTT_EVAL_SEQ_LEN is EVAL_SEQ_LEN (agreeing with it is no
    effect, disagreeing is an error); the doc-boundary and warm-up names accept only our behaviour."""
    from conftest import tiny_env
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, TTT_EVAL_SEQ_LEN=64))
    assert h.eval_seq_len == 64
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, EVAL_SEQ_LEN=64, TTT_EVAL_SEQ_LEN=64,
                                             GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=1, GLOBAL_TTT_WARMUP_CHUNKS=0))
    assert h.eval_seq_len == 64
    with pytest.raises(tg.ConfigError, match="TTT_EVAL_SEQ_LEN=128: .*EVAL_SEQ_LEN"):
        tg.Hyperparameters.from_env(tiny_env(tiny_data, EVAL_SEQ_LEN=64, TTT_EVAL_SEQ_LEN=128))
    with pytest.raises(tg.ConfigError, match="GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=0"):
        tg.Hyperparameters.from_env(tiny_env(tiny_data, GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=0))
    with pytest.raises(tg.ConfigError, match="GLOBAL_TTT_WARMUP_CHUNKS=2"):
        tg.Hyperparameters.from_env(tiny_env(tiny_data, GLOBAL_TTT_WARMUP_CHUNKS=2))
