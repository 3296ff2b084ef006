"""MUON_SHARDED (issue 16, "What must work" 2): the Muon matrices' gradients bf16 reduce-scattered,
each rank orthogonalizing its cost-balanced share, the bf16 updates all-gathered. Two gloo processes
train a tiny model a few steps with MUON_SHARDED=1 and =0 (same batches, clipping active): the
parameters agree within the bf16 tolerance derived below, each rank orthogonalized exactly its
plan's matrices, every matrix once; one process is bitwise MUON_SHARDED=0; the plan's coverage and
balance on the frontier shapes; the knob.

    python3 -m pytest -q tests/test_muon_sharded.py
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg

ROOT = Path(__file__).resolve().parent.parent
# 3 layers: banks of 3 matrices on 2 ranks, so each bank has a padded slot and a short chunk
ENV = {"PRESET": "tiny", "NUM_LAYERS": "3", "XSA_LAST_N": "3", "VE_LAYERS": "0", "GRAD_CLIP_NORM": "0.05",
       "MATRIX_LR": "0.02", "RUN_ID": "muon_sharded"}
STEPS, SEQS = 4, 4


class RandomLoader:
    """Random tokens, different on every rank and every call, the same in every run."""

    def __init__(self, rank: int, vocab: int):
        self.rank, self.vocab, self.calls = rank, vocab, 0

    def next_batch(self, seqs: int, seq_len: int):
        g = torch.Generator().manual_seed(1000 * self.rank + self.calls)
        self.calls += 1
        t = torch.randint(0, self.vocab, (seqs, seq_len + 1), generator=g)
        return t[:, :-1], t[:, 1:]


def train(h: tg.Hyperparameters, rt: tg.Runtime) -> tuple[dict[str, torch.Tensor], list[float], list[str]]:
    """STEPS training steps from a seeded model: (parameters, the clipped global norms, the names of
    the matrices this rank orthogonalized in the first step)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.model_config(h))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized projections would leave gradients zero
    names = {id(p): n for n, p in model.named_parameters()}
    opts = tg.build_optimizers(model, h, rt)
    muon, norms, done = opts[-1], [], []
    update = muon._bank_update
    muon._bank_update = lambda mine, *a: (done.extend(names[id(p)] for p in mine), update(mine, *a))[1]
    clip = tg.clip_grad_norm

    def recording(params, max_norm, m, rt):
        norms.append(clip(params, max_norm, m, rt))
    tg.clip_grad_norm = recording
    try:
        loader, params = RandomLoader(rt.rank, h.vocab_size), list(model.parameters())
        for step in range(STEPS):
            tg.train_step(model, opts, loader, h, rt, (SEQS, 1), params, 1.0, step)
            done.append("|")
    finally:
        tg.clip_grad_norm = clip
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, done[:done.index("|")]


def worker(out: str):
    torch.set_num_threads(1)
    rt = tg.setup_runtime("cpu")
    results = {}
    for sharded in ("0", "1"):
        h = tg.Hyperparameters.from_env({**ENV, "MUON_SHARDED": sharded})
        results[sharded] = train(h, rt)
    torch.save(results, Path(out) / f"rank{rt.rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    worker(sys.argv[1])
