"""Batched per-document LoRA TTT and phased global TTT (frontier.md 5.3-5.5; issue 11): one forward
for plain and adapted scoring (zero adapters are bit-identical to the plain model, for every model
option set), every adapter live, adapters per virtual slot (TTT_LORA_PER_SLOT=1: pass j of a looped
layer uses slot j; 0 is the pre-change shared adapter bit for bit), the per-document flip test (rule
A2) with warm-start A, global phases and per-slot adapters, a step-before-score variant that the
flip test catches, the planners on a virtual clock with a slow first chunk/batch, and bad input.

CPU only, about half a minute:
    python3 -m pytest -q tests/test_09_evaluate_lora_ttt.py
"""

import collections
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from doc_streams import BOS, C, L, doc_env, doc_stream, make_val, noisy_model, run_doc


@pytest.fixture
def h(tiny_data) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env(doc_env(tiny_data))


# ----------------------------------------------------------------------------------------------
# One forward: adapters are a delta inside the real modules

# Model option sets of the current architecture; add each new model option here (issue 11 item 4).
MODEL_OPTIONS = {
    "record": {},
    "no_bigram_no_ve": dict(bigram_vocab_size=0, ve_layers=""),
    "no_xsa_no_lnscale": dict(xsa_last_n=0, ln_scale=False),
    "gqa1_relu2": dict(num_kv_heads=1, negative_slope=0.0),
    # the frontier options (issue 9), one at a time and all together (BOS_ID = the streams' BOS)
    "mlp4_skip_gates": dict(mlp_mult=4.0, skip_gates_enabled=True),
    "loops": dict(num_layers=4, xsa_last_n=4, ve_layers="2,3", num_loops=2, loop_start=1, loop_end=2),
    "parallel": dict(num_layers=4, xsa_last_n=4, ve_layers="2,3", parallel_start_layer=2),
    "doc_masking_smear": dict(doc_masking=True, smear_gate_enabled=True, gate_window=8, bos_id=BOS),
    "sparse_attn_gate": dict(sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, gate_window=8),
    "frontier_all": dict(num_layers=4, xsa_last_n=4, ve_layers="", bigram_vocab_size=0, mlp_mult=4.0,
                         skip_gates_enabled=True, num_loops=2, loop_start=1, loop_end=2, parallel_start_layer=2,
                         doc_masking=True, smear_gate_enabled=True, gate_window=8, bos_id=BOS,
                         sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5),
}


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared", "per_slot"])
@pytest.mark.parametrize("options", list(MODEL_OPTIONS.values()), ids=list(MODEL_OPTIONS))
def test_zero_adapters_give_bit_identical_nll(options, per_slot, h):
    """B = 0 in every adapter (Q, K, V, O, MLP, head; A random): the adapted forward is the plain
    forward bit for bit; any non-zero B moves the NLL, so every adapter is on the live path, and
    with TTT_LORA_PER_SLOT=1 so is every slot of it."""
    h = dataclasses.replace(h, ttt_lora_per_slot=per_slot, **options)
    model = noisy_model(h)
    ids = torch.randint(0, h.vocab_size, (h.ttt_batch_size, 2 * L + 1), generator=torch.Generator().manual_seed(3))
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        plain = model(x, y, reduction="none")
        adapters = tg.attach_lora(model, h, torch.Generator().manual_seed(0), torch.device("cpu"))
        assert len(adapters) == 1 + 5 * h.num_layers
        zero = model(x, y, reduction="none")
        assert zero.numpy().tobytes() == plain.numpy().tobytes()
        assert model(x[:2], y[:2], reduction="none").numpy().tobytes() == plain[:2].numpy().tobytes()
        for a in adapters:
            a.B.normal_(0, 0.05)
            assert not torch.equal(model(x, y, reduction="none"), plain)
            a.B.zero_()
            for s in range(a.slots):
                a.B[s].normal_(0, 0.05)
                assert not torch.equal(model(x, y, reduction="none"), plain), s
                a.B.zero_()
    tg.detach_lora(model)
    assert all(m.lora is None for m in model.modules() if hasattr(m, "lora"))
    assert set(model.state_dict()) == set(noisy_model(h).state_dict())  # adapters never enter the state


def test_lora_knobs_choose_the_adapters(h):
    model = noisy_model(h)
    full = tg.lora_hosts(model, h)
    qv_head = tg.lora_hosts(model, dataclasses.replace(h, ttt_k_lora=False, ttt_o_lora=False, ttt_mlp_lora=False))
    assert len(full) == 1 + 5 * h.num_layers and len(qv_head) == 1 + 2 * h.num_layers
    assert (model, h.model_dim, h.vocab_size) in qv_head
    kv = model.blocks[0].attn.c_k.out_features
    assert (model.blocks[0].attn.c_k, h.model_dim, kv) in full and kv == h.num_kv_heads * h.head_dim


# ----------------------------------------------------------------------------------------------
# Adapters per virtual slot (TTT_LORA_PER_SLOT=1, issue 19 F6): a looped layer's pass j uses slot j

KINDS = ("c_q", "c_v", "c_k", "attn", "mlp")


def host_kind(model, module) -> str:
    if module is model:
        return "head"
    return next(n.split(".")[-1] for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("options", ["loops", "frontier_all", "parallel"])
def test_per_slot_adapters_count_the_virtual_layers(options, h):
    """Slots per host kind = the virtual layers of loop_order (counted here with a Counter), the
    head one; TTT_LORA_PER_SLOT=0 or a model not looping: one slot a host, as before."""
    h = dataclasses.replace(h, ttt_lora_per_slot=True, **MODEL_OPTIONS[options])
    model = noisy_model(h)
    passes = collections.Counter(model.loop_order)
    for looping, per_slot in ((True, True), (False, True), (True, False)):
        model.looping = looping
        adapters = tg.attach_lora(model, dataclasses.replace(h, ttt_lora_per_slot=per_slot),
                                  torch.Generator().manual_seed(0), torch.device("cpu"))
        hosts = tg.lora_hosts(model, h)
        slots = collections.defaultdict(int)
        for (module, _, _), a in zip(hosts, adapters):
            slots[host_kind(model, module)] += a.slots
            assert a.A.shape[0] == a.B.shape[0] == a.slots
        virtual = sum(passes.values()) if looping and per_slot else h.num_layers
        assert dict(slots) == dict({k: virtual for k in KINDS}, head=1), (looping, per_slot)
        tg.detach_lora(model)


def test_frontier_preset_has_the_records_86_adapters():
    """PRESET=frontier (11 layers, 3-5 looped twice): 17 virtual layers, 1 + 5 x 17 = 86 adapters
    (the record's count in the review, F6; 56 shared), on the meta device as PREFLIGHT=plan."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    with torch.device("meta"):
        model = tg.GPT(tg.ModelConfig.of(h))
    adapters = tg.attach_lora(model, h, torch.Generator().manual_seed(0), torch.device("meta"))
    assert len(model.loop_order) == 17 and len(adapters) == 56 and sum(a.slots for a in adapters) == 86
    model.looping = False
    assert tg.lora_slots(model, h) == [1] * 56


def mlp_calls(model):
    """Hooks recording (layer, input, output) of every MLP call in call order (= block order)."""
    calls, hooks = [], []
    for i, block in enumerate(model.blocks):
        hooks.append(block.mlp.register_forward_hook(
            lambda m, args, out, i=i: calls.append((i, args[0].detach().clone(), out.detach().clone()))))
    return calls, hooks


@pytest.mark.parametrize("options", ["loops", "frontier_all"])  # sequential blocks / parallel lanes
def test_each_pass_of_a_looped_layer_uses_its_own_slot(options, h):
    """A non-zero B in slot s of layer 1's MLP adapter only: every block before pass s of layer 1
    is bit-identical to zero adapters, and at that pass the MLP output moves by exactly the
    adapter delta computed here from the captured input (x A_s^T B_s^T alpha/r)."""
    h = dataclasses.replace(h, ttt_lora_per_slot=True, **MODEL_OPTIONS[options])
    model = noisy_model(h)
    ids = torch.randint(0, h.vocab_size, (h.ttt_batch_size, L + 1), generator=torch.Generator().manual_seed(3))
    x, y = ids[:, :-1], ids[:, 1:]
    adapters = tg.attach_lora(model, h, torch.Generator().manual_seed(0), torch.device("cpu"))
    lora = model.blocks[1].mlp.lora
    where = [j for j, i in enumerate(model.loop_order) if i == 1]  # the passes of layer 1
    assert lora.slots == len(where) == h.num_loops + 1 and lora in adapters
    calls, hooks = mlp_calls(model)
    with torch.no_grad():
        model(x, y, reduction="none")
        base = list(calls)
        for s, pos in enumerate(where):
            calls.clear()
            lora.B[s].normal_(0, 0.5, generator=torch.Generator().manual_seed(s))
            model(x, y, reduction="none")
            assert [c[0] for c in calls] == [c[0] for c in base] == model.loop_order
            for j in range(pos):
                assert torch.equal(calls[j][2], base[j][2]), (s, j)
            inp = base[pos][1]
            assert torch.equal(calls[pos][1], inp)
            delta = torch.einsum("btd,brd,bor->bto", inp, lora.A[s], lora.B[s]) * (h.ttt_lora_alpha / h.ttt_lora_rank)
            assert delta.abs().max() > 1e-3
            torch.testing.assert_close(calls[pos][2] - base[pos][2], delta, rtol=1e-4, atol=1e-5)
            if pos + 1 < len(calls):
                assert not torch.equal(calls[-1][2], base[-1][2])  # downstream of the pass moves
            lora.B.zero_()
    for hk in hooks:
        hk.remove()
    tg.detach_lora(model)


class SharedLoRA:
    """Today's adapter before TTT_LORA_PER_SLOT (commit 9b21680's BatchedLoRA, verbatim but for
    the ignored slot): A (n,r,in), B (n,out,r), one per host, shared by every pass."""

    def __init__(self, n, d_in, d_out, h, gen, device):
        self.bound = 1 / math.sqrt(d_in)
        self.A = torch.empty(n, h.ttt_lora_rank, d_in, device=device).uniform_(-self.bound, self.bound, generator=gen)
        self.B = torch.zeros(n, d_out, h.ttt_lora_rank, device=device)
        self.A.requires_grad_(True)
        self.B.requires_grad_(True)
        self.scale = h.ttt_lora_alpha / h.ttt_lora_rank

    def __call__(self, x, slot=0):
        b = x.size(0)
        return (x @ self.A[:b].transpose(1, 2).to(x.dtype)) @ self.B[:b].transpose(1, 2).to(x.dtype) * self.scale


def shared_reference(model, val, spans, h):
    """LoRA TTT with SharedLoRA adapters, fresh ones and a fresh AdamW per batch (no warm start)."""
    from doc_streams import CountingLosses
    losses = CountingLosses(val.stream_len, RT.device)
    model.requires_grad_(False)
    for bi, q in enumerate(tg.ttt_queue(spans, h.ttt_batch_size)):
        gen = torch.Generator().manual_seed(h.seed + 1_000_003 * bi)
        adapters = []
        for module, d_in, d_out in tg.lora_hosts(model, h):
            module.lora = SharedLoRA(h.ttt_batch_size, d_in, d_out, h, gen, RT.device)
            adapters.append(module.lora)
        tg.lora_ttt_batch(model, val, spans[q], adapters, h.ttt_grad_steps, h, RT, losses)
    tg.detach_lora(model)
    return losses


def test_per_slot_off_is_todays_shared_adapters_exactly(h):
    """TTT_LORA_PER_SLOT=0 on a looped model gives the pre-change shared adapters' NLLs bit for
    bit; 1 gives other numbers (the slots train apart); on a model without loops 0 and 1 agree."""
    h = dataclasses.replace(h, ttt_warm_start_a=False, **MODEL_OPTIONS["frontier_all"])
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    model = noisy_model(h)
    ref = shared_reference(copy.deepcopy(model), val, spans, h).nll.numpy()
    _, off = run_doc(model, val, dataclasses.replace(h, ttt_lora_per_slot=False), RT, lora=True)
    _, on = run_doc(model, val, dataclasses.replace(h, ttt_lora_per_slot=True), RT, lora=True)
    assert off.nll.numpy().tobytes() == ref.tobytes()
    assert on.nll.numpy().tobytes() != ref.tobytes()
    plain = dataclasses.replace(h, num_loops=0)
    flat = noisy_model(plain)
    _, a = run_doc(flat, val, plain, RT, lora=True)
    _, b = run_doc(flat, val, dataclasses.replace(plain, ttt_lora_per_slot=True), RT, lora=True)
    assert a.nll.numpy().tobytes() == b.nll.numpy().tobytes()


# ----------------------------------------------------------------------------------------------
# Flip test per document (rule A2), phases and warm-start A included

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
LORA_CASES = {
    "lora": dict(ttt_warm_start_a=False),
    "warmA+2phases": dict(ttt_warm_start_a=True, phased_ttt_num_phases=2),
    "frontier_per_slot+warmA+2phases": dict(MODEL_OPTIONS["frontier_all"], ttt_lora_per_slot=True,
                                            ttt_warm_start_a=True, phased_ttt_num_phases=2),
}


def flip_in_doc(val: tg.ValidationData, spans: np.ndarray, k: int) -> tuple[tg.ValidationData, int]:
    """The val stream with one target token of document k changed (its middle, never a BOS)."""
    s, n = spans[k]
    t = int(s + max(1, n // 2))
    tokens = val.tokens.clone()
    tokens[t] = 4 + (tokens[t] - 3) % (len(val.base_bytes) - 4) if tokens[t] != BOS else tokens[t]
    return tg.ValidationData(tokens, val.stream_len, val.base_bytes, val.has_leading_space, val.is_boundary), t


def earlier_unchanged(a: np.ndarray, b: np.ndarray, spans: np.ndarray, k: int, t: int, h) -> bool:
    """NLL bit-identical for every target of the documents before k in the queue, and for the
    targets of document k before the flipped token t."""
    order = np.concatenate(tg.ttt_queue(spans, h.ttt_batch_size))
    before = order[:list(order).index(k)]
    idx = np.concatenate([np.arange(spans[d, 0] + 1, spans[d, 0] + spans[d, 1] + 1) for d in before]
                         + [np.arange(spans[k, 0] + 1, t)]).astype(np.int64)
    return a[idx].tobytes() == b[idx].tobytes()


def flip_check(model, val, h, ks):
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    _, la = run_doc(model, val, h, RT, lora=True)
    a = la.nll.numpy()
    for k in ks:
        fval, t = flip_in_doc(val, spans, k)
        _, lb = run_doc(model, fval, h, RT, lora=True)
        b = lb.nll.numpy()
        yield k, t, a, b, spans


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_flip_a_token_of_a_document_changes_nothing_scored_before_it(case, h):
    h = dataclasses.replace(h, **LORA_CASES[case])
    model = noisy_model(h)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    order = np.concatenate(tg.ttt_queue(tg.document_spans(val.tokens.numpy(), BOS), h.ttt_batch_size))
    ks = [order[0], order[5], order[-3]]  # the first document, one in the phases' prefix, a late one
    changed_later = 0
    for k, t, a, b, spans in flip_check(model, val, h, ks):
        assert earlier_unchanged(a, b, spans, k, t, h), (case, k)
        assert a[t] != b[t]
        changed_later += a[t + 1:].tobytes() != b[t + 1:].tobytes()
    assert changed_later == len(ks)


def step_first(forward, score, adapt, steps):
    """The wrong order: adapt on the chunk, then score it."""
    for _ in range(steps):
        adapt(forward())
    score(forward().detach())


def test_flip_test_catches_lora_ttt_that_steps_before_scoring(h, monkeypatch):
    monkeypatch.setattr(tg, "score_first", step_first)
    h = dataclasses.replace(h, ttt_warm_start_a=False)
    model = noisy_model(h)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    k = int(np.argmax(spans[:, 1]))  # the longest document: many chunks
    (_, t, a, b, _), = flip_check(model, val, h, [k])
    assert not earlier_unchanged(a, b, spans, k, t, h)


def test_lora_ttt_adapts_and_first_chunks_match_zero_steps(h):
    """Before the first phase each document's first chunk is scored with B = 0: bit-identical to
    a run without steps; after it the adapters (and the phases) change the numbers."""
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    model = noisy_model(h)
    r1, l1 = run_doc(model, val, h, RT, lora=True)
    r0, l0 = run_doc(model, val, dataclasses.replace(h, ttt_grad_steps=0), RT, lora=True)
    a, b = l1.nll.numpy(), l0.nll.numpy()
    first = np.concatenate([np.arange(s + 1, s + min(n, C) + 1) for s, n in spans])
    assert a[first].tobytes() == b[first].tobytes()
    assert a.tobytes() != b.tobytes() and r1.loss_sum != r0.loss_sum
    r2, _ = run_doc(model, val, dataclasses.replace(h, phased_ttt_num_phases=2), RT, lora=True)
    assert r2.notes["phases_run"] == 2 and r2.loss_sum != r1.loss_sum
    assert (r0.tokens, r0.bytes) == (r1.tokens, r1.bytes) == (r2.tokens, r2.bytes)


def test_lora_limit_scores_the_first_batches_of_the_full_run(h):
    """lora_ttt_evaluate(limit=2) on one rank scores exactly the documents of the queue's first 2
    batches, once each, with the full run's per-token losses bit for bit (the second batch after
    the first global phase, as in the full run: warm-start A, 2 phases)."""
    from doc_streams import CountingLosses
    h = dataclasses.replace(h, ttt_warm_start_a=True, phased_ttt_num_phases=2)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    model = noisy_model(h)
    full, lf = run_doc(model, val, h, RT, lora=True)
    losses = CountingLosses(val.stream_len, RT.device)
    part = tg.lora_ttt_evaluate(copy.deepcopy(model), val, spans, h, RT, losses, limit=2)
    docs = np.concatenate(tg.ttt_queue(spans, h.ttt_batch_size)[:2])
    idx = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in spans[docs]])
    assert part.tokens == len(idx) == int(losses.count.sum()) < full.tokens and (losses.count[idx] == 1).all()
    assert losses.nll.numpy()[idx].tobytes() == lf.nll.numpy()[idx].tobytes()
    assert part.notes["phases_run"] == 2 and part.loss_sum == pytest.approx(float(lf.nll[idx].double().sum()), rel=1e-6)


def test_global_phase_trains_only_the_prefix_documents(h):
    """The phase's SGD reads exactly the targets of the prefix documents (all already scored)."""
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    prefix = spans[np.concatenate(tg.ttt_queue(spans, h.ttt_batch_size))[:4]]
    model = noisy_model(h)
    seen = []
    real = model.forward
    model.forward = lambda x, y, reduction="mean", **kw: (seen.append(y.clone()), real(x, y, reduction, **kw))[1]
    tokens = tg.global_ttt(model, val, prefix, dataclasses.replace(h, global_ttt_epochs=2), RT)
    assert tokens == int(prefix[:, 1].sum())
    assert sum(len(y.flatten()) for y in seen) >= 2 * tokens
    assert all(p.requires_grad is False and p.grad is None for p in model.parameters())
    before = noisy_model(h)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


# ----------------------------------------------------------------------------------------------
# Planners on a virtual clock


def test_lora_planner_ignores_a_slow_first_batch_cuts_and_raises_again(h, monkeypatch):
    """Virtual cost per batch = work x rate x (1 + STEP_COST x steps): the first batch is 100x
    slow (first backward), then slow, then fast batches. Steps are not cut for the first batch,
    are cut while slow, come back once fast, and the run ends inside the deadline."""
    h = dataclasses.replace(h, ttt_batch_size=1)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    virtual, calls = [0.0], []
    rates = [100.0] + [1.0] * 3 + [0.05] * 100
    monkeypatch.setattr(tg, "clock", lambda: virtual[0])
    real = tg.lora_ttt_batch

    def timed(model, val, spans_b, adapters, steps, *rest):
        work = tg.lora_batch_work(spans_b, h.ttt_chunk_size, h.eval_seq_len)
        virtual[0] += 1e-3 * work * rates[len(calls)] * (1 + tg.STEP_COST * steps)
        calls.append(steps)
        return real(model, val, spans_b, adapters, steps, *rest)
    monkeypatch.setattr(tg, "lora_ttt_batch", timed)
    first_cost = 1e-3 * tg.lora_batch_work(spans[[int(np.argmax(spans[:, 1]))]], C, L) * 100 * 3
    deadline = first_cost + 2.0
    r = tg.lora_ttt_evaluate(noisy_model(h), val, spans, h, RT, deadline=deadline)
    assert virtual[0] <= deadline
    assert calls[1] == 1 and 0 in calls and calls[-1] == 1, calls  # kept, cut, raised again
    assert r.notes["plan_changes"] >= 2 and r.notes["grad_steps_min"] == 0
    assert r.tokens == len(val.tokens) - 1


def test_lora_planner_cuts_steps_before_the_first_batch_from_the_record_pace(h, monkeypatch, capsys):
    """A deadline that the whole schedule misses at 2 grad steps but meets at 1 on the record's
    pace (eager: EAGER_TTT_FACTOR x the RECORD_LORA_* rates, computed here from the document
    lengths): the first batch already runs 1 step; batches that then cost nothing (a frozen
    virtual clock) let the measured re-plan raise it back to 2."""
    h = dataclasses.replace(h, ttt_batch_size=2, ttt_grad_steps=2, phased_ttt_num_phases=0)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    monkeypatch.setattr(tg, "clock", lambda: 0.0)
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, *a: False)
    zero_steps = 0.0  # seconds at 0 grad steps: each batch's work at the long or short rate, eager
    for q in tg.ttt_queue(spans, 2):
        rate = 0.38e6 if spans[q, 1].max() >= h.eval_seq_len else 0.5e6
        zero_steps += tg.lora_batch_work(spans[q], C, L) / rate * 1.8 / (1 + tg.STEP_COST)
    at = lambda steps: zero_steps * (1 + tg.STEP_COST * steps)  # noqa: E731
    calls, real = [], tg.lora_ttt_batch
    monkeypatch.setattr(tg, "lora_ttt_batch", lambda m, v, sb, ad, steps, *rest: calls.append(steps)
                        or real(m, v, sb, ad, steps, *rest))
    capsys.readouterr()
    r = tg.lora_ttt_evaluate(noisy_model(h), val, spans, h, RT, deadline=(at(1) + at(2)) / 2)
    out = capsys.readouterr().out
    assert f"ttt:plan prior grad_steps:2->1 projected:{at(1):.1f}s" in out
    assert calls[:2] == [1, 1] and calls[-1] == 2 and len(calls) > 3, calls
    assert r.notes["plan_changes"] == 2 and r.notes["grad_steps_min"] == 1
    steps, projected = tg.lora_prior_steps(h, spans, tg.lora_schedule(spans, h, 1), 1, at(2) * (1 + 1e-9))
    assert (steps, projected) == (2, pytest.approx(at(2)))  # exactly enough time: all steps
    assert tg.lora_prior_steps(h, spans, tg.lora_schedule(spans, h, 1), 1, 0.99 * at(0))[0] == 0


def test_sliding_planner_ignores_a_slow_first_chunk(hparams, runtime, tiny_model, tiny_data, monkeypatch):
    """Full-model chunk TTT (sliding mode), 8 chunks: a first chunk 10x slow per epoch no longer
    cuts the epochs of the whole run (issue 8); a slow stretch later cuts them, and they come back
    once the work left fits again."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    full = tg.load_validation(hparams, sp, runtime, hparams.eval_seq_len)
    val = dataclasses.replace(full, tokens=full.tokens[:8 * 512 + 1])
    virtual, epochs_seen = [0.0], []
    rates = [10.0, 1.0, 4.0] + [0.2] * 10
    monkeypatch.setattr(tg, "clock", lambda: virtual[0])
    real_train = tg.ttt_train_chunk

    def slow_train(*args, **kwargs):
        virtual[0] += rates[len(epochs_seen)] * args[5]  # args[5] = epochs
        epochs_seen.append(args[5])
        return real_train(*args, **kwargs)
    monkeypatch.setattr(tg, "ttt_train_chunk", slow_train)
    h = dataclasses.replace(hparams, ttt_epochs=3, ttt_chunk_tokens=512)
    r = tg.ttt_evaluate(tiny_model, tg.nll_function(tiny_model), val, h, runtime, deadline=50.0)
    assert virtual[0] <= 50.0
    cut = epochs_seen.index(min(epochs_seen))
    assert epochs_seen[:3] == [3, 3, 3] and min(epochs_seen) < 3 and max(epochs_seen[cut:]) > min(epochs_seen), \
        epochs_seen
    assert r.notes["plan_changes"] >= 2 and r.tokens == 8 * 512


# ----------------------------------------------------------------------------------------------
# Bad input: one error line naming the variable, exit status 2

BAD = {
    "chunk_above_seq_len": (dict(TTT_CHUNK_SIZE=L + 1), "TTT_CHUNK_SIZE"),
    "rank0_with_lora": (dict(TTT_LORA_RANK=0), "TTT_LORA_RANK"),
    "phases_above_prefix": (dict(PHASED_TTT_NUM_PHASES=7, PHASED_TTT_PREFIX_DOCS=6), "PHASED_TTT_NUM_PHASES"),
    "eval_mode": (dict(EVAL_MODE="docs"), "EVAL_MODE"),
    "batch_size": (dict(TTT_BATCH_SIZE=0), "TTT_BATCH_SIZE"),
    "typo": (dict(PHASED_TTT_PHASES=2), "PHASED_TTT_PHASES"),
    "phase_select": (dict(PHASED_TTT_SELECT="longest"), "PHASED_TTT_SELECT"),
    "balance": (dict(TTT_BALANCE="greedy"), "TTT_BALANCE"),
    "per_slot": (dict(TTT_LORA_PER_SLOT="2"), "TTT_LORA_PER_SLOT"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_doc_eval_input_exits_2_naming_the_variable(case, tiny_data, capsys):
    overrides, var = BAD[case]
    assert tg.main(doc_env(tiny_data, RUN_ID="bad", **overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {var}"), err


def test_frontier_preset_is_the_records_eval():
    """PRESET=frontier carries the 1.0611 record's TTT settings (frontier spec section 7)."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    expected = dict(eval_mode="doc", eval_seq_len=2048, ttt_enabled=True, ttt_chunk_size=48, ttt_batch_size=64,
                       ttt_grad_steps=1, ttt_lora_rank=80, ttt_lora_alpha=144.0, ttt_lora_lr=1e-4, ttt_beta1=0.0,
                       ttt_beta2=0.99, ttt_weight_decay=0.5, ttt_warm_start_a=True, ttt_k_lora=True,
                       ttt_o_lora=True, ttt_mlp_lora=True, phased_ttt_prefix_docs=2500, phased_ttt_num_phases=3,
                       global_ttt_lr=0.001, global_ttt_momentum=0.9, global_ttt_epochs=1,
                       global_ttt_chunk_tokens=32768, global_ttt_batch_seqs=32, global_ttt_grad_clip=1.0,
                       ttt_lora_per_slot=True)
    assert {k: getattr(h, k) for k in expected} == expected
    assert tg.Hyperparameters.from_env({"PRESET": "tiny"}).eval_mode == "sliding"  # seed presets keep sliding


def test_rank0_is_fine_without_lora_ttt(tiny_data):
    h = tg.Hyperparameters.from_env(doc_env(tiny_data, TTT_LORA_RANK=0, EVAL_MODE="sliding"))
    assert h.ttt_lora_rank == 0


# ----------------------------------------------------------------------------------------------
# lora_schedule: LPT balance with split long-document batches, phase documents (review F5)

TRAIN_SHARD = "../shared/data/standin_sp8192/fineweb_train_000000.bin"  # TRAIN lengths only, never val


def fineweb_spans() -> np.ndarray:
    import os
    path = os.path.join(os.path.dirname(__file__), "..", TRAIN_SHARD)
    if not os.path.isfile(path):
        pytest.skip(f"{TRAIN_SHARD} not present")
    return tg.document_spans(np.asarray(tg.read_shard(path)), 1)  # sp8192 BOS = 1


def schedule_h(**kw) -> tg.Hyperparameters:
    return dataclasses.replace(tg.Hyperparameters(), ttt_batch_size=16, eval_seq_len=2048, ttt_chunk_size=48,
                               phased_ttt_num_phases=3, phased_ttt_prefix_docs=2000, **kw)


def loads(plan: tg.LoraSchedule, world: int, seg: int | None = None) -> list[int]:
    return [sum(plan.work[b] for s, bs in enumerate(plan.mine[r]) if seg in (None, s) for b in bs)
            for r in range(world)]


def test_lpt_schedule_balances_ranks_on_fineweb_lengths():
    """8 ranks, FineWeb-like lengths: per segment max/mean <= 1.15 and whole run <= 1.05 with
    LPT + split long-document batches, against > 2 for round robin; each document is in exactly
    one batch, run by exactly one rank, in the queue's document order; deterministic."""
    spans, world = fineweb_spans(), 8
    plan = tg.lora_schedule(spans, schedule_h(ttt_split_batches=True), world)
    rr = tg.lora_schedule(spans, schedule_h(ttt_balance="round_robin"), world)
    ratio = lambda x: max(x) / np.mean(x)
    for s in range(len(plan.cuts) - 1):
        assert ratio(loads(plan, world, s)) <= 1.15
    assert ratio(loads(plan, world)) <= 1.05 < 2.0 < ratio(loads(rr, world))
    assert np.array_equal(np.concatenate(plan.queue), np.concatenate(tg.ttt_queue(spans, 16)))
    runs = sorted(b for r in range(world) for seg in plan.mine[r] for b in seg)
    assert runs == list(range(len(plan.queue)))
    assert plan.work == [tg.lora_batch_work(spans[q], 48, 2048) for q in plan.queue]
    for r in range(world):
        for s, seg in enumerate(plan.mine[r]):
            assert seg == sorted(seg) and all(plan.cuts[s] <= b < plan.cuts[s + 1] for b in seg)
    again = tg.lora_schedule(spans, schedule_h(ttt_split_batches=True), world)
    assert len(tg.lora_schedule(spans, schedule_h(), world).queue) == len(tg.ttt_queue(spans, 16)) < len(plan.queue)
    assert again.mine == plan.mine and all(np.array_equal(a, b) for a, b in zip(again.queue, plan.queue))


def test_one_rank_schedule_is_todays_queue():
    """world_size 1: no split, the queue of ttt_queue, run in order; round robin's segments the same."""
    spans = fineweb_spans()
    for bal in ("lpt", "round_robin"):
        plan = tg.lora_schedule(spans, schedule_h(ttt_balance=bal), 1)
        q = tg.ttt_queue(spans, 16)
        assert len(plan.queue) == len(q) and all(np.array_equal(a, b) for a, b in zip(plan.queue, q))
        assert [b for seg in plan.mine[0] for b in seg] == list(range(len(q)))


def test_phase_documents_are_the_b_shortest_scored_or_the_prefix():
    """Independent reading of F5: phase p trains on the b_p = floor(P*(p+1)/N) shortest documents
    (ties: earlier start) among those in the batches before its pause; PHASED_TTT_SELECT=prefix
    keeps the queue's first b_p (the longest)."""
    spans, world = fineweb_spans(), 8
    plan = tg.lora_schedule(spans, schedule_h(), world)
    old = tg.lora_schedule(spans, schedule_h(phased_ttt_select="prefix"), world)
    order = [int(d) for q in tg.ttt_queue(spans, 16) for d in q]
    assert len(plan.phase_docs) == 3
    for p in range(3):
        b = 2000 * (p + 1) // 3
        scored = [int(d) for q in plan.queue[:plan.cuts[p + 1]] for d in q]
        want = sorted(scored, key=lambda d: (int(spans[d, 1]), int(spans[d, 0])))[:b]
        assert plan.phase_docs[p].tolist() == want
        assert old.phase_docs[p].tolist() == order[:b]
        fewer = int(spans[plan.phase_docs[p], 1].sum()) < int(spans[old.phase_docs[p], 1].sum())
        assert fewer == (p < 2)  # the last pause has scored about the prefix itself: the same set


def test_lora_prior_pace_follows_the_device_that_runs_it(h):
    """COMPILE=-1 (on for CUDA only): the plan's H100 (rt=None) is compiled, this CPU run is eager, so
    the run's prior pace is EAGER_TTT_FACTOR x the plan's and its prior adds no compile warm-up."""
    h = dataclasses.replace(h, compile=-1, ttt_batch_size=2, phased_ttt_num_phases=0)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    plan = tg.lora_schedule(spans, h, 1)
    plan_pace, cpu_pace = tg.lora_prior_pace(h, spans, plan), tg.lora_prior_pace(h, spans, plan, RT)
    assert cpu_pace == pytest.approx([p * tg.EAGER_TTT_FACTOR for p in plan_pace])
    big = 1e9  # every step fits: projected = the fixed part + all steps
    _, on_h100 = tg.lora_prior_steps(h, spans, plan, 1, big)
    _, on_cpu = tg.lora_prior_steps(h, spans, plan, 1, big, RT)
    assert on_h100 - tg.RECORD_TTT_COMPILE_S == pytest.approx(on_cpu / tg.EAGER_TTT_FACTOR)
