"""Bad input, gathered from the section files (issue 17 item 7): each is one `error:` line and exit 2,
nothing written. The section each belongs to heads it. Others stay beside their fixtures: the
ConfigError tests in test_01_config*.py, the CaseOps sidecar cases in test_03_data_caseops.py, and the
end-to-end bad-input cases in test_11_drivers_end_to_end.py."""

import os
import shutil
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, assert_one_error_line, run_script, tiny_env
from helpers import frontier_env

SCRIPT = ROOT / "train_gpt.py"


# ---------------------------------------------------------------------------------------------
# From test_01_config.py

def test_tokenizer_file_that_is_not_a_sentencepiece_model_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(bytes(range(256)) * 4)  # exists, has the suffix, is no ModelProto
    assert tg.main({"TOKENIZER_PATH": str(bad), "DEVICE": "cpu"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: TOKENIZER_PATH={bad}: not a SentencePiece model"), err


# ---------------------------------------------------------------------------------------------
# From test_03_data_caseops.py

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


# ---------------------------------------------------------------------------------------------
# From test_08_quantize.py

def test_eval_artifact_of_random_bytes_exits_2_with_one_error_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.ptz").write_bytes(bytes(range(256)) * 16)
    assert tg.main(tiny_env(tiny_data, RUN_ID="junk", EVAL_ARTIFACT="junk.ptz", DEVICE="cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: EVAL_ARTIFACT: the artifact (4096 bytes) does not decompress"), err


# ---------------------------------------------------------------------------------------------
# From test_08_quantize_frontier.py

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


# ---------------------------------------------------------------------------------------------
# From test_11_drivers_end_to_end.py

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


# ---------------------------------------------------------------------------------------------
# From test_11_drivers_frontier_e2e.py

@pytest.mark.slow
def test_bad_frontier_input_is_one_error_line_and_writes_nothing(tiny_data, tmp_path):
    """The other bad settings are checked in-process (test_04_model_frontier.py): same code path."""
    proc = run_script(frontier_env(tiny_data, PARALLEL_START_LAYER=5), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: PARALLEL_START_LAYER=5:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert not list(tmp_path.iterdir())  # settings are checked before anything is opened
