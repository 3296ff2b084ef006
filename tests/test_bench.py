"""Keeps tests/bench.py alive on CPU (tiny dims, one step) and checks its FLOP count against the
model's own matmul parameters.

    python3 -m pytest -q tests/test_bench.py
"""

import bench
import train_gpt as tg
from conftest import tiny_env


def test_flops_per_token_counts_every_matmul(hparams):
    cfg = tg.model_config(hparams)
    model = tg.GPT(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
    matmul += model.tok_emb.weight.numel()  # the tied head is a matmul; the lookups are not
    attention = 6 * cfg["num_layers"] * cfg["model_dim"] * hparams.train_seq_len
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
