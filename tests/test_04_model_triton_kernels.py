"""The Triton kernels of FUSED_MLP_ENABLED / FUSED_CE_ENABLED (frontier.md 6.1, 6.2) against the eager
math, forward and backward, under Triton's CPU interpreter (TRITON_INTERPRET=1 must precede the
triton import, so the kernels run in one child process whose figures the tests check); and the
knobs' eager fallback off CUDA without the interpreter."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as tg

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Run in the child: each case prints max |kernel - eager| per output. Odd sizes, 16-wide blocks: every
# matmul dimension and the vocab end inside a partial block (masking).
CHILD = r'''
import dataclasses, json, torch, torch.nn.functional as F
import train_gpt as tg
torch.manual_seed(0)
out = {}

def diffs(a, b):
    return [float((x - y).abs().max()) for x, y in zip(a, b)]

for slope in (0.5, 0.0):
    x = torch.randn(2, 19, 24, dtype=torch.float64).float().requires_grad_()
    w_up = (0.3 * torch.randn(40, 24)).requires_grad_()
    w_down = (0.3 * torch.randn(24, 40)).requires_grad_()
    g = torch.randn(2, 19, 24)
    eager = F.linear(F.leaky_relu(F.linear(x, w_up), slope).square(), w_down)
    ref = [eager, *torch.autograd.grad(eager, (x, w_up, w_down), g)]
    fused = tg.FusedLeakyReLU2MLP.apply(x, w_up, w_down, slope, (16, 16, 16))
    got = [fused, *torch.autograd.grad(fused, (x, w_up, w_down), g)]
    out[f"mlp_{slope}"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

logits = (40 * torch.randn(7, 50)).requires_grad_()
targets = torch.tensor([0, 49, 17, 3, 48, 16, 31])
g = torch.rand(7)
ref_loss = F.cross_entropy(30 * torch.tanh(logits / 30), targets, reduction="none")
ref = [ref_loss, *torch.autograd.grad(ref_loss, logits, g)]
loss = tg.FusedSoftcapCE.apply(logits, targets, 30.0, 16)
got = [loss, *torch.autograd.grad(loss, logits, g)]
out["ce"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

def both(x, w_up, w_down, logits, targets):
    return (tg.FusedLeakyReLU2MLP.apply(x, w_up, w_down, 0.5, (16, 16, 16)).square().mean()
            + tg.FusedSoftcapCE.apply(logits, targets, 30.0, 16).mean())
args = (x, w_up, w_down, logits, targets)
ref = [both(*args), *torch.autograd.grad(both(*args), args[:4])]
compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
got = [compiled(*args), *torch.autograd.grad(compiled(*args), args[:4])]
out["compiled"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

h = dataclasses.replace(tg.Hyperparameters.from_env(dict(PRESET="tiny", VOCAB_SIZE="97")),
                        fused_mlp_enabled=True, fused_ce_enabled=True)
out["line"] = tg.select_train_kernels(h, "cpu")
model = tg.GPT(tg.ModelConfig.of(h))
for p in model.parameters():  # zero-init projections would hide the MLP's gradient paths
    torch.nn.init.normal_(p, std=0.05)
ids, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
eager = model(ids, tgt)
ref = [eager, *torch.autograd.grad(eager, list(model.parameters()))]
with tg.training_kernels(model):
    out["routed"] = [model.blocks[0].mlp.fused, model.fused_ce]
    fused = model(ids, tgt)
    got = [fused, *torch.autograd.grad(fused, list(model.parameters()))]
out["after"] = [model.blocks[0].mlp.fused, model.fused_ce]
out["model"] = dict(diff=[max(diffs(got[:1], ref[:1])), max(diffs(got[1:], ref[1:]))],
                    scale=[float(ref[0].abs()), max(float(r.abs().max()) for r in ref[1:])])
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def close(case: dict, rel: float = 1e-5):
    return all(d <= rel * max(s, 1.0) for d, s in zip(case["diff"], case["scale"]))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("slope", ["0.5", "0.0"])
def test_fused_mlp_forward_and_grads_match_eager(interpreted, slope):
    """out, dx, dW_up, dW_down of proj(leaky_relu(fc(x), slope)^2): f'(u) = 2u / 2 slope^2 u in the epilogue."""
    case = interpreted[f"mlp_{slope}"]
    assert close(case), case


@pytest.mark.slow
@needs_triton
def test_fused_softcap_ce_loss_and_grad_match_eager(interpreted):
    """Per-row CE of 30 tanh(x/30) (the kernel's 2C sigmoid(2x/C) shift form) and dL/dx, vocab 50 in blocks of 16."""
    assert close(interpreted["ce"]), interpreted["ce"]


@pytest.mark.slow
@needs_triton
def test_kernels_compile_fullgraph(interpreted):
    """torch.compile(fullgraph=True) takes both (custom ops inside autograd Functions): the compiled
    loss and its gradients equal the uncompiled kernels' (aot_eager: the interpreter has no Inductor path)."""
    assert interpreted["compiled"]["diff"] == [0.0] * 5, interpreted["compiled"]


@pytest.mark.slow
@needs_triton
def test_training_kernels_route_the_model_and_match_eager(interpreted):
    """Both knobs on (interpreter): the tiny model's mean loss and every parameter gradient match the
    eager forward; the kernels are in force only inside training_kernels."""
    assert interpreted["line"] == "train_kernels: mlp:triton ce:triton"
    assert interpreted["routed"] == [True, True] and interpreted["after"] == [False, False]
    assert close(interpreted["model"], 1e-4), interpreted["model"]


def test_knobs_on_cpu_without_interpreter_run_eager_and_bit_identical(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # FUSED_CE_ENABLED in the environment needs a frontier PRESET (record_line_problems); the field does not
    h = dataclasses.replace(tg.Hyperparameters.from_env(dict(PRESET="tiny", VOCAB_SIZE="97", FUSED_MLP_ENABLED="1")),
                            fused_ce_enabled=True)
    line = tg.select_train_kernels(h, "cpu")
    assert line.startswith("train_kernels: mlp:eager ce:eager (fallback: FUSED_*_ENABLED=1 but the cpu device is not CUDA")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(h))
    ids, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    off = model(ids, tgt)
    with tg.training_kernels(model):
        assert not model.blocks[0].mlp.fused and not model.fused_ce
        on = model(ids, tgt)
    assert torch.equal(on, off)
    assert tg.select_train_kernels(dataclasses.replace(h, fused_mlp_enabled=False, fused_ce_enabled=False),
                                   "cpu") == "train_kernels: mlp:eager ce:eager"


def test_knob_on_cuda_without_triton_logs_the_fallback(monkeypatch):
    """No CUDA call: select_train_kernels only reads the device type and whether the kernels build."""
    monkeypatch.setitem(tg._TRITON, "lib", None)  # as when `import triton` fails
    h = dataclasses.replace(tg.Hyperparameters.from_env({}), fused_mlp_enabled=True)
    assert tg.select_train_kernels(h, "cuda") == ("train_kernels: mlp:eager ce:eager (fallback: FUSED_*_ENABLED=1 "
                                                 "but triton is not importable; the eager path runs)")
    assert tg._TRAIN_KERNELS == {"mlp": False, "ce": False}


def test_the_fused_mlp_fits_the_cuda_limits_at_the_records_per_gpu_shape():
    """The GPU limits the fused MLP matmul could break (int32 offsets, gridDim.y), modelled from the
    frontier preset's per-GPU micro-batch: forward x @ W_up^T and the backward d_pre product."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    M, hidden = h.micro_batch_seqs * h.train_seq_len, int(h.mlp_mult * h.model_dim)
    assert (M, hidden, h.model_dim) == (98_304, 2048, 512)  # 48 x 2048 tokens per GPU, the record's shape
    assert tg.mlp_kernel_problems(M, hidden, h.model_dim) == []  # forward: (M,d) @ (d,hidden)
    assert tg.mlp_kernel_problems(M, hidden, h.model_dim) == tg.mlp_kernel_problems(M, hidden, hidden) == []
    # 11x the rows puts the (M, hidden) output past int32 offsets (8x still fits); a 4.2M-wide N past gridDim.y
    assert tg.mlp_kernel_problems(8 * M, hidden, h.model_dim) == []
    assert tg.mlp_kernel_problems(11 * M, hidden, h.model_dim) == ["the (M,N) output has 2,214,592,512 elements, "
                                                                   "over int32 offsets"]
    assert "over gridDim.y 65535" in tg.mlp_kernel_problems(1, 64 * 65_536, 1)[0]
