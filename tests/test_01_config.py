"""Section 01 of train_gpt.py, config: Hyperparameters, the records' aliases, presets, views and
what each phase reads.

Hyperparameters.from_env: record defaults, the tiny preset and its precedence, strict parsing of
booleans/ints/floats, unknown owned variables, impossible shapes and enum values, an import
without side effects, and ModelConfig.

The records' launch-line names (RECORD_ENV_ALIASES, issue 8): a name with an exact equivalent
gives the same Hyperparameters as our own variable and logs the mapping; a value without one, an
alias set together with its target, or two aliases that disagree raise a ConfigError naming our
variable; unknown owned names are still refused.

The founding systems as presets (issue 14 part 1) and the 1.0611 record's own launch line
(issue 19 item 6).

Each preset builds the model of that system with the parameter count of its logs (stack.md 3.13,
against a formula written from that table), carries its distinctive settings, logs
`preset:<name>` and runs end to end at tiny dims on CPU (env overrides on top of the preset).
The record's launch line (frontier.md section 7, copied below) gives, after PRESET=pr1855, exactly
the preset plus its seed, data paths and reserve (COMPRESSOR=pergroup is QUANT_COMPRESSOR=pergroup);
the line without a frontier preset is one error naming each variable, exit 2, nothing written.

The one flat config and its typed views (issue 17 item 1): every view is a frozen subset of
Hyperparameters' fields by name and type, built by name; every choice is declared on its field.

Each phase reads only its view (issue 17 item 1), checked on the source: a function whose config
parameter is typed with a View reads only that view's fields and attributes, and passes it on only
to functions typed with a view it contains by name (never the flat Hyperparameters).

    python3 -m pytest -q tests/test_01_config.py -m "slow or not slow"
"""

import ast
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import shlex
import sys
import time
import typing

import pytest

import train_gpt as tg
from conftest import SAMPLE_SHARDS, SAMPLE_TOKENIZER
from helpers import frontier_param_count, tiny_preset_env


# ==============================================================================================
# config

# The record run (stack.md; the 11-layer GPTQ/TTT records), written out by hand on purpose.
RECORD = dict(num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0, negative_slope=0.5,
              rope_dims=16, logit_softcap=30.0, xsa_last_n=11, bigram_vocab_size=2816, bigram_dim=112,
              ve_layers="9,10", train_seq_len=2048, train_batch_tokens=786_432, ttt_enabled=True,
              eval_stride=64, vocab_size=1024, eval_seq_len=2048,
              train_loader="coprime", gptq_calib="train", gptq_calib_batches=64, gptq_reserve_seconds=14.0)  # #1060

# The CPU shapes that interface.md lists ("Shapes must be free to shrink for CPU tests").
INTERFACE_TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
                      XSA_LAST_N="2", VE_LAYERS="0,1", VE_DIM="16", BIGRAM_VOCAB_SIZE="256", BIGRAM_DIM="16",
                      TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="32", TRAIN_BATCH_TOKENS="4096",
                      ITERATIONS="40", WARMDOWN_ITERS="10", WARMUP_STEPS="2", TTT_CHUNK_TOKENS="4096",
                      TTT_BATCH_SEQS="8", TTT_EPOCHS="1", COMPILE="0")


def test_defaults_are_the_record():
    h = tg.Hyperparameters()
    assert {k: getattr(h, k) for k in RECORD} == RECORD
    assert h.head_dim == 64 and h.ve_layer_ids == (9, 10)
    assert tg.Hyperparameters.from_env({}) == h


def test_tiny_preset_matches_the_interface_shapes():
    h = tg.Hyperparameters.from_env({"PRESET": "tiny"})
    for var, raw in INTERFACE_TINY.items():
        field = var.lower()
        assert getattr(h, field) == type(getattr(h, field))(raw), var
    assert h.preset == "tiny" and h.device == "cpu" and h.vocab_size == 1024  # the shipped sample's tokenizer
    assert (h.data_path, h.tokenizer_path) == (str(SAMPLE_SHARDS[1024]), str(SAMPLE_TOKENIZER[1024]))
    assert h.max_wallclock_seconds == 0.0  # ITERATIONS ends a tiny run


def test_interface_cpu_example_parses():
    """interface.md's CPU example sets VAL_LOSS_EVERY=0: accepted; any other value is refused
    because validation data is never read during training (rule C1)."""
    h = tg.Hyperparameters.from_env({**INTERFACE_TINY, "VAL_LOSS_EVERY": "0"})
    assert h.num_layers == 2
    with pytest.raises(tg.ConfigError, match="^VAL_LOSS_EVERY=4000: must be 0"):
        tg.Hyperparameters.from_env({"VAL_LOSS_EVERY": "4000"})


def test_env_overrides_beat_the_preset():
    env = {"PRESET": "tiny", "NUM_LAYERS": "3", "MODEL_DIM": "96", "TTT_ENABLED": "0", "MATRIX_LR": "0.5"}
    h = tg.Hyperparameters.from_env(env)
    assert (h.num_layers, h.model_dim, h.ttt_enabled, h.matrix_lr) == (3, 96, False, 0.5)
    assert h.num_heads == 4 and h.train_seq_len == 128  # untouched preset values stay
    assert h.head_dim == 24


def test_env_overrides_apply_without_a_preset():
    h = tg.Hyperparameters.from_env({"NUM_LAYERS": "12", "XSA_LAST_N": "4", "SEED": "7", "RUN_ID": "abc"})
    assert (h.num_layers, h.xsa_last_n, h.seed, h.run_id) == (12, 4, 7, "abc")
    assert h.model_dim == 512


@pytest.mark.parametrize("raw,expected", [("0", False), ("1", True)], ids=["zero", "one"])
def test_bool_accepts_0_and_1(raw, expected):
    h = tg.Hyperparameters.from_env({"TTT_ENABLED": raw, "LN_SCALE": raw})
    assert h.ttt_enabled is expected and h.ln_scale is expected


@pytest.mark.parametrize("raw", ["yes", "true", "True", "2", "-1", "", " 1", "on"],
                         ids=["yes", "true", "True", "two", "minus1", "empty", "space1", "on"])
@pytest.mark.parametrize("var", ["TTT_ENABLED", "LN_SCALE"])
def test_bool_rejects_anything_else(var, raw):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        tg.Hyperparameters.from_env({var: raw})


@pytest.mark.parametrize("var,raw", [
    ("NUM_LAYERS", "eleven"), ("NUM_LAYERS", "1.5"), ("NUM_LAYERS", ""), ("TRAIN_BATCH_TOKENS", "786_432x"),
    ("SEED", "1e3"), ("MATRIX_LR", "fast"), ("MATRIX_LR", ""), ("MLP_MULT", "3x"),
    ("MAX_WALLCLOCK_SECONDS", "10min"),
], ids=["int-word", "int-float", "int-empty", "int-suffix", "int-sci", "float-word", "float-empty",
        "float-suffix", "float-unit"])
def test_malformed_numbers_name_the_variable(var, raw):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        tg.Hyperparameters.from_env({var: raw})


@pytest.mark.parametrize("var", ["TTT_EPOCH", "GPTQ_CALIB_SAMPLE", "EVAL_STRIDES", "MODEL_DIMS", "NUM_LAYER",
                                 "VAL_LOSS_EVERYY", "TRAIN_SEQLEN", "MUON_LR"])
def test_unknown_owned_variable_raises(var):
    with pytest.raises(tg.ConfigError, match=f"^{var}: unknown variable"):
        tg.Hyperparameters.from_env({var: "1"})


def test_unrelated_and_launcher_variables_are_ignored():
    env = {"PATH": "/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "NUM_NODES": "1",  # NUM_ is owned
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "x",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none", "CUDA_VISIBLE_DEVICES": "0"}
    assert tg.Hyperparameters.from_env(env) == tg.Hyperparameters()


def test_typo_of_a_field_warns_by_default_and_fails_under_record(tmp_path, capsys):
    env = {"ITERATONS": "5", "SEEED": "3", "PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    assert tg.env_typos(env) == [("ITERATONS", "ITERATIONS"), ("SEEED", "SEED")]
    assert tg.Hyperparameters.from_env(env) == tg.Hyperparameters()  # ignored, not applied
    with pytest.raises(tg.ConfigError, match=r"^ITERATONS: unknown variable, did you mean ITERATIONS\? \(RECORD=1"):
        tg.Hyperparameters.from_env({**env, "RECORD": "1"})
    # main: the warning reaches stderr before a later error (a missing tokenizer) stops the run
    assert tg.main({"ITERATONS": "5", "TOKENIZER_PATH": str(tmp_path / "none.model")}) == 2
    err = capsys.readouterr().err
    assert "warning: ITERATONS: unknown variable, ignored; did you mean ITERATIONS?" in err
    assert err.count("error:") == 1


def test_unknown_owned_variable_names_its_close_field():
    with pytest.raises(tg.ConfigError, match=r"^TRAIN_SEQ_LENN: unknown variable .*did you mean TRAIN_SEQ_LEN\?$"):
        tg.Hyperparameters.from_env({"TRAIN_SEQ_LENN": "1"})


@pytest.mark.parametrize("env,var", [
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),
    ({"ROPE_DIMS": "0"}, "ROPE_DIMS"),
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS"),  # more than head_dim=64
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N"),
    ({"XSA_LAST_N": "-1"}, "XSA_LAST_N"),
    ({"VE_LAYERS": "9,11"}, "VE_LAYERS"),
    ({"VE_LAYERS": "-1"}, "VE_LAYERS"),
    ({"PRESET": "tiny", "VE_LAYERS": "2"}, "VE_LAYERS"),
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE"),
    ({"TRAIN_BATCH_TOKENS": "786433"}, "TRAIN_BATCH_TOKENS"),
    ({"PRESET": "tiny", "TRAIN_SEQ_LEN": "96"}, "TRAIN_BATCH_TOKENS"),  # 4096 % 96 != 0
    ({"TTT_CHUNK_TOKENS": "1000"}, "TTT_CHUNK_TOKENS"),
    ({"EVAL_SEQ_LEN": "1000"}, "TTT_CHUNK_TOKENS"),  # 32768 % 1000 != 0
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),
    ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS"),
    ({"MICRO_BATCH_SEQS": "0"}, "MICRO_BATCH_SEQS"),
    ({"WEIGHT_AVERAGE": "foo"}, "WEIGHT_AVERAGE"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"TRAIN_LOADER": "random"}, "TRAIN_LOADER"),
    ({"ATTN_BACKEND": "flash"}, "ATTN_BACKEND"),
    ({"GPTQ_CALIB": "val"}, "GPTQ_CALIB"),  # rule C3: never validation tokens
    ({"QUANT_COMPRESSOR": "zlib"}, "QUANT_COMPRESSOR"),
    ({"PRESET": "huge"}, "PRESET"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_impossible_values_raise_naming_the_variable(env, var):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        tg.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env,var", [
    ({"VE_LAYERS": "9;10"}, "VE_LAYERS"), ({"VE_LAYERS": "a,b"}, "VE_LAYERS"),
    ({"NUM_KV_HEADS": "0"}, "NUM_KV_HEADS"), ({"NUM_HEADS": "0"}, "NUM_HEADS"),
    ({"TRAIN_SEQ_LEN": "0"}, "TRAIN_SEQ_LEN"), ({"TRAIN_BATCH_TOKENS": "0"}, "TRAIN_BATCH_TOKENS"),
    ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS"), ({"EVAL_BATCH_SEQS": "0"}, "EVAL_BATCH_SEQS"),
    ({"TTT_BATCH_SEQS": "0"}, "TTT_BATCH_SEQS"),
], ids=["ve-layers-semicolon", "ve-layers-not-ints", "zero-kv-heads", "zero-heads", "zero-train-seq-len",
        "zero-batch", "zero-ttt-chunk", "zero-eval-batch", "zero-ttt-batch"])
def test_degenerate_values_raise_config_errors(env, var):
    """A bad value must be a ConfigError naming it (main() exits 2 only on ConfigError)."""
    with pytest.raises(tg.ConfigError, match=var):
        tg.Hyperparameters.from_env(env)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tg.Hyperparameters().num_layers = 3


def test_import_reads_no_environment(monkeypatch):
    """A fresh import with owned variables set changes neither the defaults nor os.environ;
    from_env() reads the environment when called, not when imported."""
    monkeypatch.setenv("NUM_LAYERS", "3")
    monkeypatch.setenv("TTT_ENABLED", "0")
    monkeypatch.setenv("PRESET", "tiny")
    before = dict(os.environ)
    spec = importlib.util.spec_from_file_location("train_gpt_fresh_import", tg.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    assert dict(os.environ) == before
    h = fresh.Hyperparameters()
    assert (h.num_layers, h.ttt_enabled, h.preset, h.model_dim) == (11, True, "", 512)
    assert fresh.Hyperparameters.from_env({}).num_layers == 11
    live = fresh.Hyperparameters.from_env()  # default env= is the live os.environ
    assert (live.num_layers, live.ttt_enabled, live.model_dim) == (3, False, 64)
    assert dict(os.environ) == before


SHAPE_FIELDS = {"vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "negative_slope",
                "rope_dims", "rope_base", "qk_gain_init", "logit_softcap", "tied_embed_init_std", "ln_scale",
                "xsa_last_n", "bigram_vocab_size", "bigram_dim", "ve_layers", "ve_dim"}


def test_model_config_holds_every_shape_field(monkeypatch):
    monkeypatch.setattr(tg.nn.init, "orthogonal_", lambda w, *a, **k: w)  # init values are not checked here
    env = {"PRESET": "tiny", "NUM_LAYERS": "3", "MODEL_DIM": "48", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
           "MLP_MULT": "2.5", "NEGATIVE_SLOPE": "0.25", "ROPE_DIMS": "4", "XSA_LAST_N": "1", "VE_LAYERS": "2",
           "LN_SCALE": "0", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "8", "VE_DIM": "8", "VOCAB_SIZE": "300"}
    h = tg.Hyperparameters.from_env(env)
    cfg = tg.ModelConfig.of(h)
    stored = cfg.as_dict()  # what the artifact's payload holds (JSON)
    assert set(stored) >= SHAPE_FIELDS and list(stored) == [f.name for f in dataclasses.fields(tg.ModelConfig)]
    assert all(v == getattr(h, k) for k, v in stored.items())
    # Everything else (training, eval, data, runtime) stays out of the artifact's config.
    assert not set(stored) & {"attn_backend", "train_seq_len", "eval_seq_len", "device", "seed", "data_path"}
    # The stored dict alone rebuilds the network (a frozen view: any other read is an AttributeError).
    model = tg.GPT(tg.ModelConfig(**json.loads(json.dumps(stored))))
    assert tuple(model.tok_emb.weight.shape) == (300, 48)
    assert len(model.blocks) == 3
    assert tuple(model.blocks[0].mlp.fc.weight.shape) == (120, 48)  # int(2.5 * 48)


def test_default_run_id_names_date_preset_and_seed_and_never_overwrites_a_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.mktime((2026, 12, 4, 12, 0, 0, 0, 0, -1))
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "SEED": "42"})
    assert tg.default_run_id(h, now) == "20261204_frontier_seed42"
    assert tg.default_run_id(tg.Hyperparameters.from_env({}), now) == "20261204_pr1060_seed1337"
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "20261204_frontier_seed42.txt").write_text("")
    assert tg.default_run_id(h, now) == "20261204_frontier_seed42_2"
    (tmp_path / "logs" / "20261204_frontier_seed42_2.txt").write_text("")
    assert tg.default_run_id(h, now) == "20261204_frontier_seed42_3"


def test_readme_knob_table_is_generated_from_the_code():
    """README's knob table equals tests/tools/knobs_table.py's output (regenerate with --write), and
    lists every field once under its env name, with the defaults and preset values of the code."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tools"))
    import knobs_table
    readme = open(knobs_table.README).read()
    block = knobs_table.readme_block(readme)
    assert block == knobs_table.table(), "README knob table is stale: python3 tests/tools/knobs_table.py --write"
    names = [line.split("|")[1].strip().strip("`") for line in block.splitlines()[2:] if line.startswith("| `")]
    assert names == [f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)]
    row = next(line for line in block.splitlines() if line.startswith("| `MLP_MULT` |"))
    assert f"`{tg.Hyperparameters.mlp_mult}`" in row and f"frontier `{tg.PRESETS['frontier']['mlp_mult']}`" in row


# ==============================================================================================
# config aliases

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


# ==============================================================================================
# config presets

# The record's README "Reproducing" block (frontier.md section 7), without the torchrun command.
RECORD_LINE = """
DATA_DIR=./data VOCAB_SIZE=8192 DATA_PATH=./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model CASEOPS_ENABLED=1
ITERATIONS=20000 MAX_WALLCLOCK_SECONDS=600 PHASED_TTT_ENABLED=1 PHASED_TTT_PREFIX_DOCS=2500 PHASED_TTT_NUM_PHASES=3
EMBED_BITS=7 MATRIX_LR=0.026 MIN_LR=0.1 MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0 EMBED_CLIP_SIGMAS=14.0
GRAD_CLIP_NORM=0.3 TTT_CHUNK_SIZE=48 WARMUP_STEPS=20 MUON_BACKEND_STEPS=5 GLOBAL_TTT_MOMENTUM=0.9 WARMDOWN_FRAC=0.85
BETA2=0.99 TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 TTT_LORA_RANK=80 SPARSE_ATTN_GATE_SCALE=0.5
GPTQ_RESERVE_SECONDS=0.5 GPTQ_CALIBRATION_BATCHES=16 VAL_LOSS_EVERY=0 GATED_ATTN_QUANT_GATE=1
SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12 SMEAR_GATE_ENABLED=1 LQER_ENABLED=1 LQER_ASYM_ENABLED=1 LQER_RANK=4
LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64 LQER_TOP_K=3 FUSED_CE_ENABLED=1 COMPRESSOR=pergroup NCCL_NET=Socket SEED=42
"""
# The same section's "Hyperparameters in force" (the log's dump), less CASEOPS_ENABLED and COMPRESSOR.
RECORD_IN_FORCE = """
VOCAB_SIZE=8192 TRAIN_SEQ_LEN=2048 EVAL_SEQ_LEN=2048 TRAIN_BATCH_TOKENS=786432 ITERATIONS=20000
MAX_WALLCLOCK_SECONDS=600 WARMUP_STEPS=20 NUM_LAYERS=11 MODEL_DIM=512 NUM_HEADS=8 NUM_KV_HEADS=4 MLP_MULT=4.0
XSA_LAST_N=11 ROPE_DIMS=16 ROPE_BASE=10000 ROPE_YARN=0 ROPE_TRAIN_SEQ_LEN=2048 LN_SCALE=1
LOGIT_SOFTCAP=30 TIE_EMBEDDINGS=1 TIED_EMBED_INIT_STD=0.005 QK_GAIN_INIT=5.0
SKIP_GATES_ENABLED=1 NUM_LOOPS=2 LOOP_START=3 LOOP_END=5 ENABLE_LOOPING_AT=0.35
PARALLEL_START_LAYER=8 PARALLEL_FINAL_LANE=mean SMEAR_GATE_ENABLED=1 GATE_WINDOW=12
SPARSE_ATTN_GATE_ENABLED=1 SPARSE_ATTN_GATE_INIT_STD=0.0 SPARSE_ATTN_GATE_SCALE=0.5
GATED_ATTN_ENABLED=0 ATTN_OUT_GATE_ENABLED=0 FUSED_CE_ENABLED=1
MATRIX_LR=0.026 TIED_EMBED_LR=0.03 SCALAR_LR=0.02 MUON_MOMENTUM=0.97 MUON_MOMENTUM_WARMUP_START=0.92
MUON_MOMENTUM_WARMUP_STEPS=1500 MUON_BACKEND_STEPS=5 MUON_ROW_NORMALIZE=1 BETA1=0.9 BETA2=0.99 ADAM_EPS=1e-8
MUON_WD=0.095 EMBED_WD=0.085 ADAM_WD=0.02 GRAD_CLIP_NORM=0.3 EMA_DECAY=0.9965 WARMDOWN_FRAC=0.85 MIN_LR=0.1
MATRIX_BITS=6 EMBED_BITS=7 MATRIX_CLIP_SIGMAS=12.85 MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0
EMBED_CLIP_SIGMAS=14.0 GATED_ATTN_QUANT_GATE=1 LQER_ENABLED=1 LQER_ASYM_ENABLED=1 LQER_RANK=4 LQER_TOP_K=3
LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64 GPTQ_CALIBRATION_BATCHES=16 GPTQ_RESERVE_SECONDS=0.5
TTT_ENABLED=1 TTT_OPTIMIZER=adam TTT_LORA_RANK=80 TTT_LORA_LR=1e-4 TTT_CHUNK_SIZE=48
TTT_EVAL_SEQ_LEN=2048 TTT_BATCH_SIZE=64 TTT_GRAD_STEPS=1 TTT_BETA1=0 TTT_BETA2=0.99
TTT_WEIGHT_DECAY=0.5 TTT_K_LORA=1 TTT_MLP_LORA=1 TTT_O_LORA=1 TTT_LORA_ALPHA=144 TTT_WARM_START_A=1
PHASED_TTT_PREFIX_DOCS=2500 PHASED_TTT_NUM_PHASES=3
GLOBAL_TTT_LR=0.001 GLOBAL_TTT_MOMENTUM=0.9 GLOBAL_TTT_EPOCHS=1 GLOBAL_TTT_CHUNK_TOKENS=32768
GLOBAL_TTT_BATCH_SEQS=32 GLOBAL_TTT_GRAD_CLIP=1.0 GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=1
GLOBAL_TTT_WARMUP_CHUNKS=0 VAL_DOC_FRACTION=1.0 VAL_LOSS_EVERY=0
"""


def parse_line(text: str) -> dict:
    return dict(token.split("=", 1) for token in shlex.split(text))


def seed_param_count(V=1024, L=11, d=512, H=8, kv=4, mlp=3.0, bigram=(2816, 112), ve_dim=128, ve_layers=2):
    """stack.md 3.13, component by component, independently of the model code."""
    hd = d // H
    matrices = L * (2 * d * d + 2 * kv * hd * d + 2 * int(mlp * d) * d)  # Q, out; K, V; up, down
    scalars = L * (d + d + 2 * d + H)  # attn/mlp scales, resid_mix, q_gain
    skips, smear = (L // 2) * d, d
    ve = V * ve_dim + ve_dim * kv * hd + 1 + ve_layers  # table, projection to kv_dim, scale, layer scales
    rows, dim = bigram
    return V * d + matrices + scalars + skips + smear + ve + rows * dim + dim * d + 1


def test_the_formula_gives_the_logged_counts():
    """The formula against stack.md 3.13's logged totals (#414, #549, #1019, #0329)."""
    assert seed_param_count(bigram=(2048, 128)) == 26_993_756
    assert seed_param_count(bigram=(1536, 128)) == 26_928_220
    assert seed_param_count(bigram=(3072, 112)) == 27_067_484
    assert seed_param_count(bigram=(2816, 112)) == 27_038_812


COUNTS = {"pr691": 26_993_756, "pr639": 26_928_220, "pr1306": 27_067_484, "pr1060": 27_038_812,
          "pr1855": 35_945_671}


@pytest.mark.parametrize("name", list(COUNTS))
def test_each_preset_builds_its_systems_parameter_count(name, monkeypatch):
    monkeypatch.setattr(tg.nn.init, "orthogonal_", lambda w, *a, **k: w)  # shapes only: skip the slow QR
    h = tg.Hyperparameters.from_env({"PRESET": name, "BOS_ID": "1"})
    count = sum(p.numel() for p in tg.GPT(tg.ModelConfig.of(h)).parameters())
    if name == "pr1855":
        assert count == frontier_param_count(8192, 11, 512, 8, 4, 4.0, 12, 17) == COUNTS[name]
    else:
        assert count == seed_param_count(bigram=(h.bigram_vocab_size, h.bigram_dim)) == COUNTS[name]


# What makes each system itself (the issue's list); everything else is the defaults'.
DISTINCT = {
    "pr691": dict(negative_slope=0.0, xsa_last_n=4, bigram_vocab_size=2048, bigram_dim=128, rope_dims=16,
                  ln_scale=True, ema_decay=0.997, ema_warmup=False, weight_average="ema", gptq_calib="none",
                  quant_compressor="zstd", eval_stride=64, eval_mode="sliding", ttt_enabled=True,
                  ttt_chunk_tokens=32_768, ttt_epochs=3, ttt_optimizer="sgd", ttt_lr=0.002, ttt_momentum=0.9,
                  ttt_grad_clip=1.0, ttt_freeze_blocks=0, train_loader="sequential"),
    "pr639": dict(gptq_calib="train", gptq_reserve_seconds=40.0, max_wallclock_seconds=600.0, xsa_last_n=11,
                  weight_average="blend", ttt_enabled=True, ttt_optimizer="adamw", ttt_lr=1e-4, ttt_epochs=3,
                  ttt_freeze_blocks=9, ttt_chunk_tokens=131_072, negative_slope=0.5),
    "pr1306": dict(negative_slope=0.5, gptq_calib="selfgen", gptq_calib_batches=64, gptq_selfgen_temp=0.8,
                   xsa_last_n=11, bigram_vocab_size=3072, bigram_dim=112, warmdown_iters=4000,
                   train_loader="coprime", slot_enabled=True, ttt_enabled=False, quant_compressor="lzma"),
}


@pytest.mark.parametrize("name", list(DISTINCT))
def test_each_preset_has_its_distinctive_settings(name):
    h = tg.Hyperparameters.from_env({"PRESET": name})
    assert {k: getattr(h, k) for k in DISTINCT[name]} == DISTINCT[name]
    assert h.preset == name


def test_pr1060_is_the_defaults_and_pr1855_is_frontier_on_caseops_data():
    def fields(h):
        return {k: v for k, v in dataclasses.asdict(h).items() if k != "preset"}
    assert fields(tg.Hyperparameters.from_env({"PRESET": "pr1060"})) == fields(tg.Hyperparameters())
    pr1855, frontier = (fields(tg.Hyperparameters.from_env({"PRESET": n})) for n in ("pr1855", "frontier"))
    assert {k for k in pr1855 if pr1855[k] != frontier[k]} == {"caseops_enabled", "data_path", "tokenizer_path",
                                                               "mlp_clip_sigmas", "embed_clip_sigmas"}
    assert (pr1855["mlp_clip_sigmas"], pr1855["embed_clip_sigmas"], pr1855["quant_compressor"]) == (11.5, 14.0, "pergroup")
    assert pr1855["caseops_enabled"] and not frontier["caseops_enabled"]
    assert pr1855["tokenizer_path"].endswith("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    pr1855 = tg.Hyperparameters.from_env({"PRESET": "pr1855"})
    assert (pr1855.eval_mode, pr1855.ttt_optimizer, pr1855.phased_ttt_num_phases) == ("doc", "adam", 3)


# Tiny dims on top of a seed preset: shapes and schedule of PRESET=tiny, but not what the preset is about.
# Log lines that show each system's own phases ran.
TINY_LOG = {
    "pr691": ["calib:source:none", "optimizer:sgd lr:0.002", "freeze_blocks:0", "loader:sequential",
              "weight_average:ema"],
    "pr639": ["calib:source:train", "optimizer:adamw lr:0.0001", "freeze_blocks:1", "weight_average:blend"],
    "pr1306": ["calib:source:selfgen sequences:2", "loader:coprime", "causal_slot_nonrecord"],
    "pr1060": ["calib:source:train", "loader:coprime", "optimizer:sgd"],
    "pr1855": ["doc_masking:1", "ttt:phase"],
}
PHASES = {"pr691": {"prequant", "roundtrip", "sliding", "ttt"}, "pr639": {"prequant", "roundtrip", "sliding", "ttt"},
          "pr1306": {"prequant", "roundtrip", "sliding", "slot"}, "pr1060": {"prequant", "roundtrip", "sliding", "ttt"},
          "pr1855": {"prequant", "roundtrip", "doc", "ttt"}}


# pr1855 is PRESETS["frontier"] itself (checked above), whose e2e test_11_drivers.py runs by default.
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "pr1855" else n for n in TINY_LOG])
def test_each_preset_runs_end_to_end_at_tiny_dims(name, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = tiny_preset_env(name, tiny_data)
    assert tg.main(env) == 0
    log = (tmp_path / "logs" / f"{name}.txt").read_text()
    note = tg.PRESET_NOTES.get(name)
    assert f"\npreset:{name}" + (f" note:{note}\n" if note else "\n") in log
    for line in TINY_LOG[name]:
        assert line in log, line
    h = tg.Hyperparameters.from_env(env)
    if name == "pr1855":
        count = frontier_param_count(512, 5, 64, 4, 2, 4.0, 8, 7)
    else:
        count = seed_param_count(512, h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult,
                                 (h.bigram_vocab_size, h.bigram_dim), h.ve_dim, len(h.ve_layer_ids))
    assert f"model_params:{count} " in log
    summary = json.loads((tmp_path / "logs" / f"{name}.json").read_text())
    assert set(summary["eval"]) == PHASES[name]


def test_bare_launch_line_is_one_error_naming_each_variable_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Without a frontier preset the line would train #1060's model with some of #1855's options."""
    monkeypatch.chdir(tmp_path)
    assert tg.main(parse_line(RECORD_LINE)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 problems"), err
    for name in ("PHASED_TTT_ENABLED=1",
                 "DATA_DIR, FUSED_CE_ENABLED, PHASED_TTT_ENABLED, LQER_ASYM_ENABLED, COMPRESSOR",
                 "run the line as PRESET=pr1855"):
        assert name in err[0], name
    assert list(tmp_path.iterdir()) == []


def test_launch_line_means_the_preset_plus_its_seed_data_and_reserve():
    """The whole line (COMPRESSOR=pergroup included) changes nothing of PRESET=pr1855 but SEED,
    GPTQ_RESERVE_SECONDS and FUSED_CE_ENABLED (the training-only Triton CE, off in the preset): the
    preset is the record's configuration, data paths and CaseOps included."""
    line = dict(parse_line(RECORD_LINE), PRESET="pr1855")
    h, preset = tg.Hyperparameters.from_env(line), tg.Hyperparameters.from_env({"PRESET": "pr1855"})
    changed = {k for k, v in dataclasses.asdict(h).items() if getattr(preset, k) != v}
    assert changed == {"seed", "gptq_reserve_seconds", "fused_ce_enabled"}
    hints = tg.typing.get_type_hints(tg.Hyperparameters)
    for var, raw in line.items():
        if var.lower() in hints:
            assert getattr(h, var.lower()) == tg._parse_env(var, raw, hints[var.lower()]), var
    assert (h.quant_compressor, h.gptq_calib_batches, h.seed) == ("pergroup", 16, 42)
    lines = tg.env_aliases(line)[1]
    for alias in ("DATA_DIR=./data", "PHASED_TTT_ENABLED=1", "LQER_ASYM_ENABLED=1"):
        assert f"env_alias:{alias} -> (no effect here)" in lines
    assert "env_alias:COMPRESSOR=pergroup -> QUANT_COMPRESSOR=pergroup" in lines


def test_the_records_hyperparameters_in_force_are_pr1855():
    """Every value of the record's log dump (frontier.md 7) set on top of PRESET=pr1855 changes only
    the calibration reserve (0.5 s, which let the record calibrate after its cap) and FUSED_CE_ENABLED
    (the training-only Triton CE, off in the preset)."""
    env = dict(parse_line(RECORD_IN_FORCE), PRESET="pr1855")
    h, preset = tg.Hyperparameters.from_env(env), tg.Hyperparameters.from_env({"PRESET": "pr1855"})
    assert {k for k, v in dataclasses.asdict(h).items() if getattr(preset, k) != v} == {"gptq_reserve_seconds",
                                                                                        "fused_ce_enabled"}


@pytest.mark.parametrize("env,match", [
    ({"PRESET": "pr1855", "DATA_DIR": "/data"}, "^DATA_DIR=/data: not read here .*set DATA_PATH and TOKENIZER_PATH"),
    ({"PRESET": "pr1855", "DATA_DIR": "/d", "DATA_PATH": "/d/x"}, "set TOKENIZER_PATH$"),
    ({"PRESET": "pr1855", "LQER_ASYM_ENABLED": "0"}, "^LQER_ASYM_ENABLED=0: .*symmetric"),
    ({"PRESET": "pr1855", "PHASED_TTT_ENABLED": "1", "PHASED_TTT_NUM_PHASES": "0"},
     r"^PHASED_TTT_ENABLED=1: .*in force: doc, 1, 0"),
    ({"PRESET": "pr1855", "PHASED_TTT_ENABLED": "0", "PHASED_TTT_NUM_PHASES": "3"},
     "also set; set only PHASED_TTT_NUM_PHASES"),
    ({"PRESET": "pr1855", "GATED_ATTN_ENABLED": "1"}, "^GATED_ATTN_ENABLED=1: .*SPARSE_ATTN_GATE_ENABLED"),
    ({"TIE_EMBEDDINGS": "0"}, "^TIE_EMBEDDINGS=0: .*always tied"),
    ({"FUSED_CE_ENABLED": "1"}, "^FUSED_CE_ENABLED: names of the 1.06 records' .*no PRESET.*PRESET=pr1855"),
    ({"PRESET": "pr1855", "TTT_OPTIMIZER": "sgd"}, "^TTT_OPTIMIZER=sgd: with EVAL_MODE=doc .*only adam"),
    ({"TTT_OPTIMIZER": "adam"}, "^TTT_OPTIMIZER=adam: .*EVAL_MODE=sliding's full-model TTT takes sgd|adamw"),
    ({"PRESET": "pr1855", "TTT_EPOCH": "3", "COMPRESSOR": "lzma"},
     "^2 problems, each naming its variables: COMPRESSOR=lzma: .* [|] TTT_EPOCH: unknown variable"),
], ids=["data_dir_alone", "data_dir_no_tokenizer", "lqer_symmetric", "phased_without_phases",
        "phased_off_and_phases", "full_gated_attn", "untied", "record_name_without_preset", "doc_sgd",
        "sliding_adam", "unknown_and_alias_together"])
def test_record_names_without_an_equivalent_raise_naming_them(env, match):
    with pytest.raises(tg.ConfigError, match=match):
        tg.Hyperparameters.from_env(env)


def test_ttt_optimizer_keeps_both_meanings():
    """adam in doc mode (the records' LoRA AdamW); sgd|adamw in sliding mode as before."""
    assert tg.Hyperparameters.from_env({"PRESET": "pr1855", "TTT_OPTIMIZER": "adam"}).ttt_optimizer == "adam"
    assert tg.Hyperparameters.from_env({"TTT_OPTIMIZER": "adamw"}).ttt_optimizer == "adamw"
    assert tg.Hyperparameters.from_env({"PRESET": "pr639"}).ttt_optimizer == "adamw"
    # NCCL's own variable on the line passes through untouched, as on the record's machine.
    assert tg.env_aliases({"NCCL_NET": "Socket"}) == ({"NCCL_NET": "Socket"}, [])


@pytest.mark.slow
def test_tiny_preset_runs_on_the_shipped_sample_by_default(tmp_path):
    """The README's main job in a fresh clone: `PRESET=tiny python3 train_gpt.py`, nothing else set,
    from any folder, trains and scores on tests/data (the real sp1024 sample) and beats uniform."""
    from conftest import SAMPLE_SHARDS, SAMPLE_TOKENIZER, run_script
    proc = run_script({"PRESET": "tiny", "RUN_ID": "tiny_default"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "tiny_default.txt").read_text()
    assert f"hparam:data_path={str(SAMPLE_SHARDS[1024])!r}\n" in log
    assert f"hparam:tokenizer_path={str(SAMPLE_TOKENIZER[1024])!r}\n" in log
    summary = json.loads((tmp_path / "logs" / "tiny_default.json").read_text())
    val = tg.read_shard(str(SAMPLE_SHARDS[1024] / "fineweb_val_000000.bin"))
    ttt = summary["eval"]["ttt"]
    assert ttt["tokens"] == (len(val) - 1) // 128 * 128  # the whole sample val stream, in 128-token windows
    assert ttt["val_loss"] < math.log(1024) - 1.0  # learned the real text: well below uniform over 1024


# ==============================================================================================
# config views

ALL_VIEWS = tuple(v for v in vars(tg).values() if isinstance(v, type) and issubclass(v, tg.View) and v is not tg.View)


@pytest.mark.parametrize("view", ALL_VIEWS, ids=lambda v: v.__name__)
def test_a_view_is_a_frozen_subset_of_the_fields_by_name_and_type(view):
    hints, mine = tg.field_hints(), typing.get_type_hints(view)
    fields = dataclasses.fields(view)
    assert fields and all(f.default is dataclasses.MISSING for f in fields)  # no second set of defaults
    for f in fields:
        assert mine[f.name] == hints[f.name], f.name
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    v = view.of(h)
    assert all(getattr(v, f.name) == getattr(h, f.name) for f in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(v, fields[0].name, None)


def test_the_declared_choices_are_the_codes_tables():
    hints = tg.field_hints()
    def choices(name):
        assert typing.get_origin(hints[name]) is typing.Literal, name
        return typing.get_args(hints[name])
    assert choices("train_loader") == tuple(tg.TRAIN_LOADERS)
    assert choices("compile_mode") == tg.COMPILE_MODES
    assert set(choices("preset")) == {"", *tg.PRESETS}
    assert set(choices("quant_compressor")) == {*tg.COMPRESSORS, "pergroup", "auto"}
    # every default and every preset value is one of its field's choices
    literal = {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is typing.Literal}
    assert len(literal) >= 16
    for f in dataclasses.fields(tg.Hyperparameters):
        if f.name in literal:
            assert f.default in literal[f.name], f.name
            assert all(p.get(f.name, f.default) in literal[f.name] for p in tg.PRESETS.values()), f.name


@pytest.mark.parametrize("var,raw", [("DEVICE", "tpu"), ("EVAL_MODE", "window"), ("PREFLIGHT", "2")])
def test_a_value_outside_the_choices_is_one_error_naming_them(var, raw):
    allowed = typing.get_args(tg.field_hints()[var.lower()])
    with pytest.raises(tg.ConfigError, match=f"^{var}={raw}: must be one of " + repr(allowed).replace("(", r"\(")
                       .replace(")", r"\)") + "$"):
        tg.Hyperparameters.from_env({var: raw})


@pytest.mark.parametrize("var,ok,bad", [("VAL_LOSS_EVERY", "0", "4000"), ("PARALLEL_FINAL_LANE", "mean", "sum")])
def test_records_one_value_knobs_are_accepted_at_that_value_only(var, ok, bad):
    assert tg.Hyperparameters.from_env({var: ok}) == tg.Hyperparameters()
    with pytest.raises(tg.ConfigError, match=f"^{var}={bad}: must be {ok}: "):
        tg.Hyperparameters.from_env({var: bad})


# ==============================================================================================
# config reads

SOURCE = ast.parse(inspect.getsource(tg))
VIEWS = {n: v for n, v in vars(tg).items() if isinstance(v, type) and issubclass(v, tg.View) and v is not tg.View}
FUNCTIONS = {n.name: n for n in SOURCE.body if isinstance(n, ast.FunctionDef)}
CLASSES = {n.name: n for n in SOURCE.body if isinstance(n, ast.ClassDef)}
# What each phase of run() receives: its view, not the flat config.
PHASE_VIEWS = {"train": "TrainConfig", "calibrate": "CalibConfig", "serialize": "PackConfig",
          "evaluate_final": "EvalConfig", "ttt_evaluate": "TTTConfig", "lora_ttt_evaluate": "DocTTTConfig",
          "build_model": "ModelConfig", "quantize_state": "QuantSpec"}


def fields(view: str) -> set[str]:
    return {f.name for f in dataclasses.fields(VIEWS[view])}


def attributes(view: str) -> set[str]:
    """Fields, properties and methods: what code may read on the view."""
    return fields(view) | {a for a in dir(VIEWS[view]) if not a.startswith("__")}


def config_params(fn: ast.FunctionDef) -> dict[str, str]:
    """Parameter name -> the config type named in its annotation (a view or Hyperparameters)."""
    out = {}
    for a in fn.args.args + fn.args.kwonlyargs:
        nodes = list(ast.walk(a.annotation)) if a.annotation else []
        names = {n.id for n in nodes if isinstance(n, ast.Name)}
        names |= {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        hit = [n for n in names if n in VIEWS or n == "Hyperparameters"]
        if hit:
            out[a.arg] = hit[0]
    return out


def callee_param(call: ast.Call, arg: ast.expr) -> tuple[str, str | None] | None:
    """(callee name, the config type of the parameter `arg` lands on) for a call of a module-level
    function or class; None when the callee is not one (a lambda, a method of an object)."""
    name = call.func.id if isinstance(call.func, ast.Name) else None
    if name in CLASSES:
        fn, skip = method(name, "__init__"), 1
    elif isinstance(call.func, ast.Attribute):  # obj.m(...): the one class of this module with a method m
        name = call.func.attr
        owners = [c for c in CLASSES if method(c, name)]
        fn, skip = (method(owners[0], name), 1) if len(owners) == 1 else (None, 0)
    else:
        fn, skip = FUNCTIONS.get(name), 0
    if fn is None:
        return None
    params = [a.arg for a in fn.args.args][skip:]
    target = next((k.arg for k in call.keywords if k.value is arg), None)
    if target is None:
        target = params[call.args.index(arg)]
    return name, config_params(fn).get(target)


def method(cls: str, name: str) -> ast.FunctionDef | None:
    return next((n for n in CLASSES[cls].body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def stored(init: ast.FunctionDef, p: str) -> list[str]:
    """self.<attr> that __init__ sets to the parameter p (self.cfg = cfg, or in a tuple assignment)."""
    out = []
    for node in ast.walk(init):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and \
                    isinstance(node.value, ast.Tuple) else [(target, node.value)]
                out += [ast.unparse(t) for t, v in pairs if through(v, p) and ast.unparse(t).startswith("self.")]
    return out


def view_functions():
    """(qualified name, function node, parameter, view, the expression reads are made through)."""
    for name, fn in FUNCTIONS.items():
        for p, view in config_params(fn).items():
            if view in VIEWS:
                yield name, fn, p, view
    for cname, cls in CLASSES.items():
        methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
        for m in methods:
            for p, view in config_params(m).items():
                if view in VIEWS:
                    yield f"{cname}.{m.name}", m, p, view
                    for attr in stored(m, p) if m.name == "__init__" else ():  # self.h = h: read as self.h
                        for other in methods:
                            yield f"{cname}.{other.name}", other, attr, view


def through(node: ast.AST, p: str) -> bool:
    return ast.unparse(node) == p


def problems() -> list[str]:
    found = []
    for qual, fn, p, view in view_functions():
        allowed, mine = attributes(view), fields(view)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and through(node.value, p) and node.attr not in allowed:
                found.append(f"{qual} reads {p}.{node.attr}, not in {view}")
            if not isinstance(node, ast.Call):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if not through(arg, p):
                    continue
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr == "of" and isinstance(f.value, ast.Name):
                    if f.value.id in VIEWS and not fields(f.value.id) <= mine:
                        found.append(f"{qual} builds {f.value.id} from {view}: missing "
                                     f"{sorted(fields(f.value.id) - mine)}")
                    continue
                if ast.unparse(f) in ("dataclasses.replace", "getattr"):
                    continue
                callee = callee_param(node, arg)
                if callee is None:
                    found.append(f"{qual} passes {p} ({view}) to {ast.unparse(f)}, which is not a typed function")
                elif callee[1] is None or callee[1] == "Hyperparameters":
                    found.append(f"{qual} passes {p} ({view}) to {callee[0]}, typed {callee[1]}")
                elif not fields(callee[1]) <= mine:
                    found.append(f"{qual} passes {view} to {callee[0]} ({callee[1]}): missing "
                                 f"{sorted(fields(callee[1]) - mine)}")
    return found


def test_a_function_typed_with_a_view_reads_and_passes_only_that_view():
    assert problems() == []


def test_the_check_sees_a_read_outside_the_view_and_a_pass_to_the_flat_config():
    global FUNCTIONS
    bad = ast.parse("def f(h: TrainConfig, rt):\n    return h.eval_stride + g(h)\n"
                    "def g(h: Hyperparameters):\n    return 0\n").body
    saved = FUNCTIONS
    FUNCTIONS = {**saved, "f": bad[0], "g": bad[1]}
    try:
        found = [x for x in problems() if x.startswith("f ")]
    finally:
        FUNCTIONS = saved
    assert found == ["f reads h.eval_stride, not in TrainConfig", "f passes h (TrainConfig) to g, typed Hyperparameters"]


@pytest.mark.parametrize("phase,view", sorted(PHASE_VIEWS.items()))
def test_each_phase_of_the_run_takes_its_view(phase, view):
    assert view in config_params(FUNCTIONS[phase]).values()


def test_every_field_of_a_view_is_read_by_a_function_typed_with_it_or_a_view_inside_it():
    read: dict[str, set[str]] = {v: set() for v in VIEWS}
    for _, fn, p, view in view_functions():
        read[view] |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and through(n.value, p)}
    borrowed = {}  # a view's properties and methods (its own or Hyperparameters') read the fields they use
    for cls in ["Hyperparameters", *VIEWS]:
        for node in CLASSES[cls].body:
            if isinstance(node, ast.FunctionDef):
                borrowed.setdefault(node.name, set()).update(
                    n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and through(n.value, "self"))
    for view in VIEWS:
        used = set()
        for other in VIEWS:
            if fields(other) <= fields(view):
                used |= read[other]
        used |= {f for a in list(used) for f in borrowed.get(a, ())}
        assert fields(view) - used == set(), view


# The run's setup before the phases: the log and its header, the tokenizer and its checks.
SETUP = {"setup_logging", "log_run_header", "load_tokenizer", "check_caseops_tokenizer", "resolve_bos_id"}


def test_only_the_setup_the_report_and_the_drivers_take_the_flat_config():
    lines = inspect.getsource(tg).splitlines()
    report = lines.index("# Report") + 1  # the report and the drivers follow, to the end of the file
    flat = {n for n, fn in FUNCTIONS.items() if "Hyperparameters" in config_params(fn).values()}
    assert flat and {n for n in flat if FUNCTIONS[n].lineno < report} == SETUP

