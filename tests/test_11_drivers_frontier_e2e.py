"""PRESET=frontier end to end at tiny dims (env overrides on top of the preset): every phase on
CPU, looping switched on mid-run and kept for calibration, eval and TTT; 1 and 2 processes
agree (bad frontier settings: tests/test_14_errors.py).

    python3 -m pytest -q tests/test_11_drivers_frontier_e2e.py -m "slow or not slow" # about 40 s idle
"""

import json
import re

import pytest

import train_gpt as tg
from conftest import run_script
from helpers import ITERATIONS, frontier_env, frontier_param_count

@pytest.fixture(scope="module")
def frontier_run(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("frontier")
    env = frontier_env(tiny_data)
    proc = run_script(env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, env, (cwd / "logs" / "frontier.txt").read_text()


@pytest.mark.slow
def test_frontier_preset_runs_every_phase(frontier_run):
    cwd, env, log = frontier_run
    assert f"model_params:{frontier_param_count(512, 5, 64, 4, 2, 4.0, 8, 7)} " in log
    assert "bos_id:1 doc_masking:1" in log
    assert "warmup_step:1/1 looping:0" in log and "warmup_step:1/1 looping:1" in log  # both graphs
    switch = re.search(r"loop:on step:(\d+) budget_used:([\d.]+) layers:0,1,2,1,2,3,4", log)
    assert switch and int(switch.group(1)) == 5  # first step with step/ITERATIONS >= 0.35
    assert "hparam:smear_gate_enabled=True" in log and "hparam:sparse_attn_gate_scale=0.5" in log
    summary = json.loads((cwd / "logs" / "frontier.json").read_text())
    assert summary["compliance"]["ok"] and set(summary["eval"]) == {"prequant", "roundtrip", "doc", "ttt"}
    assert summary["eval"]["roundtrip"]["val_bpb"] < 8.0  # below uniform over 512 tokens per ~2.4 bytes
    cfg, _ = tg.unpack_artifact((cwd / tg.ARTIFACT_NAME).read_bytes())
    model = tg.GPT(cfg)
    assert cfg.bos_id == 1 and cfg.doc_masking and model.looping  # the artifact reloads looped


@pytest.mark.slow
def test_frontier_two_processes_match_one(frontier_run, tmp_path):
    cwd, env, log = frontier_run
    # GRAD_CLIP_MODE=local (the preset's, the record's) clips each rank's gradient: on 2 ranks that is
    # another update than 1 process's, by design. averaged on 2 ranks is what local is on 1.
    proc = run_script(dict(env, RUN_ID="frontier2", GRAD_CLIP_MODE="averaged"), tmp_path, nproc=2)
    two = (tmp_path / "logs" / "frontier2.txt").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size:2 " in two

    def exact(text, label):
        return float(re.search(label + r"_exact val_loss:[\d.]+ val_bpb:([\d.]+)", text).group(1))
    loss = [re.search(rf"step:{ITERATIONS}/{ITERATIONS} train_loss:([\d.]+)", t).group(1) for t in (log, two)]
    assert abs(float(loss[0]) - float(loss[1])) <= 1.0001e-4  # same global batch, float sum order aside
    assert exact(two, "prequant_ema") == pytest.approx(exact(log, "prequant_ema"), abs=1e-5)
