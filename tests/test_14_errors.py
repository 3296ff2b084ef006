"""Bad input gathered from the sections (issue 17 item 7): a run of the script (tg.main, or
train_gpt.py or a tool as a subprocess) that gets bad input prints one `error:` line and exits 2,
writing nothing; headed by the section whose input it is. The ConfigError unit tests of a section's
own parsing stay in that section's file (test_01_config.py, test_04_model.py, ...), and so do the
cases tied to a file's fixtures or helpers (the CaseOps sidecar cases in test_03_data.py, the
vocabulary mismatch, the bare launch line in test_01_config.py).

    python3 -m pytest -q tests/test_14_errors.py -m "slow or not slow"
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pack
import train_gpt as tg
from conftest import ROOT, assert_one_error_line, run_script, tiny_env, script_env
from doc_streams import BOS, doc_env, L
from helpers import frontier_env


# ==============================================================================================
# 01 config

SCRIPT = ROOT / "train_gpt.py"


def test_tokenizer_file_that_is_not_a_sentencepiece_model_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(bytes(range(256)) * 4)  # exists, has the suffix, is no ModelProto
    assert tg.main({"TOKENIZER_PATH": str(bad), "DEVICE": "cpu"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: TOKENIZER_PATH={bad}: not a SentencePiece model"), err


# ==============================================================================================
# 03 data: shards, CaseOps, varlen

def test_truncated_last_train_shard_fails_before_step_1(tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import tiny_env
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    last = sorted(data.glob("fineweb_train_*.bin"))[-1]
    last.write_bytes(last.read_bytes()[:-2])  # one token short of what its header promises
    monkeypatch.chdir(tmp_path)
    assert tg.main(tiny_env(data, RUN_ID="cut", DEVICE="cpu")) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {last}: file is") and "header promises" in err[0], err
    assert "step:1/" not in out.out and "train_shards:" not in out.out


@pytest.mark.parametrize("case,words", [
    ("bad_json", ["line 2", "JSON object"]),
    ("no_text", ["line 1", "text"]),
    ("not_caseops", ["not a CaseOps tokenizer"]),
    ("not_a_model", ["not a SentencePiece model"]),
    ("val_docs", ["--val-docs 3", "3 documents"]),
])
def test_caseops_tool_bad_input_is_one_error_line(tmp_path, tiny_data, case, words):
    """tests/tools/caseops_data.py on bad input: one `error:` line, exit 2, no shard written."""
    import subprocess
    import sys
    docs = tmp_path / "docs.jsonl"
    lines = {"bad_json": ['{"text": "A b"}', '{"text": '], "no_text": ['{"body": "x"}']}.get(
        case, ['{"text": "One."}', '{"text": "Two."}', '{"text": "Three."}'])
    docs.write_text("\n".join(lines) + "\n")
    tokenizer = tiny_data / "tokenizer.model"
    if case == "not_a_model":
        tokenizer = tmp_path / "junk.model"
        tokenizer.write_bytes(b"\x00junk" * 50)
    out = tmp_path / "out"
    tool = ROOT / "tests" / "tools" / "caseops_data.py"
    proc = subprocess.run([sys.executable, tool, "--docs", str(docs), "--tokenizer", str(tokenizer), "--out", str(out),
                           "--val-docs", "3" if case == "val_docs" else "1"], capture_output=True, text=True)
    assert_one_error_line(proc, words)
    assert not out.exists()


def test_script_exits_2_naming_the_capacity_when_documents_are_too_short(tiny_data, tmp_path, monkeypatch, capsys):
    """Training shards of 3-token documents: the first batch holds 1,387 segments for 256 sequences."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.tile(np.array([BOS, 40, 41], dtype=np.uint16), 6000)
    tg.write_shard(str(data / "fineweb_train_000000.bin"), tokens)
    tg.write_shard(str(data / "fineweb_val_000000.bin"), tokens[:3000])
    monkeypatch.chdir(tmp_path)
    env = dict(doc_env(tiny_data, DOC_MASKING=1, RUN_ID="overflow"), DATA_PATH=str(data))
    assert tg.main(env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = tokens[:32 * 128].reshape(32, 128)  # the sequential loader's first batch
    segments = int((first == BOS).sum() + (first[:, 0] != BOS).sum())  # 1,366 BOS + 21 rows starting mid-document
    assert len(err) == 1 and err[0].startswith(f"error: DOC_MASKING: a batch of shape (32, 128) holds {segments} "
                                               "attention segments, more than the varlen capacity 256")
    assert not (tmp_path / tg.ARTIFACT_NAME).exists()


# ==============================================================================================
# 08 quantize and pack

def test_eval_artifact_of_random_bytes_exits_2_with_one_error_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.ptz").write_bytes(bytes(range(256)) * 16)
    assert tg.main(tiny_env(tiny_data, RUN_ID="junk", EVAL_ARTIFACT="junk.ptz", DEVICE="cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: EVAL_ARTIFACT: the artifact (4096 bytes) does not decompress"), err


@pytest.mark.parametrize("env,var", [
    ({"QUANT_COMPRESSOR": "lrzip"}, "QUANT_COMPRESSOR"),
    ({"QUANT_CLIP": "mse"}, "QUANT_CLIP"),
    ({"MATRIX_BITS": "1"}, "MATRIX_BITS"),
    ({"EMBED_BITS": "9"}, "EMBED_BITS"),
    ({"LQER_FACTOR_BITS": "9"}, "LQER_FACTOR_BITS"),
    ({"LQER_ENABLED": "1", "LQER_TOP_K": "13"}, "LQER_TOP_K"),  # tiny: 2 layers x 6 matrices = 12
    ({"LQER_ENABLED": "1", "LQER_TOP_K": "0"}, "LQER_TOP_K"),
    ({"MLP_CLIP_SIGMAS": "0"}, "MLP_CLIP_SIGMAS"),
    ({"LQER_RNAK": "4"}, "LQER_RNAK"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_quant_input_is_one_error_line_exit_2(tiny_data, capsys, env, var):
    assert tg.main(tiny_env(tiny_data, **env)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {var}")
    ok = tg.Hyperparameters.from_env(tiny_env(tiny_data, LQER_ENABLED=1, LQER_TOP_K=13, QUANT_EMBED="gptq"))
    assert ok.lqer_top_k == 13  # the tied embedding is the 13th GPTQ'd matrix


@pytest.mark.slow
def test_usage_error(capsys):
    assert pack.main(["pack.py"]) == 2
    assert capsys.readouterr().err.startswith("usage: python3 tests/tools/pack.py")


# ==============================================================================================
# 09 evaluate: document-isolated eval and LoRA TTT

BAD = {
    "chunk_above_seq_len": (dict(TTT_CHUNK_SIZE=L + 1), "TTT_CHUNK_SIZE"),
    "rank0_with_lora": (dict(TTT_LORA_RANK=0), "TTT_LORA_RANK"),
    "phases_above_prefix": (dict(PHASED_TTT_NUM_PHASES=7, PHASED_TTT_PREFIX_DOCS=6), "PHASED_TTT_NUM_PHASES"),
    "eval_mode": (dict(EVAL_MODE="docs"), "EVAL_MODE"),
    "batch_size": (dict(TTT_BATCH_SIZE=0), "TTT_BATCH_SIZE"),
    "typo": (dict(PHASED_TTT_PHASES=2), "PHASED_TTT_PHASES"),
    "phase_select": (dict(PHASED_TTT_SELECT="longest"), "PHASED_TTT_SELECT"),
    "balance": (dict(TTT_BALANCE="greedy"), "TTT_BALANCE"),
    "per_slot": (dict(TTT_LORA_PER_SLOT="2"), "TTT_LORA_PER_SLOT"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_doc_eval_input_exits_2_naming_the_variable(case, tiny_data, capsys):
    overrides, var = BAD[case]
    assert tg.main(doc_env(tiny_data, RUN_ID="bad", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {var}"), err


# ==============================================================================================
# 11 drivers: the run's working directory, end-to-end bad input, the frontier run

@pytest.mark.slow
@pytest.mark.parametrize("case", ["logs_is_a_file", pytest.param("read_only", marks=pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a 0o555 folder all the same"))])
def test_unwritable_working_directory_is_one_error_line(case, tmp_path):
    """logs/ cannot be created (a file named logs; a folder without write permission): exit 2, one
    `error:` line naming logs/ and the folder, nothing trained or written. PRESET=tiny's shipped sample."""
    import subprocess
    import sys
    import tempfile
    from conftest import script_env
    cwd = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        if case == "logs_is_a_file":
            (cwd / "logs").write_text("not a folder")
        os.chmod(cwd, 0o555 if case == "read_only" else 0o755)
        before = sorted(os.listdir(cwd))
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, capture_output=True, text=True, timeout=120,
                              env=script_env({"PRESET": "tiny", "RUN_ID": "err"}))
        assert_one_error_line(proc, ["logs/err.txt", "cannot be written", str(cwd)])
        assert sorted(os.listdir(cwd)) == before and "step:" not in proc.stdout
    finally:
        os.chmod(cwd, 0o755)
        shutil.rmtree(cwd)


def _copy_data(tiny_data: Path, dest: Path) -> Path:
    shutil.copytree(tiny_data, dest)
    return dest


def _bad_magic(tiny_data, tmp, name="fineweb_train_000000.bin", **env):
    data = _copy_data(tiny_data, tmp / "data")
    path = data / name
    raw = bytearray(path.read_bytes())
    raw[:4] = np.array([12345], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    return tiny_env(data, **env)


def _bad_size(tiny_data, tmp):
    data = _copy_data(tiny_data, tmp / "data")
    with open(data / "fineweb_train_000000.bin", "ab") as f:
        f.write(b"\0\0\0")
    return tiny_env(data)


def _no_shards(tiny_data, tmp):
    (tmp / "empty").mkdir()
    return dict(tiny_env(tmp / "empty"), TOKENIZER_PATH=str(tiny_data / "tokenizer.model"))


ERROR_CASES = {
    "missing_shards": (_no_shards, ["DATA_PATH", "no shards"]),
    "bad_header": (_bad_magic, ["fineweb_train_000000.bin", "bad shard header"]),
    "size_mismatch": (_bad_size, ["fineweb_train_000000.bin", "header promises"]),
    "vocab_mismatch": (lambda d, t: tiny_env(d, VOCAB_SIZE=256), ["VOCAB_SIZE=256", "tokenizer"]),
    "heads": (lambda d, t: tiny_env(d, NUM_HEADS=3), ["MODEL_DIM=64", "NUM_HEADS"]),
    "batch": (lambda d, t: tiny_env(d, TRAIN_BATCH_TOKENS=100), ["TRAIN_BATCH_TOKENS=100", "TRAIN_SEQ_LEN"]),
    "unknown_ttt_var": (lambda d, t: tiny_env(d, TTT_LEARNING_RATE=0.1), ["TTT_LEARNING_RATE", "unknown"]),
    "missing_artifact": (lambda d, t: tiny_env(d, EVAL_ARTIFACT=t / "nope.ptz"), ["EVAL_ARTIFACT=", "nope.ptz",
                                                                                  "not found"]),
}


class LeftBehind(Exception):
    """The run trained or wrote an artifact before failing (kept apart for the xfail below)."""


ERROR_PARAMS = list(ERROR_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", ERROR_PARAMS)
def test_bad_input_fails_with_one_error_line(case, tiny_data, tmp_path):
    make_env, words = ERROR_CASES[case]
    env = dict(make_env(tiny_data, tmp_path), RUN_ID="err")
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(env, cwd, timeout=120)
    assert_one_error_line(proc, words)
    if re.search(r"^step:\d+/", proc.stdout, re.M) or [p for p in cwd.iterdir() if p.name.startswith(tg.ARTIFACT_NAME)]:
        raise LeftBehind("trained or left an artifact (or its .tmp) in cwd: " + str(sorted(os.listdir(cwd))))


@pytest.mark.slow
def test_bad_val_shard_fails_at_eval_and_keeps_the_artifact(tiny_data, tmp_path):
    """Val shards are not even opened before the artifact exists (rule C1), so a bad val header is
    found when evaluation starts: exit 2 naming the file, and the complete artifact stays for
    EVAL_ARTIFACT (nothing half-written)."""
    env = dict(_bad_magic(tiny_data, tmp_path, "fineweb_val_000000.bin", ITERATIONS=2, WARMUP_STEPS=0), RUN_ID="err")
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(env, cwd, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "fineweb_val_000000.bin" in last and "EVAL_ARTIFACT=" in last, last
    assert (cwd / tg.ARTIFACT_NAME).is_file() and not list(cwd.glob(tg.ARTIFACT_NAME + ".tmp*"))
    cfg, state = tg.unpack_artifact((cwd / tg.ARTIFACT_NAME).read_bytes())
    assert cfg.num_layers == 2 and state


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["random", "missing"])
def test_eval_artifact_is_checked_before_the_val_shards(damage, tiny_data, tmp_path):
    """EVAL_ARTIFACT reads and checks the artifact first: a corrupt or missing artifact is the one error
    even when the val shard is broken too, and nothing (no logs/) is written."""
    data = _copy_data(tiny_data, tmp_path / "data")
    (data / "fineweb_val_000000.bin").write_bytes(b"\0" * 100)  # a broken val shard: never reached
    art = tmp_path / "a.ptz"
    if damage == "random":
        art.write_bytes(np.random.default_rng(0).bytes(4096))
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(dict(tiny_env(data), RUN_ID="err", EVAL_ARTIFACT=str(art)), cwd, timeout=120)
    words = ["EVAL_ARTIFACT", "does not decompress"] if damage == "random" else ["EVAL_ARTIFACT=", "not found"]
    last = assert_one_error_line(proc, words)
    assert "fineweb_val" not in last and list(cwd.iterdir()) == []


@pytest.mark.slow
def test_bad_frontier_input_is_one_error_line_and_writes_nothing(tiny_data, tmp_path):
    """The other bad settings are checked in-process (test_04_model.py): same code path."""
    proc = run_script(frontier_env(tiny_data, PARALLEL_START_LAYER=5), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: PARALLEL_START_LAYER=5:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert not list(tmp_path.iterdir())  # settings are checked before anything is opened
