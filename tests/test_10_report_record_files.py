"""The committed record files describe the shipped script: train.log's `code:` line (bytes and
sha256 of the source that ran) must equal train_gpt.py as committed. Fails whenever train_gpt.py
changes after train.log was made: rerun tests/README.md's `train.log` command on the final file.

    python3 -m pytest -q tests/test_10_report_record_files.py
"""
import hashlib
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_log_code_hash_is_the_shipped_script():
    code = (ROOT / "train_gpt.py").read_bytes()
    lines = [l for l in (ROOT / "train.log").read_text().splitlines() if l.startswith("code: bytes:")]
    assert len(lines) == 1, f"expected one 'code:' line in train.log, found {len(lines)}"
    m = re.match(r"code: bytes:(\d+) sha256:([0-9a-f]{64})", lines[0])
    assert m, lines[0]
    assert (int(m.group(1)), m.group(2)) == (len(code), hashlib.sha256(code).hexdigest()), (
        "train.log was made by another train_gpt.py: regenerate it with tests/README.md's train.log command")


def test_submission_json_holds_train_log_s_numbers():
    """submission.json (tests/tools/summarize.py over the seeds) has train.log's seed with the headline
    val_bpb of its `legal_ttt_exact` line and the artifact bytes of its `Total submission size` line,
    and its mean is the mean of its seeds."""
    log = (ROOT / "train.log").read_text()
    sub = json.loads((ROOT / "submission.json").read_text())
    seed = re.search(r"^hparam:seed=(\d+)$", log, re.M).group(1)
    bpb = float(re.search(r"^legal_ttt_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M).group(1))
    total = int(re.search(r"^Total submission size [^:]*: (\d+) bytes", log, re.M).group(1))
    assert sub["seed_results"][seed]["val_bpb"] == pytest.approx(bpb, abs=5e-9)
    assert sub["seed_results"][seed]["artifact_bytes"] == total
    assert sub["val_bpb"] == pytest.approx(sum(r["val_bpb"] for r in sub["seed_results"].values()) / len(sub["seeds"]))
    assert "not a leaderboard score" in sub["name"] and "CPU" in sub["hardware"].upper()
