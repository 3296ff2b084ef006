"""tests/tools/plot_logs.py (issue 15 item 9) on a real log of the script: the parsed curves against the
log's own lines, a PNG written, and a clear error for a file that is not a log."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import plot_logs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_parse_and_plot_the_committed_train_log(tmp_path):
    log = ROOT / "train.log"
    d = plot_logs.parse_log(str(log))
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("step:") and "train_loss:" in ln]
    lines = [ln for ln in lines if plot_logs.STEP.match(ln)]
    assert len(d["train"]) == len(lines) > 5  # every step line after the source, none from the source
    last = lines[-1].split()
    assert d["train"][-1][0] == int(last[0].split(":")[1].split("/")[0])
    assert d["train"][-1][1] == float(last[1].split(":")[1])
    steps = [s for s, _, _ in d["train"]]
    assert steps == sorted(steps) and all(t2 >= t1 for (_, _, t1), (_, _, t2) in zip(d["train"], d["train"][1:]))
    assert d["ttt"] and d["ttt_unit"] == "chunk" and all(0.5 < b < 10 for _, b in d["ttt"])
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    assert plot_logs.main([str(log), str(log), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_not_a_log_is_one_error(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("hello\n")
    with pytest.raises(SystemExit, match=r"x.txt: no step: or ttt_ lines"):
        plot_logs.parse_log(str(bad))
