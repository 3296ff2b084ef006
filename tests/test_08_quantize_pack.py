"""The packed, self-extracting train_gpt.py (tests/tools/pack.py; issue 10 item 6, rule D2; issue 17 item 8).

Covers: the literal escapes exactly NUL, CR, LF, the quote and the backslash, and Python's own parser
reads every byte value back; the packed file is small, stdlib-only Python that unpacks to the exact
source and runs as the script itself (`__name__`, `__file__`, the source's line numbers in a
traceback); run on the tiny CPU path it gives the same scores as the source (bit for bit), logs as
code bytes its own size on disk and the source inside as the logged code, and counts artifact total =
that + model bytes; the usage error.

Run: python3 -m pytest -q tests/test_08_quantize_pack.py   (two tiny runs as subprocesses, CPU only)
"""

import json
import lzma
import re
import subprocess
import sys

import pytest

import pack
import train_gpt as tg
from conftest import ROOT, script_env, tiny_env

ESCAPED_BYTES = b'\x00\r\n"\\'


def run(script, cwd, env) -> dict:
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=script_env(env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(summary=json.loads((cwd / "logs" / f"{env['RUN_ID']}.json").read_text()),
                log=(cwd / "logs" / f"{env['RUN_ID']}.txt").read_text(encoding="utf-8"))


def literal(packed: bytes) -> bytes:
    """The body of the packed file's string literal."""
    head, tail = pack.WRAPPER.split(b"%s")
    assert packed.startswith(head) and packed.endswith(tail)
    return packed[len(head):len(packed) - len(tail)]


@pytest.mark.slow
def test_escape_covers_every_byte_value_and_only_the_five():
    data = bytes(range(256)) + b"".join(b"\x00" + bytes([c]) for c in b"0123456789\\\x00") + b"\r\n\\\""
    body = pack.escape(data)
    assert not any(c in body.replace(b"\\\\", b"").replace(b'\\"', b"") for c in b'\x00\r\n"')
    octal_after_nul = sum(1 for a, b in zip(data, data[1:]) if a == 0 and b in b"01234567")
    assert len(body) == len(data) + sum(data.count(c) for c in ESCAPED_BYTES) + 2 * octal_after_nul
    assert body.count(b"\\") == sum(data.count(c) for c in ESCAPED_BYTES) + data.count(b"\\")  # one escape each
    source = b"# coding: latin-1\nX = \"" + body + b"\".encode(\"latin-1\")\n"
    scope = {}
    exec(compile(source, "lit.py", "exec"), scope)  # the interpreter's tokenizer, not pack.unpack
    assert scope["X"] == data


@pytest.mark.slow
def test_packed_file_is_the_lzma_bytes_and_runs_as_the_script(tmp_path):
    source = b'import sys\nprint(__name__, __file__)\n\n\ndef f():\n    raise ValueError("line 6")\n\n\nf()\n'
    packed = pack.pack(source)
    stream = lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)
    assert pack.unpack(packed) == source
    assert len(packed) == len(pack.WRAPPER) - 2 + len(stream) + sum(stream.count(c) for c in ESCAPED_BYTES) \
        + 2 * len(re.findall(rb"\x00(?=[0-7])", stream))
    path = tmp_path / "p.py"
    path.write_bytes(packed)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"__main__ {path}\n"
    frames = re.findall(r'File "(.*)", line (\d+), in (\S+)', proc.stderr)
    assert frames[-2:] == [(str(path), "9", "<module>"), (str(path), "6", "f")], proc.stderr
    assert proc.stderr.strip().endswith("ValueError: line 6")
    if sys.version_info < (3, 13):  # 3.13 quotes every line of the multi-line exec(...) call
        assert "    exec(compile(lzma.decompress(\n" in proc.stderr and len(proc.stderr) < 500, proc.stderr


@pytest.mark.slow
def test_packed_script_runs_identically_and_counts_its_own_size(tiny_data, tmp_path):
    source = (ROOT / "train_gpt.py").read_bytes()
    packed_path = tmp_path / "record" / "train_gpt.py"
    packed_path.parent.mkdir()
    assert pack.main(["pack.py", str(ROOT / "train_gpt.py"), str(packed_path)]) == 0
    packed = packed_path.read_bytes()
    assert pack.unpack(packed) == source and len(packed) < 0.3 * len(source)
    assert set(re.findall(rb"^import (.*)$", packed, re.M)) == {b"lzma"}  # stdlib only
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
    rule = "=" * 100 + "\n"  # the logged code: the source that ran, also from inside the packed file
    for name in ("src", "packed"):
        assert ran[name]["log"].split(rule)[1] == source.decode("utf-8") + "\n"


@pytest.mark.slow
def test_usage_error(capsys):
    assert pack.main(["pack.py"]) == 2
    assert capsys.readouterr().err.startswith("usage: python3 tests/tools/pack.py")
