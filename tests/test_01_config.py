"""Hyperparameters.from_env: record defaults, the tiny preset and its precedence, strict parsing of
booleans/ints/floats, unknown owned variables, impossible shapes and enum values, an import
without side effects, and ModelConfig.

    python3 -m pytest -q tests/test_01_config.py
"""

import dataclasses
import json
import importlib.util
import os
import sys
import time

import pytest

import train_gpt as tg
from conftest import SAMPLE_SHARDS, SAMPLE_TOKENIZER

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
