"""The compiled CUDA path (skipped without CUDA): `torch.compile(fullgraph=True, dynamic=False)`
with inductor, as the run does it, under the attention backend the run picks (FA3 when
importable: a kernel that dynamo cannot trace fails here, not 20 minutes into a paid run). One
graph for the training step, one for eval, no graph break, no recompile across steps, micro-steps,
sliding batches (the padded last one too) and TTT; compiled losses close to eager.

    python3 -m pytest -q tests/gpu/test_gpu_compile.py
"""

import pytest
import torch

import train_gpt as tg
from compiled_run import run_phases, small_hparams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Head dim 64: a size every FlashAttention build supports (FA3 has no head dim 16, the tiny preset's).
SHAPE = dict(DEVICE="cuda", MODEL_DIM=256, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=16, VE_DIM=32)


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_compiled_phases_one_graph_each_no_breaks_no_recompiles(backend, tiny_data):
    rt = tg.setup_runtime("cuda", {})
    name = tg.select_attention_backend(backend, "cuda")
    h = small_hparams(tiny_data, COMPILE=-1, **SHAPE)
    eager = run_phases(tg.dataclasses.replace(h, compile=0), rt, 3)
    comp = run_phases(h, rt, 3)
    g = comp.graphs
    print(f"backend {name}: graphs {g}; losses compiled {comp.losses} eager {eager.losses}; "
          f"ttt bpb {comp.ttt.val_bpb:.5f} vs {eager.ttt.val_bpb:.5f}")
    assert g["first_step"] == (1, 0) and g["train"] == g["first_step"]
    assert g["sliding"] == (2, 0) and g["ttt"] == g["sliding"]
    # bf16 on both sides; inductor keeps fused intermediates in fp32, eager rounds each op to bf16:
    # losses agree to about bf16's relative step (2^-8), not to fp32 rounding as on CPU.
    assert comp.losses == pytest.approx(eager.losses, rel=1e-2)
    assert comp.sliding[1:].tolist() == eager.sliding[1:].tolist()
    assert comp.sliding[0].item() == pytest.approx(eager.sliding[0].item(), rel=1e-2)
    assert comp.ttt.val_bpb == pytest.approx(eager.ttt.val_bpb, rel=1e-2)
