"""The packed, self-extracting train_gpt.py (tests/pack.py; issue 10 item 6, rule D2).

Covers: the packed file is small, stdlib-only Python that unpacks to the exact source; run on the
tiny CPU path it gives the same scores as the source (bit for bit), logs as code bytes its own size
on disk, and counts artifact total = that + model bytes; the usage error.

Run: python3 -m pytest -q tests/test_pack.py   (two tiny runs as subprocesses, CPU only)
"""

import json
import re
import subprocess
import sys

import pytest

import pack
import train_gpt as tg
from conftest import ROOT, script_env, tiny_env


def run(script, cwd, env) -> dict:
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=script_env(env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(summary=json.loads((cwd / "logs" / f"{env['RUN_ID']}.json").read_text()),
                log=(cwd / "logs" / f"{env['RUN_ID']}.txt").read_text())


def test_packed_script_runs_identically_and_counts_its_own_size(tiny_data, tmp_path):
    source = (ROOT / "train_gpt.py").read_bytes()
    packed_path = tmp_path / "record" / "train_gpt.py"
    packed_path.parent.mkdir()
    assert pack.main(["pack.py", str(ROOT / "train_gpt.py"), str(packed_path)]) == 0
    packed = packed_path.read_bytes()
    assert pack.unpack(packed) == source and len(packed) < 0.5 * len(source)
    assert set(re.findall(rb"^import (.*)$", packed, re.M)) == {b"base64,lzma"}  # stdlib only
    compile(packed, "train_gpt.py", "exec")

    env = tiny_env(tiny_data, RUN_ID="pk", ITERATIONS=6, TTT_ENABLED=0)
    ran = {name: run(script, tmp_path / name, env) for name, script in (("src", ROOT / "train_gpt.py"),
                                                                        ("packed", packed_path))}
    src, pk = ran["src"]["summary"], ran["packed"]["summary"]
    for phase in ("prequant", "roundtrip", "sliding"):
        assert pk["eval"][phase]["val_bpb"] == src["eval"][phase]["val_bpb"], phase
    assert src["artifact"]["code_bytes"] == len(source)
    assert pk["artifact"]["code_bytes"] == len(packed) == packed_path.stat().st_size
    assert pk["artifact"]["model_bytes"] == (tmp_path / "packed" / tg.ARTIFACT_NAME).stat().st_size
    assert pk["artifact"]["total_bytes"] == len(packed) + pk["artifact"]["model_bytes"]
    assert f"Code size: {len(packed)} bytes" in ran["packed"]["log"]
    assert re.search(rf"code: bytes:{len(packed)} sha256:", ran["packed"]["log"])


def test_usage_error(capsys):
    assert pack.main(["pack.py"]) == 2
    assert capsys.readouterr().err.startswith("usage: python3 tests/pack.py")
