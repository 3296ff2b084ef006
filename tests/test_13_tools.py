"""The tools in tests/tools/: bench, plot_logs, sweep.

Keeps tests/tools/bench.py alive on CPU (tiny dims, one step) and checks its FLOP count against the
model's own matmul parameters.

tests/tools/plot_logs.py (issue 15 item 9) on a real log of the script: the parsed curves against the
log's own lines, a PNG written, and a clear error for a file that is not a log.

tests/tools/sweep.py: the paired per-document test against scipy on synthetic losses with a known
effect, and grid / select end to end on the tiny preset (resumption, a failing point).

    python3 -m pytest -q tests/test_13_tools.py -m "slow or not slow"
"""

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import bench
import plot_logs
import sweep
import train_gpt as tg
from conftest import tiny_env, script_env
from helpers import bench_step_rows


# ==============================================================================================
# tools bench


def test_flops_per_token_counts_every_matmul(hparams):
    cfg = tg.ModelConfig.of(hparams)
    model = tg.GPT(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
    matmul += model.tok_emb.weight.numel()  # the tied head is a matmul; the lookups are not
    attention = 6 * cfg.num_layers * cfg.model_dim * hparams.train_seq_len
    assert bench.flops_per_token(cfg, hparams.train_seq_len) == 6 * matmul + attention


def test_bench_runs_tiny_on_cpu(tiny_data, monkeypatch, capsys):
    for k, v in tiny_env(tiny_data, TTT_CHUNK_TOKENS=1024).items():
        monkeypatch.setenv(k, v)
    assert bench.main(["--steps", "1", "--warmup", "1", "--eval-windows", "16"]) == 0
    lines = dict(line.split(":", 2)[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("bench:"))
    assert lines["attn_backend"] == "sdpa" and lines["compile"] == "False"
    assert float(lines["ms_per_step"]) > 0 and float(lines["tokens_per_s_per_device"]) > 0
    assert int(lines["sliding_windows"]) == 16
    expected = 4096 / (float(lines["ms_per_step"]) / 1000)
    assert abs(float(lines["tokens_per_s_per_device"]) / expected - 1) < 1e-2


def test_bench_gpu_step_tiny_prints_every_variant(monkeypatch, capsys):
    """tests/tools/bench_gpu_step.py --tiny (issue 16 item 4): one row per variant (looping x COMPILE_MODE x
    LOADER_PREFETCH, MUON_SHARDED=0 on one process), positive figures; tokens/s is the micro-batch
    over the median step; every mode starts from the same seeded model and fresh loader, so the
    first steps' losses agree across modes (eager here: COMPILE=0)."""
    import bench_gpu_step as bgs
    monkeypatch.delenv("COMPILE", raising=False)
    assert bgs.main(["--tiny", "--steps", "2", "--warmup", "1"]) == 0
    rows, skipped, done = bench_step_rows(capsys.readouterr().out)
    got = [(r["compile_mode"], r["looping"], r["loader_prefetch"], r["muon_sharded"]) for r in rows]
    assert got == [(m, lp, p, "0") for m in bgs.MODES for lp in ("0", "1") for p in ("0", "2")]
    assert not skipped and done["rows"] == "8" and done["skipped"] == "0" and float(done["elapsed_s"]) > 0
    for r in rows:
        assert float(r["ms_per_step"]) > 0 and float(r["peak_mib"]) > 0
        assert abs(float(r["tokens_per_s"]) / (8 * 128 / (float(r["ms_per_step"]) / 1000)) - 1) < 1e-2
        assert (r["graphs"], r["graph_breaks"], r["recompiles"]) == ("0", "0", "0")  # nothing compiled
    first = [r["loss"] for r in rows if (r["looping"], r["loader_prefetch"]) == ("0", "0")]
    assert len(first) == 2 and first[0] == first[1]  # each mode's first variant: same model, same batches


def test_bench_gpu_step_skips_variants_over_budget(monkeypatch, capsys):
    import bench_gpu_step as bgs
    assert bgs.main(["--tiny", "--budget-s", "0"]) == 0
    rows, skipped, done = bench_step_rows(capsys.readouterr().out)
    assert rows == [] and len(skipped) == 8 and done["rows"] == "0" and done["skipped"] == "8"
    assert re.fullmatch(r"skipped compile_mode=default looping=0 loader_prefetch=0 muon_sharded=0 "
                        r"\(elapsed \d+ s \+ projected 0 s over the budget of 0 s\)", skipped[0])


def test_bench_gpu_step_projects_compile_time():
    """A variant that compiles a new graph is projected at its mode's other warm-up, a new mode at
    twice the slowest so far; one that reuses its graph at its steps alone."""
    import bench_gpu_step as bgs
    seen = {("default", False): 60.0, ("default", True): 80.0}
    assert bgs.projected_s({}, "default", False, 0.0) == 0.0
    assert bgs.projected_s({("default", False): 60.0}, "default", True, 2.0) == 62.0
    assert bgs.projected_s(seen, "default", True, 2.0) == 2.0
    assert bgs.projected_s(seen, "max-autotune-no-cudagraphs", False, 2.0) == 162.0


@pytest.mark.slow
def test_bench_gpu_step_tiny_compiled_aot_eager(monkeypatch, capsys):
    """The compiled path (BENCH_BACKEND=aot_eager, COMPILE=1): one graph per (mode, looping), compiled
    in the warm-up of its first variant, no graph break, no recompile in the timed steps."""
    import bench_gpu_step as bgs
    monkeypatch.setenv("BENCH_BACKEND", "aot_eager")
    monkeypatch.setenv("COMPILE", "1")
    assert bgs.main(["--tiny", "--steps", "2", "--warmup", "1"]) == 0
    assert torch.compile.__module__ == "torch"  # restored
    rows, _, _ = bench_step_rows(capsys.readouterr().out)
    assert [r["graphs"] for r in rows] == ["1", "0"] * 4
    assert all(r["graph_breaks"] == "0" and r["recompiles"] == "0" for r in rows)


def test_bench_gpu_step_aborts_a_variant_past_the_hard_limit(capsys):
    import bench_gpu_step as bgs
    t0 = tg.time.perf_counter()
    assert bgs.main(["--tiny", "--steps", "100000", "--hard-s", "1.5"]) == 0
    assert tg.time.perf_counter() - t0 < 10
    out = capsys.readouterr().out
    rows, skipped, done = bench_step_rows(out)
    aborted = [x for x in out.splitlines() if x.startswith("bench_step:aborted")]
    assert rows == [] and len(aborted) == 1 and done["rows"] == "0" and done["skipped"] == "8"
    assert skipped == [f"skipped {bgs.label(m, lp, p, 0)} (a variant was aborted)"
                       for m in bgs.MODES for lp in (False, True) for p in (0, 2)][1:]
    assert aborted[0].startswith("bench_step:aborted compile_mode=default looping=0 loader_prefetch=0 muon_sharded=0 ")


def test_bench_gpu_step_kernel_variants_follow_the_default_mode(monkeypatch):
    """Where the Triton kernels can run, kernels=fused_mlp and kernels=fused_ce (prefetch 0, one each
    per looping) come after the default mode's plain variants and before the next mode; off CUDA,
    without the interpreter, there are none."""
    import bench_gpu_step as bgs
    h = tg.Hyperparameters.from_env(dict(bgs.TINY_ENV))
    rt = tg.setup_runtime("cpu", {})
    plain = [(m, lp, p, 0, "") for m in bgs.MODES for lp in (False, True) for p in (0, 2)]
    assert bgs.variants(h, rt) == plain
    assert bgs.variants(h, rt, True) == plain[:4] + [("default", lp, 0, 0, k) for k in ("fused_mlp", "fused_ce")
                                                     for lp in (False, True)] + plain[4:]
    assert bgs.label("default", True, 0, 0, "fused_ce") == \
        "compile_mode=default looping=1 loader_prefetch=0 muon_sharded=0 kernels=fused_ce"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not bgs.kernels_available(h, rt)


# ==============================================================================================
# tools plot logs

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


# ==============================================================================================
# tools sweep


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

