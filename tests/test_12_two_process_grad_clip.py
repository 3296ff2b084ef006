"""GRAD_CLIP_MODE (issue 19 finding 6): `averaged` clips the global norm of the gradient after the
cross-rank mean (#414 under DDP; our default), `local` clips each rank's own gradient before it is
averaged (#549 -> #1855; PRESET=frontier). Two gloo processes take one train_step with SGD (lr 1,
first step: the update is minus the gradient) on a toy model whose rank-1 gradient is far over the
clip and rank 0's far under it, so the two modes must give the updates an independent computation
predicts: mean of per-rank clips against clip of the mean. In one process both are bitwise equal.

    python3 -m pytest -q tests/test_12_two_process_grad_clip.py
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import train_gpt as tg
from conftest import ROOT, TESTS

CLIP = 0.5


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x, y):
        return ((self.lin(x) - y) ** 2).mean()


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: targets near the toy's outputs (gradient norm well under CLIP); rank 1: far off (well over)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(8, 4, generator=g)
    with torch.no_grad():
        y = Toy().lin(x)
    return x, y + (0.05 if rank == 0 else 20.0) * torch.randn(8, 3, generator=g)


class FixedLoader:
    def __init__(self, rank: int):
        self.batch = rank_batch(rank)

    def next_batch(self, seqs: int, seq_len: int):
        return self.batch


def one_step(mode: str, rt: tg.Runtime) -> list[float]:
    """The update of one train_step (parameters after minus before), flattened."""
    model = Toy()
    params = list(model.parameters())
    before = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt = torch.optim.SGD(params, lr=1.0)
    opt.param_groups[0]["base_lr"] = 1.0
    h = tg.Hyperparameters(grad_clip_norm=CLIP, grad_clip_mode=mode)
    tg.train_step(model, [opt], FixedLoader(rt.rank), h, rt, (1, 1), params, 1.0, 0)
    return (torch.cat([p.detach().reshape(-1) for p in params]) - before).tolist()


WORKER = """
import json, sys, train_gpt as tg
from test_12_two_process_grad_clip import one_step
rt = tg.setup_runtime("cpu")
print("RESULT " + json.dumps({m: one_step(m, rt) for m in ("averaged", "local")}))
from conftest import end_worker
end_worker(rt)
"""


def clipped(g: torch.Tensor) -> torch.Tensor:
    """torch's clip_grad_norm_ rule written out: scale by min(1, max_norm / (norm + 1e-6))."""
    return g * min(1.0, CLIP / (float(g.norm()) + 1e-6))


def local_grad(rank: int) -> torch.Tensor:
    model = Toy()
    grads = torch.autograd.grad(model(*rank_batch(rank)), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_local_is_mean_of_clips_averaged_is_clip_of_mean():
    g0, g1 = local_grad(0), local_grad(1)
    assert g0.norm() < CLIP / 4 and g1.norm() > 10 * CLIP  # the clip bites on rank 1 only
    expect = {"averaged": -clipped((g0 + g1) / 2), "local": -(clipped(g0) + clipped(g1)) / 2}
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    got = [json.loads(next(ln for ln in o[0].splitlines() if ln.startswith("RESULT "))[7:]) for o in outs]
    assert got[0] == got[1]  # both ranks apply the same update
    for mode in ("averaged", "local"):
        torch.testing.assert_close(torch.tensor(got[0][mode], dtype=torch.float64), expect[mode], rtol=1e-5, atol=1e-7)
    # the two modes differ by far more than that tolerance
    assert (expect["local"] - expect["averaged"]).norm() > 0.1 * CLIP
    assert torch.tensor(got[0]["local"]).sub(torch.tensor(got[0]["averaged"])).norm() > 0.1 * CLIP


def test_one_process_both_modes_are_bitwise_equal():
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    averaged, local = one_step("averaged", rt), one_step("local", rt)
    assert averaged == local
    torch.testing.assert_close(torch.tensor(local, dtype=torch.float64), -clipped(local_grad(0)), rtol=1e-5, atol=1e-7)
    rt1 = tg.Runtime(False, 1, 1, 0, torch.device("cpu"))  # rank 1's batch: the clip bites
    assert one_step("averaged", rt1) == one_step("local", rt1)
    torch.testing.assert_close(torch.tensor(one_step("local", rt1), dtype=torch.float64), -clipped(local_grad(1)),
                               rtol=1e-5, atol=1e-7)


def test_mode_is_validated_and_frontier_follows_the_record():
    with pytest.raises(tg.ConfigError, match=r"^GRAD_CLIP_MODE=mean: must be one of \('averaged', 'local'\)"):
        tg.Hyperparameters.from_env({"GRAD_CLIP_MODE": "mean"})
    assert tg.Hyperparameters().grad_clip_mode == "averaged"
    assert tg.Hyperparameters.from_env({"PRESET": "frontier"}).grad_clip_mode == "local"
    assert tg.Hyperparameters.from_env({"PRESET": "frontier", "GRAD_CLIP_MODE": "averaged"}).grad_clip_mode == "averaged"
