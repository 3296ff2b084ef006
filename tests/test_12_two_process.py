"""The 2-process gloo tests: gradient clipping, sharded Muon, GPTQ_SPLIT.

GRAD_CLIP_MODE (issue 19 finding 6): `averaged` clips the global norm of the gradient after the
cross-rank mean (#414 under DDP; our default), `local` clips each rank's own gradient before it is
averaged (#549 -> #1855; PRESET=frontier). Two gloo processes take one train_step with SGD (lr 1,
first step: the update is minus the gradient) on a toy model whose rank-1 gradient is far over the
clip and rank 0's far under it, so the two modes must give the updates an independent computation
predicts: mean of per-rank clips against clip of the mean. In one process both are bitwise equal.

MUON_SHARDED (issue 16, "What must work" 2): the Muon matrices' gradients bf16 reduce-scattered,
each rank orthogonalizing its cost-balanced share, the bf16 updates all-gathered. Two gloo processes
train a tiny model a few steps with MUON_SHARDED=1 and =0 (same batches, clipping active): the
parameters agree within the bf16 tolerance derived below, each rank orthogonalized exactly its
plan's matrices, every matrix once; one process is bitwise MUON_SHARDED=0; the plan's coverage and
balance on the frontier shapes; the knob.

GPTQ_SPLIT (issue 19, "What must work" 2): every rank GPTQs a cost-balanced share of the matrices,
rank 0 gathers them and writes the artifact. Two gloo processes write the same artifact bytes as
one process (through serialize, with LQER, SDClip, the int7 embedding GPTQ and the quant gate on),
each rank quantizing exactly its share; the assignment's balance on the full-size frontier shapes
(built on the meta device) against an independent count and the pigeonhole lower bound; the knob.

    python3 -m pytest -q tests/test_12_two_process.py -m "slow or not slow"
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train_gpt as tg
from conftest import ROOT, TESTS, end_worker
from helpers import bench_step_rows


# ==============================================================================================
# GRAD_CLIP_MODE: local and averaged clipping on 2 ranks

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
from test_12_two_process import one_step
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


# ==============================================================================================
# MUON_SHARDED: the sharded Muon update on 2 ranks


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


def seeded_model(h: tg.Hyperparameters) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(h))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized projections would leave gradients zero
    return model


def train(h: tg.Hyperparameters, rt: tg.Runtime, steps: int) -> tuple[dict[str, torch.Tensor], list[float], list[str]]:
    """`steps` training steps from the seeded model: (parameters, the global norms before clipping,
    the names of the matrices this rank orthogonalized in the first step)."""
    model = seeded_model(h)
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
        for step in range(steps):
            tg.train_step(model, opts, loader, h, rt, (SEQS, 1), params, 1.0, step)
            done.append("|")
    finally:
        tg.clip_grad_norm = clip
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, done[:done.index("|")]


def muon_sharded_worker(out: str):
    torch.set_num_threads(1)
    rt = tg.setup_runtime("cpu")
    results = {}
    for sharded, clip, steps in (("0", ENV["GRAD_CLIP_NORM"], STEPS), ("1", ENV["GRAD_CLIP_NORM"], STEPS), ("1", "0", 1)):
        h = tg.Hyperparameters.from_env({**ENV, "MUON_SHARDED": sharded, "GRAD_CLIP_NORM": clip})
        results[sharded, clip, steps] = train(h, rt, steps)
    torch.save(results, Path(out) / f"rank{rt.rank}.pt")
    end_worker(rt)


U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)


def newton_schulz_fp64(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The classic quintic iteration in float64: the exact orthogonalization newton_schulz approximates in bf16."""
    X = G.double()
    X = X / (X.norm() + 1e-7)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    a, b, c = tg.NS_COEFFS
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


def local_grads(h: tg.Hyperparameters) -> list[list[torch.Tensor]]:
    """Each rank's first-step gradient (its first batch at the seeded model), computed here."""
    model, out = seeded_model(h), []
    for r in range(2):
        model.zero_grad(set_to_none=True)
        x, y = RandomLoader(r, h.vocab_size).next_batch(SEQS, h.train_seq_len)
        model(x, y).backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
def test_two_gloo_processes_match_the_all_reduce_within_bf16(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "muon_sharded", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r),
                                   "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    clip = ENV["GRAD_CLIP_NORM"]
    h = tg.Hyperparameters.from_env({**ENV, "GRAD_CLIP_NORM": "0"})
    model = seeded_model(h)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    matrices = {id(p) for p in tg.param_groups(model)["matrix"]}
    is_matrix = [id(p) in matrices for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    # the update is applied identically on every rank
    for key in res[0]:
        assert all(torch.equal(res[0][key][0][n], res[1][key][0][n]) for n in names), key
    # (1) One step without clipping is, bitwise, today's optimizer step on the gradient as the bf16
    # reduce-scatter averages it: each rank's gradient rounded to bf16, the two summed in bf16, / 2.
    g0, g1 = local_grads(h)
    for p, a, b, m in zip(model.parameters(), g0, g1, is_matrix):
        p.grad = (a.bfloat16() + b.bfloat16()).float().div_(2) if m else (a + b).div_(2)
    opts = tg.build_optimizers(model, h, tg.Runtime(False, 0, 1, 0, torch.device("cpu")))
    opts[-1].param_groups[0]["momentum"] = tg.muon_momentum(0, h)
    for opt in opts:
        opt.step()
    one = res[0]["1", "0", 1][0]
    assert [n for n, p in model.named_parameters() if not torch.equal(p.detach(), one[n])] == []
    # (2) The bf16 tolerance. In exact arithmetic that rounding moves each matrix's update by at most
    # a few u: each element's error is <= u(2+u) (|g0| + |g1|)/2; through the orthogonalization of
    # these gradients (measured 0.3-0.8%) <= 4u. Today's bf16 Newton-Schulz is itself eps_ns (2.6-3.5%)
    # from the exact one, and any bf16-level change of its input redraws that rounding, so the two
    # updates, and after STEPS steps the two parameter trajectories, differ by about eps_ns (measured
    # 2.3-3.2% of the movement): the tolerance is 2 * eps_ns, relative to each parameter's movement.
    eps_ns = 0.0
    for a, b, m in zip(g0, g1, is_matrix):
        if m:
            exact = newton_schulz_fp64((a + b) / 2, h.muon_backend_steps)
            assert rel(newton_schulz_fp64((a.bfloat16() + b.bfloat16()).float() / 2, h.muon_backend_steps), exact) <= 4 * U
            eps_ns = max(eps_ns, rel(tg.newton_schulz((a + b) / 2, h.muon_backend_steps), exact))
    assert 0.01 < eps_ns < 0.05
    today, sharded = res[0]["0", clip, STEPS][0], res[0]["1", clip, STEPS][0]
    worst = max((rel(sharded[n] - init[n], today[n] - init[n]), n) for n in names)
    print(f"MUON_SHARDED=1 vs 0 after {STEPS} steps: worst relative movement difference {worst[0]:.2e} ({worst[1]}), "
          f"tolerance 2 * eps_ns = {2 * eps_ns:.2e}")
    assert worst[0] <= 2 * eps_ns
    # (3) Clipping (active: the norms exceed GRAD_CLIP_NORM) uses the global norm of the averaged
    # gradient: step 1's sharded norm is the exact norm of the bf16-averaged gradient, and within
    # the rounding's bound u(2+u) ||(|g0| + |g1|)/2|| (the Muon matrices') of today's norm.
    norms0, norms1 = res[0]["0", clip, STEPS][1], res[0]["1", clip, STEPS][1]
    assert min(norms0 + norms1) > float(clip) and len(norms1) == STEPS
    averaged = [((a.bfloat16() + b.bfloat16()).double() if m else (a + b).double()) / 2 for a, b, m in zip(g0, g1, is_matrix)]
    assert float(norms1[0]) == pytest.approx(torch.stack([g.norm() for g in averaged]).norm().item(), rel=1e-6)
    bound = U * (2 + U) * torch.stack([((a.abs() + b.abs()).double() / 2).norm()
                                       for a, b, m in zip(g0, g1, is_matrix) if m]).norm().item()
    assert abs(float(norms1[0]) - float(norms0[0])) <= bound
    # (4) each rank orthogonalized exactly its plan's share; the shares cover every matrix once
    params = list(model.parameters())
    matrix_names = [names[i] for i in range(len(names)) if is_matrix[i]]
    plan = tg.muon_shard_plan([tuple(params[names.index(n)].shape) for n in matrix_names], 2)
    done = [res[r]["1", clip, STEPS][2] for r in range(2)]
    for r in range(2):
        assert sorted(done[r]) == sorted(matrix_names[i] for _, _, owned in plan for i in owned[r])
    assert sorted(done[0] + done[1]) == sorted(matrix_names) and done[0] and done[1]
    # banks (64, 64) and (32, 64) of 6, (192, 64) and (64, 192) of 3: the plan gives each rank 9
    # matrices, where MUON_SHARDED=0's contiguous split gives rank 0 the first 2 of each bank of 3
    assert (len(done[0]), len(done[1])) == (9, 9)
    assert (len(res[0]["0", clip, STEPS][2]), len(res[1]["0", clip, STEPS][2])) == (10, 8)


def test_one_process_is_bitwise_muon_sharded_0():
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train(tg.Hyperparameters.from_env({**ENV, "MUON_SHARDED": v}), rt, 2) for v in ("0", "1")]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2] and len(runs[0][2]) == 18


def check_plan(shapes: list[tuple[int, int]], world: int):
    plan = tg.muon_shard_plan(shapes, world)
    assert plan == tg.muon_shard_plan(list(shapes), world)  # deterministic
    seen = sorted(i for _, _, owned in plan for o in owned for i in o)
    assert seen == list(range(len(shapes)))  # every matrix exactly once
    for shape, k, owned in plan:
        members = [i for o in owned for i in o]
        assert all(shapes[i] == shape for i in members) and len(owned) == world
        assert k == -(-len(members) // world) and max(map(len, owned)) <= k


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_covers_every_matrix_once(world):
    g = torch.Generator().manual_seed(world)
    sizes = [(64, 64), (32, 64), (192, 64), (64, 192), (16, 8)]
    shapes = [sizes[i] for i in torch.randint(0, len(sizes), (29,), generator=g).tolist()]
    check_plan(shapes, world)


def test_plan_balances_the_frontier_shapes():
    """The frontier's 66 matrices on 8 ranks: the slowest rank's Newton-Schulz cost (counted here:
    2 a^2 b + a^3, a <= b the sides) within 10% of the mean (measured 1.09x), where today's
    contiguous 1/W of every bank gives one rank 1.35x the mean."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "DATA_PATH": str(ROOT / "tests" / "data" / "sp8192"),
                                     "VOCAB_SIZE": "8192"})
    with torch.device("meta"):
        model = tg.GPT(tg.ModelConfig.of(h), torch.bfloat16)
    shapes = [tuple(p.shape) for p in tg.param_groups(model)["matrix"]]
    assert len(shapes) == 66
    check_plan(shapes, 8)

    def cost(s):
        a, b = sorted(s)
        return 2 * a * a * b + a ** 3
    loads, contiguous = [0] * 8, [0] * 8
    for shape, k, owned in tg.muon_shard_plan(shapes, 8):
        n = sum(map(len, owned))
        for r in range(8):
            loads[r] += len(owned[r]) * cost(shape)
            contiguous[r] += max(0, min(k, n - r * k)) * cost(shape)
    mean = sum(cost(s) for s in shapes) / 8
    assert sum(loads) == sum(contiguous) == 8 * mean
    assert max(loads) <= 1.1 * mean and max(contiguous) / mean == pytest.approx(1.35, abs=0.01)


def test_newton_schulz_compiled_only_when_sharded():
    """COMPILE with MUON_SHARDED on several ranks: Muon gets a compiled newton_schulz; otherwise the
    eager function itself (MUON_SHARDED=0 is today's code). The function traces as one graph
    (fullgraph, here with the aot_eager backend: no C++ build) and gives the eager bits."""
    two, one = tg.Runtime(True, 0, 2, 0, torch.device("cpu")), tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    env = {"PRESET": "tiny", "COMPILE": "1"}
    sharded = tg.Hyperparameters.from_env({**env, "MUON_SHARDED": "1"})
    assert tg.compiled_newton_schulz(sharded, two) is not tg.newton_schulz
    assert tg.compiled_newton_schulz(sharded, one) is tg.newton_schulz
    assert tg.compiled_newton_schulz(tg.Hyperparameters.from_env(env), two) is tg.newton_schulz
    assert tg.compiled_newton_schulz(tg.Hyperparameters.from_env({**env, "COMPILE": "0", "MUON_SHARDED": "1"}),
                                     two) is tg.newton_schulz
    G = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(0))
    traced = torch.compile(tg.newton_schulz, backend="aot_eager", fullgraph=True)
    assert torch.equal(traced(G, 5, coeffs="polar_express"), tg.newton_schulz(G, 5, coeffs="polar_express"))
    assert torch.equal(traced(G.mT, 5, coeffs="classic"), tg.newton_schulz(G.mT, 5, coeffs="classic"))


def test_knob():
    assert tg.Hyperparameters.from_env({"PRESET": "tiny"}).muon_sharded is False
    assert tg.Hyperparameters.from_env({"PRESET": "tiny", "MUON_SHARDED": "1"}).muon_sharded is True
    with pytest.raises(tg.ConfigError, match="^MUON_SHARDED='2': not a valid bool"):
        tg.Hyperparameters.from_env({"PRESET": "tiny", "MUON_SHARDED": "2"})


# ----------------------------------------------------------------------------------------------
# MUON_SHARDED in tests/tools/bench_gpu_step.py under torchrun (2 gloo processes)

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



# ==============================================================================================
# GPTQ_SPLIT: the GPTQ work split over the ranks


# frontier-like quantization on PRESET=tiny: every GPTQ'd kind and LQER (rank 0 alone) in the artifact
QUANT_ENV = {"PRESET": "tiny", "QUANT_CLIP": "sdclip", "QUANT_EMBED": "gptq", "EMBED_BITS": "7", "LQER_ENABLED": "1",
             "LQER_TOP_K": "3", "GATED_ATTN_QUANT_GATE": "1", "QUANT_COMPRESSOR": "zstd", "RUN_ID": "gptq_split"}


def model_and_hessians(h: tg.Hyperparameters) -> tuple[tg.GPT, dict]:
    """The same on every process: seeded weights and one X^T X per GPTQ'd matrix (one matrix left
    without a Hessian: identity, GPTQ-lite)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(h))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized projections would quantize to all zeros
    spec = tg.QuantSpec.of(h)
    names = [n for n, t in model.state_dict().items() if tg.quant_kind(n, t, spec) == "gptq"]
    g = torch.Generator().manual_seed(1)
    hessians = {}
    for name in names[1:]:
        cols = model.state_dict()[name].shape[1]
        X = torch.randn(4 * cols, cols, generator=g)
        hessians[name] = X.T @ X
    return model, hessians


def gptq_split_worker(out_dir: str):
    """One rank under RANK/WORLD_SIZE (gloo): serialize into out_dir/rank<r>, and list the matrices
    this rank GPTQ'd."""
    torch.set_num_threads(1)
    rt = tg.setup_runtime("cpu")
    h = tg.Hyperparameters.from_env({**QUANT_ENV, "GPTQ_SPLIT": os.environ.get("GPTQ_SPLIT", "1")})
    model, hessians = model_and_hessians(h)
    done, quantize = [], tg.gptq_tensor

    def recording(name, *args):
        done.append(name)
        return quantize(name, *args)
    tg.gptq_tensor = recording
    cwd = Path(out_dir) / f"rank{rt.rank}"
    cwd.mkdir(parents=True)
    os.chdir(cwd)
    tg.serialize(model, hessians, h, rt)
    (cwd / "gptq_names.txt").write_text("\n".join(done))
    end_worker(rt)


def test_two_gloo_processes_write_the_artifact_bytes_of_one(tmp_path, monkeypatch):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "gptq_split", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    # meanwhile, one process in this one
    h = tg.Hyperparameters.from_env(QUANT_ENV)
    model, hessians = model_and_hessians(h)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tg.serialize(model, hessians, h, tg.Runtime(False, 0, 1, 0, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "quant:gptq_split ranks:2 matrices:13 " in outs[0]  # 6 per layer on 2 layers + the embedding
    one = (tmp_path / tg.ARTIFACT_NAME).read_bytes()
    assert (tmp_path / "rank0" / tg.ARTIFACT_NAME).read_bytes() == one
    assert not (tmp_path / "rank1" / tg.ARTIFACT_NAME).exists()
    # each rank GPTQ'd exactly its share, and the shares cover every matrix once
    spec = tg.QuantSpec.of(h)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if tg.quant_kind(n, t, spec) == "gptq"}
    owner = tg.gptq_assignment(shapes, 2)
    done = [(tmp_path / f"rank{r}" / "gptq_names.txt").read_text().split("\n") for r in range(2)]
    assert [sorted(d) for d in done] == [sorted(n for n in shapes if owner[n] == r) for r in range(2)]
    assert done[0] and done[1]
    # and the artifact holds LQER factors (rank 0's, from the gathered GPTQ codes)
    assert "lqer:none" not in outs[0]


def frontier_shapes() -> tuple[dict[str, tuple[int, int]], tg.Hyperparameters]:
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "DATA_PATH": str(ROOT / "tests" / "data" / "sp8192"),
                                     "VOCAB_SIZE": "8192"})
    with torch.device("meta"):
        state = tg.GPT(tg.ModelConfig.of(h), torch.bfloat16).state_dict()
    spec = tg.QuantSpec.of(h)
    return {n: tuple(t.shape) for n, t in state.items() if tg.quant_kind(n, t, spec) == "gptq"}, h


@pytest.mark.parametrize("world", [2, 4, 8])
def test_assignment_balance_on_the_frontier_shapes(world):
    """Independent count: cost rows*cols^2 + cols^3 summed per rank from the returned owners. On 2 and
    4 ranks within 0.2% of the mean; on 8 ranks the 11 MLP down projections (512 x 2048, 16x the
    cost of a 512 x 512) cannot spread evenly, and the slowest rank equals the pigeonhole lower bound
    max(mean, c_8 + c_9) (costs sorted descending): the assignment is optimal, 1.244x the mean."""
    shapes, h = frontier_shapes()
    assert len(shapes) == 6 * 11 + 1 and shapes["tok_emb.weight"] == (8192, 512)
    owner = tg.gptq_assignment(shapes, world)
    assert set(owner) == set(shapes) and set(owner.values()) == set(range(world))
    cost = {n: r * c * c + c ** 3 for n, (r, c) in shapes.items()}
    loads = [sum(cost[n] for n in shapes if owner[n] == r) for r in range(world)]
    mean = sum(loads) / world
    costs = sorted(cost.values(), reverse=True)
    bound = max(mean, costs[world - 1] + costs[world])
    assert max(loads) == pytest.approx(bound, rel=2e-3)
    assert max(loads) / mean <= {2: 1.002, 4: 1.002, 8: 1.25}[world]
    assert tg.gptq_split_share(h, world) == pytest.approx(max(loads) / sum(loads))
    assert owner == tg.gptq_assignment(dict(reversed(list(shapes.items()))), world)  # order-free, deterministic


def test_default_model_splits_exactly_in_two():
    """tests/test_11_drivers.py's hand computation halves GPTQ_S on 2 ranks: exact for the default model."""
    h = tg.Hyperparameters()
    assert tg.gptq_split_share(h, 2) == 0.5
    assert tg.gptq_split_share(h, 1) == 1.0 == tg.gptq_split_share(tg.dataclasses.replace(h, gptq_split=False), 8)


def test_gptq_split_knob():
    assert tg.Hyperparameters.from_env({}).gptq_split is True
    assert tg.Hyperparameters.from_env({"GPTQ_SPLIT": "0"}).gptq_split is False
    with pytest.raises(tg.ConfigError, match=r"^GPTQ_SPLIT='2': not a valid bool \(expected 0 or 1\)$"):
        tg.Hyperparameters.from_env({"GPTQ_SPLIT": "2"})


if __name__ == "__main__":  # a rank spawned by a test above: python3 <this file> <worker> <dir>
    {"muon_sharded": muon_sharded_worker, "gptq_split": gptq_split_worker}[sys.argv[1]](sys.argv[2])
