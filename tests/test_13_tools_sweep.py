"""tests/tools/sweep.py: the paired per-document test against scipy on synthetic losses with a known
effect, and grid / select end to end on the tiny preset (resumption, a failing point)."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats

import sweep
from conftest import script_env


def synthetic(effect: float, n_docs: int = 60, seed: int = 0):
    """A BOS-delimited stream (BOS=1) and two per-token NLL arrays, new = base + effect + noise."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, n_docs)
    tokens = np.concatenate([np.r_[1, rng.integers(2, 500, n - 1)] for n in lengths])
    base = rng.gamma(2.0, 1.5, len(tokens))
    new = base + effect + rng.normal(0, 0.3, len(tokens))
    base[0] = new[0] = np.nan  # token 0 is never scored
    return tokens, new, base, lengths


@pytest.mark.slow
def test_per_document_deltas_equal_an_explicit_loop():
    tokens, new, base, lengths = synthetic(-0.05)
    got = sweep.per_document_deltas(new, base, tokens, bos_id=1)
    edges = np.r_[0, np.cumsum(lengths)]
    want = []
    for s, e in zip(edges[:-1], edges[1:]):
        d = new[s:e] - base[s:e]
        want.append(np.nanmean(d))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(got) == len(lengths)


@pytest.mark.slow
@pytest.mark.parametrize("effect", [-0.05, 0.0, 0.05])
def test_paired_test_matches_scipy_ttest_rel(effect):
    tokens, new, base, lengths = synthetic(effect, seed=3)
    edges = np.r_[0, np.cumsum(lengths)]
    doc_new = [np.nanmean(new[s:e]) for s, e in zip(edges[:-1], edges[1:])]
    doc_base = [np.nanmean(base[s:e]) for s, e in zip(edges[:-1], edges[1:])]
    want = stats.ttest_rel(doc_new, doc_base, alternative="less").pvalue
    got = sweep.paired_test(sweep.per_document_deltas(new, base, tokens, 1))
    assert got["p_one_sided"] == pytest.approx(want, rel=1e-9)
    lo, hi = got["ci95"]
    assert lo < got["mean_delta_nats"] < hi
    if effect < 0:
        assert got["p_one_sided"] < 1e-6 and hi < 0
    elif effect > 0:
        assert got["p_one_sided"] > 0.999 and lo > 0


@pytest.mark.slow
def test_paired_test_rejects_mismatched_lengths():
    tokens, new, base, _ = synthetic(0.0)
    with pytest.raises(ValueError, match="differ in length"):
        sweep.per_document_deltas(new[:-1], base[:-1], tokens, 1)


@pytest.mark.slow
def test_bad_assignment_is_one_error():
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        sweep.parse_assignments("ITERATIONS")


def base_string(tiny_data) -> str:
    return (f"PRESET=tiny DATA_PATH={tiny_data} TOKENIZER_PATH={tiny_data / 'tokenizer.model'} VOCAB_SIZE=512 "
            "ITERATIONS=6 TTT_ENABLED=0")


@pytest.fixture
def clean_env(monkeypatch):
    """Sweep subprocesses must not inherit the test runner's own script variables."""
    for k in list(os.environ):
        if k not in script_env({}):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_runs_every_point_reports_a_failure_and_resumes(tiny_data, tmp_path, clean_env):
    out = tmp_path / "grid"
    rc = sweep.main(["grid", "--base", base_string(tiny_data), "--vary", "MATRIX_LR=0.05,oops", "--out", str(out)])
    assert rc == 1  # one point failed, the sweep still finished
    rows = {r["run_id"]: r for r in read_csv(out / "table.csv")}
    assert set(rows) == {"base", "p000_matrix_lr-0.05", "p001_matrix_lr-oops"}
    assert rows["p001_matrix_lr-oops"]["status"] == "failed:2"
    good = rows["p000_matrix_lr-0.05"]
    assert good["status"] == "done" and good["MATRIX_LR"] == "0.05"
    summary = json.load(open(out / "runs" / "p000_matrix_lr-0.05" / "logs" / "p000_matrix_lr-0.05.json"))
    assert float(good["val_bpb"]) == pytest.approx(summary["val_bpb"])
    assert summary["config"]["matrix_lr"] == 0.05 and summary["config"]["max_wallclock_seconds"] == 0
    assert float(good["delta_bpb"]) == pytest.approx(summary["val_bpb"] - float(rows["base"]["val_bpb"]), abs=1e-6)
    assert 0.0 <= float(good["p_paired"]) <= 1.0 and int(good["docs"]) > 1
    assert (out / "table.md").read_text().startswith("| run_id |")
    stamp = os.path.getmtime(out / "runs" / "base" / "stdout.txt")
    sweep.main(["grid", "--base", base_string(tiny_data), "--vary", "MATRIX_LR=0.05,oops", "--out", str(out)])
    rows2 = {r["run_id"]: r for r in read_csv(out / "table.csv")}
    assert rows2["base"]["status"] == "done(resumed)" and rows2["p000_matrix_lr-0.05"]["status"] == "done(resumed)"
    assert os.path.getmtime(out / "runs" / "base" / "stdout.txt") == stamp  # not rerun
    assert rows2["p000_matrix_lr-0.05"]["val_bpb"] == good["val_bpb"]


@pytest.mark.slow
def test_select_keeps_a_real_gain_and_rejects_a_loss(tiny_data, tmp_path, clean_env):
    out = tmp_path / "sel"
    rc = sweep.main(["select", "--base", base_string(tiny_data), "--candidate", "ITERATIONS=30",
                     "--candidate", "MATRIX_LR=0", "--candidate", "SCALAR_LR=0", "--out", str(out), "--p", "0.05"])
    assert rc == 0
    steps = read_csv(out / "steps.csv")
    first = [s for s in steps if s["round"] == "1"]
    assert len(first) == 3
    kept = [s for s in steps if s["kept"] == "True"]
    assert kept and kept[0]["candidate"] == "ITERATIONS=30"
    assert float(kept[0]["delta_bpb"]) < 0 and float(kept[0]["p_paired"]) < 0.05
    chosen = json.load(open(out / "selected.json"))
    assert chosen["overrides"].get("ITERATIONS") == "30"
    assert "MATRIX_LR" not in chosen["overrides"]
    # every later round starts from the kept override
    assert all("r2_" in s["run_id"] for s in steps if s["round"] == "2")
