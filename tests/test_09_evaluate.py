"""Evaluation: sliding windows, plain/sliding bits-per-byte sums, per-token loss files, and the
legality of score-first TTT (rules A1-A5): the flip test, the score/train order, and a
deliberately wrong TTT (train on a chunk, then score it) that the flip test must catch.

In-process and CPU-only, a few seconds:
    python3 -m pytest -q tests/test_09_evaluate.py
"""

import copy

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import tiny_env

L, STRIDE, CHUNK = 32, 8, 128  # small eval geometry: 4 sequences per TTT chunk
N_CHUNKS = 4
TOTAL = N_CHUNKS * CHUNK  # predicted positions of the hand-made stream


@pytest.fixture
def h(tiny_data) -> tg.Hyperparameters:
    """Tiny model shapes with a small eval geometry; EVAL_BATCH_SEQS=5 forces padded batches and
    a large TTT_LR makes every TTT step visible in the scores."""
    return tg.Hyperparameters.from_env(tiny_env(
        tiny_data, EVAL_SEQ_LEN=L, EVAL_STRIDE=STRIDE, EVAL_BATCH_SEQS=5, TTT_CHUNK_TOKENS=CHUNK,
        TTT_BATCH_SEQS=3, TTT_LR=0.05, TTT_EPOCHS=1))


@pytest.fixture
def model(h) -> tg.GPT:
    """The tiny model with noise on every parameter, so that predictions depend on the context
    (at init the zero projections and tiny embeddings give nearly uniform logits)."""
    m = tg.GPT(tg.ModelConfig.of(h))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def make_val(vocab: int, n_tokens: int, tail: int = 0, seed: int = 0) -> tg.ValidationData:
    """Random tokens and random byte tables (0-3 bytes, some leading spaces, 4 boundary tokens).
    `tail` extra stream tokens are cut off, as load_validation cuts the stream to whole sequences."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, vocab, n_tokens).astype(np.int64))
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:4] = True
    return tg.ValidationData(tokens, n_tokens + tail, torch.from_numpy(rng.integers(0, 4, vocab).astype(np.int64)),
                             torch.from_numpy(rng.random(vocab) < 0.3), boundary)


def tiny_data_val(tiny_data, h, rt, n_tokens: int = 2 * TOTAL + 1) -> tg.ValidationData:
    """The real loader's stream and byte tables on tiny_data, cut to n_tokens (for speed); the
    stream length stays that of the whole val shard."""
    hd = tg.Hyperparameters.from_env(tiny_env(tiny_data))
    val = tg.load_validation(hd, tg.load_tokenizer(hd), rt, h.eval_seq_len)
    assert len(val.tokens) > n_tokens
    return tg.ValidationData(val.tokens[:n_tokens], val.stream_len, val.base_bytes, val.has_leading_space,
                             val.is_boundary)


def reference_plain(model: tg.GPT, val: tg.ValidationData, seq_len: int):
    """Plain eval written out: each disjoint sequence forwarded on its own, NLL summed in float64,
    bytes from the tables in numpy. Returns (loss_sum, tokens, bytes, per-token NLL by target index)."""
    toks = val.tokens.numpy()
    base, space, bound = val.base_bytes.numpy(), val.has_leading_space.numpy(), val.is_boundary.numpy()
    n = (len(toks) - 1) // seq_len
    per_token = np.full(len(toks), np.nan)
    loss, nbytes = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x, y = val.tokens[i * seq_len:(i + 1) * seq_len], val.tokens[i * seq_len + 1:(i + 1) * seq_len + 1]
            nll = model(x[None], y[None], reduction="none")[0].double().numpy()
            loss += float(nll.sum())
            per_token[i * seq_len + 1:(i + 1) * seq_len + 1] = nll
            xs, ys = x.numpy(), y.numpy()
            nbytes += int(base[ys].sum() + (space[ys] & ~bound[xs]).sum())
    return loss, n * seq_len, nbytes, per_token


def run_losses(tmp_path, name, fn, val, rt) -> tuple[tg.EvalResult, np.ndarray]:
    """Run fn(losses) with a TokenLosses over the whole stream, save it, load the .npy back."""
    losses = tg.TokenLosses(val.stream_len, rt.device)
    result = fn(losses)
    path = tmp_path / f"{name}.npy"
    losses.save(str(path), rt)
    return result, np.load(path)


def sliding_losses(tmp_path, model, val, h, rt, name="sliding"):
    return run_losses(tmp_path, name, lambda tl: tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_stride, tl),
                      val, rt)


def ttt_losses(tmp_path, model, val, h, rt, name="ttt", trace=None):
    m = copy.deepcopy(model)  # TTT trains the model it scores
    return run_losses(tmp_path, name, lambda tl: tg.ttt_evaluate(m, tg.nll_function(m), val, h, rt, tl, trace=trace),
                      val, rt)


# ----------------------------------------------------------------------------------------------
# sliding_windows

WINDOW_CASES = [(1, 4, 1), (5, 8, 3), (7, 7, 7), (7, 7, 2), (8, 4, 4), (12, 4, 4), (12, 4, 1), (13, 4, 3),
                (100, 16, 16), (100, 16, 5), (100, 16, 7), (96, 32, 8), (97, 32, 8), (130, 32, 31),
                (1000, 128, 32), (1001, 128, 64), (33, 32, 32), (33, 32, 1)]


@pytest.mark.parametrize("total,seq_len,stride", WINDOW_CASES, ids=[f"T{t}-L{s}-S{r}" for t, s, r in WINDOW_CASES])
def test_sliding_windows_score_every_position_once_with_context(total, seq_len, stride):
    wins = tg.sliding_windows(total, seq_len, stride)
    start, score_from, end = wins[:, 0], wins[:, 1], wins[:, 2]
    counts = np.zeros(total, dtype=np.int64)
    for _, f, e in wins:
        counts[f:e] += 1
    assert (counts == 1).all()
    assert (end - start == min(seq_len, total)).all()
    assert (start >= 0).all() and (end <= total).all() and (score_from >= start).all()
    assert score_from[0] == 0 and (np.diff(end) > 0).all()  # left to right
    for s, f, e in wins[1:]:
        assert f - s >= seq_len - stride  # every later scored position has >= L - stride context


# ----------------------------------------------------------------------------------------------
# evaluate(): plain, sliding, per-token losses


@pytest.mark.parametrize("source", ["random", "tiny_data"])
def test_evaluate_plain_equals_reference_and_sliding_counts(source, tiny_data, h, model, runtime, tmp_path):
    val = make_val(h.vocab_size, TOTAL + 1, tail=19) if source == "random" else tiny_data_val(tiny_data, h, runtime)
    total = len(val.tokens) - 1
    ref_loss, ref_tokens, ref_bytes, ref_nll = reference_plain(model, val, h.eval_seq_len)
    assert ref_tokens == total and ref_bytes > 0

    plain, plain_nll = run_losses(
        tmp_path, "plain", lambda tl: tg.evaluate(tg.nll_function(model), val, h, runtime, h.eval_seq_len, tl),
        val, runtime)
    assert (plain.tokens, plain.bytes) == (ref_tokens, ref_bytes)
    assert plain.loss_sum == pytest.approx(ref_loss, rel=1e-9)
    np.testing.assert_allclose(plain_nll[1:total + 1], ref_nll[1:], rtol=1e-5)

    sliding, nll = sliding_losses(tmp_path, model, val, h, runtime)
    assert (sliding.tokens, sliding.bytes) == (plain.tokens, plain.bytes)
    assert sliding.loss_sum != plain.loss_sum  # more context changes the numbers
    # the first window is the first plain sequence
    np.testing.assert_allclose(nll[1:h.eval_seq_len + 1], ref_nll[1:h.eval_seq_len + 1], rtol=1e-5)

    assert len(nll) == val.stream_len
    scored = ~np.isnan(nll)
    assert not scored[0] and scored[1:total + 1].all() and not scored[total + 1:].any()
    assert val.stream_len > total + 1  # the truncated tail is really there, and NaN
    assert int(scored.sum()) == sliding.tokens
    assert float(np.nansum(nll.astype(np.float64))) == pytest.approx(sliding.loss_sum, rel=1e-12)
    assert sliding.val_bpb == pytest.approx(sliding.loss_sum / (np.log(2) * sliding.bytes), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# The flip test (rule A2): changing token t changes nothing scored before it


FLIP_T = 2 * CHUNK + CHUNK // 2 + 1  # a token in the middle of chunk 2 of 4


def flipped(val: tg.ValidationData, t: int) -> tg.ValidationData:
    tokens = val.tokens.clone()
    tokens[t] = (tokens[t] + 1) % len(val.base_bytes)
    return tg.ValidationData(tokens, val.stream_len, val.base_bytes, val.has_leading_space, val.is_boundary)


def prefix_unchanged(a: np.ndarray, b: np.ndarray, t: int) -> bool:
    """Entries 1..t-1 (NLL of the tokens before t) bit-identical."""
    return a[1:t].tobytes() == b[1:t].tobytes()


@pytest.mark.parametrize("phase", ["sliding", "ttt"])
def test_flip_token_changes_only_its_own_and_later_losses(phase, h, model, runtime, tmp_path):
    val = make_val(h.vocab_size, TOTAL + 1, tail=5)
    run = sliding_losses if phase == "sliding" else ttt_losses
    _, a = run(tmp_path, model, val, h, runtime, name="a")
    _, b = run(tmp_path, model, flipped(val, FLIP_T), h, runtime, name="b")
    assert np.isfinite(a[1:TOTAL + 1]).all()
    assert prefix_unchanged(a, b, FLIP_T)
    assert a[FLIP_T] != b[FLIP_T]


def test_flip_test_catches_ttt_that_trains_before_scoring(h, model, runtime, tmp_path, monkeypatch):
    """The same ttt_evaluate with scoring delayed by one chunk: chunk c is scored after the
    update on chunk c, so tokens after t leak into the scores of tokens before t."""
    real_score, pending, calls = tg.score_windows, [], []
    total = TOTAL

    def lagged(nll_fn, val, wins, batch, rt, losses=None):
        calls.append(len(wins))
        out = torch.zeros(3, dtype=torch.float64)
        for w in pending:
            out += real_score(nll_fn, val, w, batch, rt, losses)
        pending[:] = [wins]
        if wins[:, 2].max() == total:  # the last chunk: nothing follows, score it now
            out += real_score(nll_fn, val, pending.pop(), batch, rt, losses)
        return out

    monkeypatch.setattr(tg, "score_windows", lagged)
    val = make_val(h.vocab_size, TOTAL + 1)
    wrong, a = ttt_losses(tmp_path, model, val, h, runtime, name="a")
    _, b = ttt_losses(tmp_path, model, flipped(val, FLIP_T), h, runtime, name="b")
    assert len(calls) == 2 * N_CHUNKS  # the patch was in force for every chunk of both runs
    assert wrong.tokens == TOTAL and np.isfinite(a[1:]).all()  # still scores everything once
    assert not prefix_unchanged(a, b, FLIP_T)  # ... but fails the flip test


# ----------------------------------------------------------------------------------------------
# Score-first order (rules A1, A4, A5) and what TTT does to the score


def test_ttt_trace_scores_each_chunk_before_training_on_it(h, model, runtime, tmp_path):
    trace: list = []
    val = make_val(h.vocab_size, TOTAL + 1)
    ttt_losses(tmp_path, model, val, h, runtime, trace=trace)
    scores = [(i, e) for i, e in enumerate(trace) if e[0] == "score"]
    assert [e[1] for _, e in scores] == list(range(N_CHUNKS))  # each chunk scored once, in order
    assert scores[-1][1][2] == TOTAL
    trains = [(i, e) for i, e in enumerate(trace) if e[0] == "train"]
    assert {e[1] for _, e in trains} == set(range(N_CHUNKS - 1))  # the last chunk is never trained on
    first_score = {e[1]: i for i, e in scores}
    for i, e in trains:
        assert first_score[e[1]] < i
    scored_so_far = 0
    for kind, c, idx in trace:
        if kind == "score":
            scored_so_far = max(scored_so_far, idx)
        else:
            assert idx <= scored_so_far  # trains only on target tokens already scored


def test_ttt_changes_score_and_zero_epochs_equals_sliding(h, model, runtime, tmp_path):
    val = make_val(h.vocab_size, TOTAL + 1)
    sliding, s_nll = sliding_losses(tmp_path, model, val, h, runtime)
    ttt, t_nll = ttt_losses(tmp_path, model, val, h, runtime)
    assert (ttt.tokens, ttt.bytes) == (sliding.tokens, sliding.bytes)
    assert abs(ttt.loss_sum - sliding.loss_sum) > 1e-5 * sliding.loss_sum  # training mattered
    # chunk 0 is scored before any update: identical to sliding there, different later
    first = CHUNK + 1
    assert t_nll[1:first].tobytes() == s_nll[1:first].tobytes()
    assert t_nll[first:].tobytes() != s_nll[first:].tobytes()

    h0 = tg.dataclasses.replace(h, ttt_epochs=0)
    ttt0, t0_nll = ttt_losses(tmp_path, model, val, h0, runtime, name="ttt0")
    assert (ttt0.tokens, ttt0.bytes) == (sliding.tokens, sliding.bytes)
    assert t0_nll.tobytes() == s_nll.tobytes()
    assert ttt0.loss_sum == pytest.approx(sliding.loss_sum, rel=1e-12, abs=0)


def test_limit_scores_the_first_windows_and_chunks_of_the_full_run(h, model, runtime, tmp_path):
    """evaluate(limit=k) scores exactly the first k windows (7: not a multiple of the batch of 5),
    with the full run's per-token losses bit for bit and NaN elsewhere; ttt_evaluate(limit=2)
    scores the first 2 chunks as the full TTT run does (chunk 1 after training on chunk 0)."""
    val = make_val(h.vocab_size, TOTAL + 1)
    full, f_nll = sliding_losses(tmp_path, model, val, h, runtime)
    k = 7
    part, p_nll = run_losses(tmp_path, "part", lambda tl: tg.evaluate(tg.nll_function(model), val, h, runtime,
                                                                        h.eval_stride, tl, limit=k), val, runtime)
    wins = tg.sliding_windows(TOTAL, L, STRIDE)[:k]
    scored = np.zeros(len(p_nll), dtype=bool)
    for _, lo, hi in wins:
        scored[lo + 1:hi + 1] = True  # window targets are one after its positions
    assert part.tokens == scored.sum() == int((wins[:, 2] - wins[:, 1]).sum()) < full.tokens
    assert p_nll[scored].tobytes() == f_nll[scored].tobytes() and np.isnan(p_nll[~scored]).all()
    assert part.loss_sum == pytest.approx(float(f_nll[scored].astype(np.float64).sum()), rel=1e-6)

    _, t_nll = ttt_losses(tmp_path, model, val, h, runtime)
    m = copy.deepcopy(model)
    two, t2_nll = run_losses(tmp_path, "ttt2", lambda tl: tg.ttt_evaluate(m, tg.nll_function(m), val, h, runtime, tl,
                                                                           limit=2), val, runtime)
    first = 2 * CHUNK + 1
    assert two.tokens == 2 * CHUNK and two.notes["epochs_total"] == 2  # chunks 0 and 1 trained on
    assert t2_nll[1:first].tobytes() == t_nll[1:first].tobytes() and np.isnan(t2_nll[first:]).all()


# ----------------------------------------------------------------------------------------------
# Causal SLOT (non-record): the flip test, and a non-causal SLOT that fails it


def slot_losses(tmp_path, model, val, h, rt, name="slot", steps=4, lr=0.05):
    return run_losses(tmp_path, name, lambda tl: tg.evaluate(tg.slot_nll_function(model, steps, lr), val, h, rt,
                                                             h.eval_stride, tl), val, rt)


@pytest.mark.parametrize("t", [FLIP_T, FLIP_T + STRIDE // 2], ids=["range-start", "mid-range"])
def test_causal_slot_passes_the_flip_test_and_adapts(t, h, model, runtime, tmp_path):
    val = make_val(h.vocab_size, TOTAL + 1, tail=5)
    r, a = slot_losses(tmp_path, model, val, h, runtime, name="a")
    _, b = slot_losses(tmp_path, model, flipped(val, t), h, runtime, name="b")
    assert r.tokens == TOTAL and np.isfinite(a[1:TOTAL + 1]).all()
    assert prefix_unchanged(a, b, t) and a[t] != b[t]
    _, plain = sliding_losses(tmp_path, model, val, h, runtime, name="plain")
    assert np.array_equal(a[1:L + 1], plain[1:L + 1])  # the first window has no context: no delta
    assert not np.allclose(a[L + 1:TOTAL + 1], plain[L + 1:TOTAL + 1])  # later windows do adapt
    _, zero = slot_losses(tmp_path, model, val, h, runtime, name="zero", steps=0)
    np.testing.assert_allclose(zero[1:TOTAL + 1], plain[1:TOTAL + 1], rtol=1e-5)  # 0 steps: plain sliding


def test_flip_test_catches_slot_fitted_on_the_scored_positions(h, model, runtime, tmp_path, monkeypatch):
    """Standard (non-causal) SLOT fits the delta on the positions it then scores: give every window
    a context that covers the whole window, and the flip test must fail."""
    real = tg.slot_nll_function

    def leaky(model, steps, lr):
        fn = real(model, steps, lr)
        wrapped = lambda x, y, ctx: fn(x, y, torch.full_like(ctx, x.size(1)))  # noqa: E731
        wrapped.needs_context = True
        return wrapped
    monkeypatch.setattr(tg, "slot_nll_function", leaky)
    val = make_val(h.vocab_size, TOTAL + 1, tail=5)
    t = FLIP_T + STRIDE // 2  # inside a window's scored range, after its first scored token
    _, a = slot_losses(tmp_path, model, val, h, runtime, name="a")
    _, b = slot_losses(tmp_path, model, flipped(val, t), h, runtime, name="b")
    assert not prefix_unchanged(a, b, t)


def test_ttt_adamw_with_frozen_blocks_is_score_first_and_freezes(h, model, runtime, tmp_path):
    """TTT_OPTIMIZER=adamw and TTT_FREEZE_BLOCKS=1: the flip test still holds, block 0 is left
    exactly as loaded, block 1 moves, and every parameter is trainable again afterwards."""
    h2 = tg.dataclasses.replace(h, ttt_optimizer="adamw", ttt_freeze_blocks=1, ttt_lr=0.01)
    val = make_val(h.vocab_size, TOTAL + 1, tail=5)
    m = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    run_losses(tmp_path, "x", lambda tl: tg.ttt_evaluate(m, tg.nll_function(m), val, h2, runtime, tl), val, runtime)
    for n, p in m.named_parameters():
        if n.startswith("blocks.0."):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n.startswith("blocks.1."))
    assert all(p.requires_grad and p.grad is None for p in m.parameters())
    _, a = ttt_losses(tmp_path, model, val, h2, runtime, name="a")
    _, b = ttt_losses(tmp_path, model, flipped(val, FLIP_T), h2, runtime, name="b")
    assert prefix_unchanged(a, b, FLIP_T) and a[FLIP_T] != b[FLIP_T]
