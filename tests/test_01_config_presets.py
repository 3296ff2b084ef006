"""The founding systems as presets (issue 14 part 1) and the 1.0611 record's own launch line
(issue 19 item 6).

Each preset builds the model of that system with the parameter count of its logs (stack.md 3.13,
against a formula written from that table), carries its distinctive settings, logs
`preset:<name>` and runs end to end at tiny dims on CPU (env overrides on top of the preset).
The record's launch line (frontier.md section 7, copied below) gives, after PRESET=pr1855, exactly
the preset plus its seed, data paths and reserve (COMPRESSOR=pergroup is QUANT_COMPRESSOR=pergroup);
the line without a frontier preset is one error naming each variable, exit 2, nothing written.

    python3 -m pytest -q tests/test_01_config_presets.py -m "slow or not slow" # about 1 min on one busy core
    python3 -m pytest -q tests/test_01_config_presets.py                # the quick ones: no preset run end to end
"""

import dataclasses
import json
import math
import shlex

import pytest

import train_gpt as tg
from helpers import frontier_param_count, tiny_preset_env

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


# pr1855 is PRESETS["frontier"] itself (checked above), whose e2e test_11_drivers_frontier_e2e.py runs by default.
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
