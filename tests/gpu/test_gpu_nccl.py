"""Two GPUs over NCCL against one GPU with gradient accumulation (skipped with fewer than 2 GPUs):
the same global batch (32 sequences: 2 ranks x 16, or 1 rank x 2 micro-steps of 16), so the same
training run up to the order of float sums and the kernels' own nondeterminism.

    python3 -m pytest -q tests/gpu/test_gpu_nccl.py
"""

import json
import re

import pytest
import torch

from conftest import run_script, tiny_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")


def run(tiny_data, cwd, nproc: int) -> tuple[str, dict]:
    env = tiny_env(tiny_data, RUN_ID=f"nccl{nproc}", DEVICE="cuda", COMPILE=-1, MICRO_BATCH_SEQS=16,
                   MODEL_DIM=128, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=16)  # head dim 64 for FlashAttention
    cwd.mkdir()
    proc = run_script(env, cwd, nproc=nproc, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (cwd / "logs" / f"nccl{nproc}.txt").read_text(), json.loads((cwd / "logs" / f"nccl{nproc}.json").read_text())


def test_two_gpus_equal_one_gpu_with_accumulation(tiny_data, tmp_path):
    log1, s1 = run(tiny_data, tmp_path / "one", 1)
    log2, s2 = run(tiny_data, tmp_path / "two", 2)
    assert "grad_accum_steps:2" in log1 and "grad_accum_steps:1" in log2 and "world_size:2 " in log2
    loss1, loss2 = (float(re.search(r"^step:1/\d+ train_loss:(\S+)", lg, re.M).group(1)) for lg in (log1, log2))
    assert abs(loss1 - loss2) <= 1.0001e-4  # same weights, same tokens: equal to the 4 printed decimals
    e1, e2 = s1["eval"], s2["eval"]
    print("1 vs 2 GPUs:", {p: (e1[p]["val_bpb"], e2[p]["val_bpb"]) for p in e1})
    for phase in e1:
        assert (e1[phase]["tokens"], e1[phase]["bytes"]) == (e2[phase]["tokens"], e2[phase]["bytes"])
        # bf16 and nondeterministic backward kernels (atomics in flash attention) over 40 steps
        assert e2[phase]["val_bpb"] == pytest.approx(e1[phase]["val_bpb"], abs=5e-3), phase
    assert s1["train"]["tokens"] == s2["train"]["tokens"]
