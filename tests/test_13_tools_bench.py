"""Keeps tests/tools/bench.py alive on CPU (tiny dims, one step) and checks its FLOP count against the
model's own matmul parameters.

    python3 -m pytest -q tests/test_13_tools_bench.py
"""

import re

import pytest
import torch

import bench
import train_gpt as tg
from conftest import tiny_env


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


def bench_step_rows(out: str) -> tuple[list[dict], list[str], dict]:
    """bench_gpu_step's measured rows (key=value dicts), its skipped rows and its done line."""
    lines = [line.removeprefix("bench_step:") for line in out.splitlines() if line.startswith("bench_step:")]
    kv = lambda text: dict(w.split("=", 1) for w in text.split() if "=" in w)  # noqa: E731
    rows = [kv(x) for x in lines if x.startswith("compile_mode=")]
    return rows, [x for x in lines if x.startswith("skipped ")], kv(lines[-1].removeprefix("done"))


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


@pytest.mark.slow
def test_bench_gpu_step_two_processes_add_muon_sharded_rows(tmp_path):
    """Under torchrun (2 gloo processes) every variant runs with MUON_SHARDED 0 and 1, rank 0 prints
    each row once, and both ranks skip and finish together (the run exits 0)."""
    import subprocess
    import sys
    from conftest import ROOT, script_env
    env = script_env({})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "tools" / "bench_gpu_step.py"), "--tiny", "--steps", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, skipped, done = bench_step_rows(proc.stdout)
    assert [(r["looping"], r["loader_prefetch"], r["muon_sharded"]) for r in rows] == \
        [(lp, p, s) for _ in range(2) for lp in ("0", "1") for p in ("0", "2") for s in ("0", "1")]
    assert not skipped and done["rows"] == "16" and "world_size=2" in proc.stdout
    assert all(float(r["ms_per_step"]) > 0 for r in rows)


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
