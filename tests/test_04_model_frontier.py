"""The frontier architecture options (frontier.md section 2, issue 9): each off gives the seed
model bit for bit, each on against an independent computation, the recurrence index table, the
parameter count of the 1.0611 record, the optimizer/quantizer routing of the new parameters,
document isolation (flip test across documents, with teeth), and bad settings.

In-process and CPU-only, about 15 s:
    python3 -m pytest -q tests/test_04_model_frontier.py
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY_DATA_VOCAB
from helpers import frontier_param_count

BOS = 1
# PRESET=frontier at tiny dims: 5 layers, loop 1-2 once more, parallel lanes from layer 3.
TINY_FRONTIER = dict(PRESET="frontier", VOCAB_SIZE="512", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4",
                     NUM_KV_HEADS="2", ROPE_DIMS="8", XSA_LAST_N="5", GATE_WINDOW="8", LOOP_START="1", LOOP_END="2",
                     NUM_LOOPS="1", PARALLEL_START_LAYER="3", BOS_ID=str(BOS), EVAL_SEQ_LEN="64", EVAL_STRIDE="16",
                     EVAL_BATCH_SEQS="4", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", DEVICE="cpu", COMPILE="0")


def hp(**env) -> tg.Hyperparameters:
    if env.get("PRESET") == "tiny":  # the pinned numbers below are at the tiny dataset's vocab
        env = {"VOCAB_SIZE": TINY_DATA_VOCAB, **env}
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


def noisy(h: tg.Hyperparameters, seed: int = 1, scale: float = 0.1) -> tg.GPT:
    """The model of h with noise on every parameter: zero-initialised projections and gates
    would otherwise hide most of what the options do."""
    torch.manual_seed(seed)
    m = tg.GPT(tg.ModelConfig.of(h))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def doc_stream(n_docs: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """BOS-delimited documents of 3-30 random non-BOS tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        out += [BOS] + rng.integers(4, vocab, rng.integers(3, 31)).tolist()
    return torch.tensor(out)


# ----------------------------------------------------------------------------------------------
# Every option off: the seed model, bit for bit


def test_options_off_reproduce_the_seed_model():
    """Per-token NLL sum of a noisy 5-layer tiny seed model (bigram, VE, XSA, old SmearGate), as
    computed by the code before the frontier options (commit e14a097) with this same recipe."""
    h = hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4")
    torch.manual_seed(1234)
    m = tg.GPT(tg.ModelConfig.of(h))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, h.vocab_size, (3, 40))
    ids[:, 7] = BOS
    nll = m(ids[:, :-1], ids[:, 1:], reduction="none")
    # Bitwise equal on this machine (sha256 of the NLL bytes matched); the tolerance only allows
    # for another BLAS.
    assert nll.double().sum().item() == pytest.approx(738.6921968460083, rel=1e-6)
    names = [n for n, _ in m.named_parameters()]
    assert not any(k in n for n in names for k in ("skip_gates", "parallel_", "smear.", "attn_gate_w"))
    assert tuple(m.skip_weights.shape) == (2, 64) and "smear_gate" in names


def test_looped_model_with_looping_off_is_the_plain_model():
    """NUM_LOOPS>0 before the switch-on runs exactly the plain layer sequence."""
    plain = noisy(hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4"))
    looped = tg.GPT(tg.ModelConfig.of(hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4", NUM_LOOPS=2,
                                       LOOP_START=1, LOOP_END=2)))
    state = dict(plain.state_dict())
    state["skip_weights"] = torch.cat((state["skip_weights"], looped.skip_weights[2:].detach()))
    looped.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 24))
    looped.looping = False
    assert torch.equal(looped.forward_hidden(ids), plain.forward_hidden(ids))
    looped.looping = True
    assert not torch.allclose(looped.forward_hidden(ids), plain.forward_hidden(ids))


# ----------------------------------------------------------------------------------------------
# Depth recurrence


def test_recurrence_index_table_of_the_final_record():
    """frontier.md 2.3: 11 layers, loop 3-5, NUM_LOOPS=2 -> 17 virtual layers."""
    order = tg.loop_layer_order(11, 3, 5, 2)
    assert order[:len(order) // 2] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert order[len(order) // 2:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    m = tg.GPT(tg.ModelConfig.of(hp(PRESET="frontier", BOS_ID=1, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2,
                                  ROPE_DIMS=8, VOCAB_SIZE=64, MLP_MULT=1)))
    assert m.loop_order == order and m.plain_order == list(range(11))
    assert m.skip_weights.shape[0] == 8 and m.looping  # min(8 encoder, 9 decoder); built looped (eval)


def test_switch_on_by_fraction_of_the_budget():
    m = tg.GPT(tg.ModelConfig.of(hp(PRESET="tiny", NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, ITERATIONS=100,
                                  ENABLE_LOOPING_AT=0.35)))
    h = hp(PRESET="tiny", NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, ITERATIONS=100, ENABLE_LOOPING_AT=0.35)
    uncapped, capped = tg.Schedule(h), tg.Schedule(dataclasses.replace(h, max_wallclock_seconds=10.0,
                                                                        gptq_reserve_seconds=0.0))
    assert (uncapped.cap_ms, capped.cap_ms) == (0.0, 10_000.0)
    m.looping = False
    uncapped.update_looping(m, 34, 1e9)  # no cap: steps count, 34/100 < 0.35
    assert not m.looping
    uncapped.update_looping(m, 35, 0.0)
    assert m.looping
    m.looping = False
    capped.update_looping(m, 1, 3400.0)  # capped: the wall clock counts, not the step
    assert not m.looping
    capped.update_looping(m, 1, 3500.0)
    assert m.looping


def test_compiled_model_follows_the_looping_switch():
    """torch.compile guards on `looping`: one graph per mode, each equal to eager."""
    m = noisy(hp(**TINY_FRONTIER))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    ids = doc_stream(6, 512)[None, :40]
    for looping in (False, True, False):
        m.looping = looping
        with torch.no_grad():
            assert torch.equal(compiled.forward_hidden(ids), m.forward_hidden(ids))


def test_hessians_accumulate_over_every_pass():
    m = noisy(hp(**TINY_FRONTIER))
    ids = doc_stream(8, 512)[None, :48]
    seen = []
    hook = m.blocks[1].attn.c_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        m.forward_hidden(ids)
    hook.remove()
    assert len(seen) == 2  # layer 1 runs twice with NUM_LOOPS=1
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    H = tg.collect_hessians(m, [(ids, None)], rt)
    expected = sum(x.reshape(-1, x.size(-1)).T @ x.reshape(-1, x.size(-1)) for x in seen)
    torch.testing.assert_close(H["blocks.1.attn.c_q.weight"], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The units against independent computations


def test_window_smear_gate_formula_and_bos_fix():
    h = hp(**TINY_FRONTIER)
    gate = tg.WindowSmearGate(tg.ModelConfig.of(h))
    e = torch.randn(2, 10, 64)
    ids = torch.randint(4, 512, (2, 10))
    ids[0, 4] = ids[1, 0] = BOS
    assert torch.equal(gate(e, ids), e)  # zero init: the identity
    with torch.no_grad():
        gate.gate_w.normal_()
        gate.lam.fill_(0.7)
    out = gate(e, ids)
    for b in range(2):
        for t in range(10):
            want = e[b, t].clone()
            if t > 0 and ids[b, t] != BOS:
                want += 0.7 * torch.sigmoid(e[b, t, :8] @ gate.gate_w[0]) * e[b, t - 1]
            torch.testing.assert_close(out[b, t], want)
    assert torch.equal(out[0, 4], e[0, 4])  # BOS takes nothing from the previous document


def test_sparse_attention_gate_scales_each_head():
    h = hp(**TINY_FRONTIER)
    on = tg.Attention(tg.ModelConfig.of(h), xsa=True)
    off = tg.Attention(tg.ModelConfig.of(dataclasses.replace(h, sparse_attn_gate_enabled=False)), xsa=True)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "attn_gate_w"})
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        on.proj.weight.copy_(torch.eye(64))
        off.proj.weight.copy_(torch.eye(64))
        torch.testing.assert_close(on(x, None), 0.5 * off(x, None))  # zero init: every gate 0.5
        on.attn_gate_w.normal_()
        g = torch.sigmoid(0.5 * x[..., :8] @ on.attn_gate_w.T)  # (B,T,H), SPARSE_ATTN_GATE_SCALE=0.5
        want = (off(x, None).view(2, 12, 4, 16) * g[..., None]).view(2, 12, 64)
        torch.testing.assert_close(on(x, None), want)


def test_gated_skip_is_a_lerp_from_the_skip_to_x():
    m = noisy(hp(**TINY_FRONTIER))
    x, skip = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    s = torch.sigmoid(m.skip_gates[1])
    torch.testing.assert_close(m.add_skip(x, 1, skip), s * x + (1 - s) * m.skip_weights[1] * skip)


def test_parallel_block_against_form_d():
    m = noisy(hp(**TINY_FRONTIER))
    blk, i = m.blocks[3], 3
    lane0, lane1, x0 = torch.randn(3, 1, 6, 64).unbind(0)
    out0, out1 = blk.forward_parallel((lane0, lane1), x0, None, None, m.parallel_resid_lambdas[i],
                                      m.parallel_post_lambdas[i])
    mix, s = blk.resid_mix, blk.norm_scale
    a = blk.attn_scale * blk.attn(F.rms_norm(mix[0] * lane0 + mix[1] * x0, (64,)) * s, None)
    mm = blk.mlp_scale * blk.mlp(F.rms_norm(lane1, (64,)) * s)
    r, P = m.parallel_resid_lambdas[i], m.parallel_post_lambdas[i]
    torch.testing.assert_close(out0, r[0] * lane0 + P[0, 0] * a + P[1, 0] * mm)
    torch.testing.assert_close(out1, r[1] * lane1 + P[0, 1] * a + P[1, 1] * mm)


def test_document_masked_attention_equals_each_document_alone():
    """The masked SDPA path gives each document the hidden states it gets when run on its own
    (RoPE is relative, so the absolute offset in the packed row does not matter)."""
    m = noisy(hp(**TINY_FRONTIER))
    stream = doc_stream(4, 512)
    starts = (stream == BOS).nonzero().flatten().tolist() + [len(stream)]
    with torch.no_grad():
        packed = m.forward_hidden(stream[None])[0]
        for a, b in zip(starts[:-1], starts[1:]):
            torch.testing.assert_close(packed[a:b], m.forward_hidden(stream[None, a:b])[0], rtol=1e-4, atol=1e-4)


def reference_varlen(calls: list):
    """A stand-in for FA3's varlen call: causal attention per cu_seqlens segment; records cu_q."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        calls.append(cu_q)
        out = torch.zeros_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if b > a:
                out[a:b] = tg.causal_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
        return out
    return varlen


def test_varlen_path_gets_cu_seqlens_at_every_bos_and_row_start(monkeypatch):
    """The FA3 branch, with a reference varlen function: segments cut at BOS and row starts,
    padded with empty segments to a static size, give the masked path's numbers."""
    calls = []
    varlen = reference_varlen(calls)
    m = noisy(hp(**TINY_FRONTIER))
    ids = doc_stream(5, 512)[:60].view(2, 30)
    with torch.no_grad():
        masked = m.forward_hidden(ids)
        monkeypatch.setitem(tg._ATTENTION, "varlen", varlen)
        got = m.forward_hidden(ids)
    starts = sorted({0, 30} | {int(p) for p in (ids.flatten() == BOS).nonzero()})
    cu = calls[0].tolist()
    assert calls[0].dtype == torch.int32 and len(cu) == 61
    assert cu[:len(starts)] == starts and set(cu[len(starts):]) == {60}
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Flip test across documents: change a token of document k, no other document's NLL moves


def _doc_losses(model, val, h, rt):
    losses = tg.TokenLosses(val.stream_len, rt.device)
    tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_stride, losses)
    return losses.nll.numpy().copy()


@pytest.mark.parametrize("doc_masking,smear_bos_fix", [(True, True), (False, True), (True, False)])
def test_flip_a_token_of_one_document_leaves_every_other_document_bit_identical(doc_masking, smear_bos_fix):
    """Sliding-window eval (the TOKEN_LOSSES_DIR numbers) with looping, lanes, SmearGate and
    gates on. Target t belongs to the document of its input token t-1. Without document masking,
    or without the SmearGate's BOS fix, later documents' NLLs move: the test has teeth."""
    h = dataclasses.replace(hp(**TINY_FRONTIER), doc_masking=doc_masking)
    model = noisy(h, scale=0.2)
    if not smear_bos_fix:
        model.smear.bos_id = -1  # no token is BOS for the gate: #1667's leak
    isolated = doc_masking and smear_bos_fix
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    stream = doc_stream(14, h.vocab_size, seed=3)
    n = (len(stream) - 1) // h.eval_seq_len * h.eval_seq_len + 1
    stream = stream[:n]
    V = h.vocab_size
    val = tg.ValidationData(stream, n, torch.ones(V, dtype=torch.int64), torch.zeros(V, dtype=torch.bool),
                            torch.zeros(V, dtype=torch.bool))
    doc_of_input = torch.cumsum(stream == BOS, 0).numpy()  # document id of each position
    base = _doc_losses(model, val, h, rt)
    k = int(doc_of_input[n // 2])
    positions = np.flatnonzero((doc_of_input == k) & (stream.numpy() != BOS))
    other = np.ones(n, dtype=bool)
    other[0] = False  # target 0 is never scored
    other[1:] = doc_of_input[:-1] != k
    changed_elsewhere = False
    for t in positions[[0, len(positions) // 2, -1]]:  # first, middle and last token of document k
        tokens = stream.clone()
        tokens[t] = 4 + (tokens[t] - 3) % (V - 4)  # another non-BOS token
        flipped = _doc_losses(model, dataclasses.replace(val, tokens=tokens), h, rt)
        assert flipped[t] != base[t] or t == positions[0]  # its own document sees the change
        same = flipped[other].tobytes() == base[other].tobytes()
        changed_elsewhere |= not same
        if isolated:
            assert same, f"flipping token {t} of document {k} moved another document's NLL"
    assert changed_elsewhere != isolated


# ----------------------------------------------------------------------------------------------
# Parameter count and routing


def test_frontier_preset_has_the_records_35945671_parameters(monkeypatch):
    monkeypatch.setattr(tg.nn.init, "orthogonal_", lambda w, *a, **k: w)  # shapes only: skip the slow QR
    h = hp(PRESET="frontier", BOS_ID=1)
    m = tg.GPT(tg.ModelConfig.of(h))
    count = sum(p.numel() for p in m.parameters())
    assert count == frontier_param_count(8192, 11, 512, 8, 4, 4.0, 12, 17) == 35_945_671
    groups = tg.param_groups(m)
    assert sum(p.numel() for p in groups["matrix"]) == 31_719_424
    assert sum(p.numel() for p in groups["embed"]) == 4_194_304
    assert sum(p.numel() for p in groups["scalar"]) == 23_672 + 8_192 + 66 + 13


def test_tiny_frontier_count_and_routing():
    h = hp(**TINY_FRONTIER)
    m = tg.GPT(tg.ModelConfig.of(h))
    assert sum(p.numel() for p in m.parameters()) == frontier_param_count(512, 5, 64, 4, 2, 4.0, 8, 7)
    groups = {id(p): g for g, ps in tg.param_groups(m).items() for p in ps}
    names = dict(m.named_parameters())
    for n in ("skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas", "smear.gate_w", "smear.lam",
              "blocks.0.attn.attn_gate_w"):
        assert groups[id(names[n])] == "scalar", n
    int6 = {n for n, p in names.items() if tg.is_int6_matrix(n, p)}
    assert int6 == {f"blocks.{i}.{k}.weight" for i in range(5)
                    for k in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}


# ----------------------------------------------------------------------------------------------
# Bad settings


@pytest.mark.parametrize("env,var", [
    (dict(NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, NUM_LAYERS=2), "LOOP_END"),
    (dict(NUM_LOOPS=1, LOOP_START=2, LOOP_END=1), "LOOP_START"),
    (dict(NUM_LOOPS=-1), "NUM_LOOPS"),
    (dict(ENABLE_LOOPING_AT=1.5), "ENABLE_LOOPING_AT"),
    (dict(PARALLEL_START_LAYER=2), "PARALLEL_START_LAYER"),
    (dict(PARALLEL_FINAL_LANE="sum"), "PARALLEL_FINAL_LANE"),
    (dict(GATE_WINDOW=65), "GATE_WINDOW"),
    (dict(SPARSE_ATTN_GATE_INIT_STD=-1), "SPARSE_ATTN_GATE_INIT_STD"),
    (dict(SKIP_GATES_ENABLED="yes"), "SKIP_GATES_ENABLED"),
])
def test_bad_frontier_settings_name_the_variable(env, var):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        hp(PRESET="tiny", **env)


def test_tokenizer_without_bos_is_refused_when_documents_matter():
    class NoBos:
        def bos_id(self):
            return -1
    h = hp(PRESET="tiny", DOC_MASKING=1)
    with pytest.raises(tg.ConfigError, match="^BOS_ID=-1"):
        tg.resolve_bos_id(h, NoBos())
    assert tg.resolve_bos_id(hp(PRESET="tiny"), NoBos()).bos_id == -1
    assert tg.resolve_bos_id(copy.copy(h), type("Sp", (), {"bos_id": lambda self: 1})()).bos_id == 1
