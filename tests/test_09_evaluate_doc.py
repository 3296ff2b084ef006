"""Document-isolated evaluation (EVAL_MODE=doc; frontier.md 5.1, issue 11): document spans from BOS,
the chunked context of every target, coverage (every token after the first scored exactly once,
against an independent count, documents of length 1 and longer than EVAL_SEQ_LEN included), the
isolation of documents, and the script end to end on an artifact: the `doc` and LoRA `ttt` phases
in the log, summary and per-token files, the eval clock, a stream without BOS, and (slow) 1 against
2 gloo processes.

    python3 -m pytest -q tests/test_09_evaluate_doc.py
"""

import json
import re
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import run_script
from doc_streams import BOS, C, DOC_LENGTHS, L, doc_env, doc_stream, make_val, noisy_model, run_doc

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))


@pytest.fixture
def h(tiny_data) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env(doc_env(tiny_data))


# ----------------------------------------------------------------------------------------------
# Spans and windows

SPAN_CASES = {
    "bos_first": ([1, 5, 6, 1, 7, 1], [(0, 3), (3, 2)]),
    "lead_without_bos": ([5, 6, 1, 7, 8], [(0, 2), (2, 2)]),
    "no_bos": ([5, 6, 7, 8], [(0, 3)]),
    "length_one_docs": ([1, 1, 1, 9, 1], [(0, 1), (1, 1), (2, 2)]),
    "bos_last_is_only_a_target": ([1, 4, 1], [(0, 2)]),
}


@pytest.mark.parametrize("case", list(SPAN_CASES))
def test_document_spans(case):
    tokens, expected = SPAN_CASES[case]
    spans = tg.document_spans(np.array(tokens), BOS)
    assert [tuple(r) for r in spans] == expected
    assert spans[:, 1].sum() == len(tokens) - 1  # every token after the first is one target


def test_doc_windows_give_each_target_its_chunked_context():
    """Independent rule: the target at offset i of a document is in chunk i // C; it is scored
    with inputs from max(0, min((i // C + 1) * C, n) - L) up to itself, all of its document."""
    spans = tg.document_spans(doc_stream(512), BOS)
    wins = tg.doc_windows(spans, L, C)
    ctx_start = {}
    for start, frm, end in wins:
        assert 0 < end - start <= L
        for p in range(frm, end):
            assert p not in ctx_start
            ctx_start[p] = start
    for s, n in spans:
        for i in range(n):
            assert ctx_start[s + i] == s + max(0, min((i // C + 1) * C, n) - L), (s, n, i)
    assert len(ctx_start) == spans[:, 1].sum()


# ----------------------------------------------------------------------------------------------
# Coverage and isolation

COVERAGE = {
    "doc": (False, {}),
    "lora": (True, {}),
    "lora_2steps_3phases": (True, dict(ttt_grad_steps=2, phased_ttt_num_phases=3)),
}


@pytest.mark.parametrize("case", list(COVERAGE))
def test_every_token_after_the_first_is_scored_exactly_once(case, h):
    lora, overrides = COVERAGE[case]
    h = tg.dataclasses.replace(h, **overrides)
    tokens = doc_stream(h.vocab_size, lead=7)
    val = make_val(tokens, h.vocab_size, tail=9)  # 9 stream tokens cut off by the val truncation
    r, losses = run_doc(noisy_model(h), val, h, RT, lora)
    n_targets = 7 + sum(DOC_LENGTHS)  # independent count: the lead, then each document's tokens
    assert len(tokens) - 1 == n_targets and max(DOC_LENGTHS) > L and 1 in DOC_LENGTHS
    count = losses.count.numpy()
    assert count[0] == 0 and (count[1:n_targets + 1] == 1).all() and not count[n_targets + 1:].any()
    base, space, bound = (t.numpy() for t in (val.base_bytes, val.has_leading_space, val.is_boundary))
    ref_bytes = int(base[tokens[1:]].sum() + (space[tokens[1:]] & ~bound[tokens[:-1]]).sum())
    assert (r.tokens, r.bytes) == (n_targets, ref_bytes)
    assert r.loss_sum == pytest.approx(float(losses.nll.double().sum()), rel=1e-9)
    if lora:
        assert r.notes["phases_run"] == h.phased_ttt_num_phases


def test_doc_phase_isolates_documents_and_equals_chunked_lora_without_steps(h):
    """Each short document scores as if it were alone; changing a token of one document changes
    no other document's NLL (no adaptation: not even later ones); LoRA TTT with 0 steps scores
    the same numbers chunk by chunk."""
    model = noisy_model(h)
    tokens = doc_stream(h.vocab_size)
    val = make_val(tokens, h.vocab_size)
    spans = tg.document_spans(tokens, BOS)
    _, doc = run_doc(model, val, h, RT, lora=False)
    a = doc.nll.numpy()
    with torch.no_grad():
        for s, n in spans[spans[:, 1] <= L]:
            alone = model(val.tokens[None, s:s + n], val.tokens[None, s + 1:s + n + 1], reduction="none")[0]
            np.testing.assert_allclose(a[s + 1:s + n + 1], alone.numpy(), rtol=1e-5, atol=1e-6)
    k = int(np.argmax(spans[:, 1]))
    t = int(spans[k, 0] + spans[k, 1] // 2)
    flipped = tokens.copy()
    flipped[t] = 4 + (flipped[t] - 3) % (h.vocab_size - 4)
    _, doc_b = run_doc(model, make_val(flipped, h.vocab_size), h, RT, lora=False)
    b = doc_b.nll.numpy()
    outside = np.ones(len(a), dtype=bool)
    outside[t:spans[k, 0] + spans[k, 1] + 1] = False
    assert a[outside].tobytes() == b[outside].tobytes() and a[t] != b[t]
    _, lora0 = run_doc(model, val, tg.dataclasses.replace(h, ttt_grad_steps=0), RT, lora=True)
    np.testing.assert_allclose(lora0.nll.numpy(), a, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# End to end: EVAL_ARTIFACT with EVAL_MODE=doc


E2E_TOKENS = 6000  # the first documents of the tiny val shard: a few seconds per run


@pytest.fixture(scope="module")
def artifact(tiny_data, tmp_path_factory):
    """An artifact of the noisy tiny model, next to a data/ folder with the tokenizer and the
    first E2E_TOKENS tokens of the tiny val shard."""
    base = tmp_path_factory.mktemp("doc_e2e")
    h = tg.Hyperparameters.from_env(doc_env(tiny_data))
    state = {k: v.detach() for k, v in noisy_model(h).state_dict().items()}
    blob = tg.pack_artifact(tg.quantize_state(state, {}, tg.QuantSpec.of(h)), tg.ModelConfig.of(h), "zstd")
    (base / "model.ptz").write_bytes(blob)
    (base / "data").mkdir()
    tokens = tg.read_shard(str(tiny_data / "fineweb_val_000000.bin"))[:E2E_TOKENS]
    tg.write_shard(str(base / "data" / "fineweb_val_000000.bin"), tokens)
    return base / "model.ptz"


def e2e_env(tiny_data, artifact, run_id, **overrides):
    env = doc_env(tiny_data, RUN_ID=run_id, EVAL_ARTIFACT=artifact, TOKEN_LOSSES_DIR="tl", TTT_BATCH_SIZE=8,
                  TTT_CHUNK_SIZE=16, PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=32, TTT_WARM_START_A=0,
                  GLOBAL_TTT_CHUNK_TOKENS=1024, GLOBAL_TTT_BATCH_SEQS=16, **overrides)
    return dict(env, DATA_PATH=str(artifact.parent / "data"))


@pytest.fixture(scope="module")
def doc_run(tiny_data, artifact, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("doc_run")
    proc = run_script(e2e_env(tiny_data, artifact, "doc"), cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


@pytest.mark.slow
def test_doc_mode_end_to_end_phases_files_and_clock(doc_run, tiny_data):
    s = json.loads((doc_run / "logs" / "doc.json").read_text())
    log = (doc_run / "logs" / "doc.txt").read_text()
    assert list(s["eval"]) == ["roundtrip", "doc", "ttt"] and s["val_bpb"] == s["eval"]["ttt"]["val_bpb"]
    n = s["eval"]["roundtrip"]["tokens"]
    for phase in ("doc", "ttt"):
        assert (s["eval"][phase]["tokens"], s["eval"][phase]["bytes"]) == (n, s["eval"]["roundtrip"]["bytes"])
        a = np.load(doc_run / "tl" / f"{phase}.npy")
        scored = ~np.isnan(a)
        assert not scored[0] and scored[1:n + 1].all() and not scored[n + 1:].any()
        assert float(np.nansum(a.astype(np.float64))) == pytest.approx(s["eval"][phase]["val_loss"] * n, rel=1e-9)
    assert s["eval"]["ttt"]["phases_run"] == 2 and s["compliance"]["ok"]
    docs = int((tg.read_shard(str(tiny_data / "fineweb_val_000000.bin"))[:n] == BOS).sum())  # the first is BOS
    for needle in (f"eval:documents:{docs} ", "final_int6_doc_isolated_exact ", "ttt:start mode:lora ",
                   "ttt:phase 1/2 docs:16 ", "ttt:phase 2/2 docs:32 ", "eval:model_ready "):
        assert needle in log, needle
    # the clock runs from process start: it holds every phase and the loading before them
    ready = float(re.search(r"^eval:model_ready clock:(\S+)s", log, re.M).group(1))
    phases_ms = sum(r["time_ms"] for r in s["eval"].values())
    assert ready > 0 and s["eval_time_ms"] >= 1000 * (ready - 0.05) + phases_ms - 1  # ready is logged to 0.1 s


@pytest.mark.slow
def test_stream_without_bos_is_one_document_and_the_log_says_so(tiny_data, artifact, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    tokens = tg.read_shard(str(tiny_data / "fineweb_val_000000.bin"))[:2000]
    tg.write_shard(str(data / "fineweb_val_000000.bin"), tokens[tokens != BOS])
    monkeypatch.chdir(tmp_path)
    env = dict(e2e_env(tiny_data, artifact, "nobos", TTT_ENABLED=0), DATA_PATH=str(data))
    assert tg.main(env) == 0
    out = capsys.readouterr().out
    assert "eval:documents:1 " in out and "scored as one document" in out
    s = json.loads((tmp_path / "logs" / "nobos.json").read_text())
    assert s["eval"]["doc"]["tokens"] == s["eval"]["roundtrip"]["tokens"]


@pytest.mark.slow
def test_two_processes_give_the_same_totals(doc_run, tiny_data, artifact, tmp_path):
    """The queue split over 2 ranks: same tokens and bytes, the doc phase's per-token NLLs bit for
    bit, and LoRA TTT with 2 global phases equal up to the order of float sums (gradient
    all-reduce in the phases, loss totals)."""
    proc = run_script(e2e_env(tiny_data, artifact, "doc2"), tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((doc_run / "logs" / "doc.json").read_text())["eval"]
    two = json.loads((tmp_path / "logs" / "doc2.json").read_text())["eval"]
    for phase in ("doc", "ttt"):
        assert (two[phase]["tokens"], two[phase]["bytes"]) == (one[phase]["tokens"], one[phase]["bytes"])
    assert two["doc"]["val_bpb"] == pytest.approx(one["doc"]["val_bpb"], abs=1e-9)
    assert two["ttt"]["val_bpb"] == pytest.approx(one["ttt"]["val_bpb"], abs=1e-5)
    print(f"1 vs 2 processes, ttt val_bpb diff {abs(two['ttt']['val_bpb'] - one['ttt']['val_bpb']):.2e}")
    assert np.load(doc_run / "tl" / "doc.npy").tobytes() == np.load(tmp_path / "tl" / "doc.npy").tobytes()


def test_compile_warm_up_uses_random_tokens_and_the_eval_graph(h, monkeypatch):
    """On CUDA with COMPILE the eval forward is compiled before the first phase on random tokens
    (rule A4), with the layout score_windows passes, so the first real batch reuses the graph."""
    import torch._dynamo
    monkeypatch.setattr(tg.Runtime, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(tg.Runtime, "sync", lambda self: None)
    model = noisy_model(h)
    seen = []
    compiled = torch.compile(tg.nll_function(model), dynamic=False, fullgraph=True, backend="eager")

    def nll_fn(x, y):
        seen.append((x.clone(), y.clone()))
        return compiled(x, y)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tg.compile_warm_up(nll_fn, tg.dataclasses.replace(h, compile=1), RT, h.vocab_size)
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    tg.score_windows(nll_fn, val, tg.sliding_windows(len(val.tokens) - 1, L, L), h.eval_batch_seqs, RT)
    (x, y), real = seen[0], seen[1]
    assert x.shape == y.shape == real[0].shape == (h.eval_batch_seqs, L) and x.dtype == real[0].dtype
    assert not torch.equal(x, real[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------------------------
# EVAL_PHASES: exactly the phases asked for; the others skipped (null), never a fake number


@pytest.mark.slow
def test_eval_phases_ttt_runs_only_ttt_and_the_audit_still_works(tiny_data, artifact, tmp_path, monkeypatch, capsys):
    """EVAL_PHASES=ttt (PRESET=frontier's) on an artifact, RECORD=1: only the LoRA TTT phase runs (one
    score line), roundtrip and doc are logged and summarized as skipped (null), the headline is the
    TTT score, and the audit checks it against the validation stream's own target count (a RECORD=1
    run still exits 3 when a rule breaks)."""
    monkeypatch.chdir(tmp_path)
    env = e2e_env(tiny_data, artifact, "only", EVAL_PHASES="ttt", RECORD=1)
    left, real = [], tg.lora_ttt_evaluate
    monkeypatch.setattr(tg, "lora_ttt_evaluate", lambda *a, deadline, **k: left.append(deadline - time.perf_counter())
                        or real(*a, deadline=deadline, **k))
    assert tg.main(env) == 0
    # the planner's deadline is eval_deadline_seconds after the eval clock's start (here the process start)
    assert tg.eval_deadline_seconds(tg.Hyperparameters.from_env(env)) == 582.0 and 582.0 - 120 < left[0] < 582.0
    out = capsys.readouterr().out
    scores = re.findall(r"^(\w+)_exact val_loss", out, re.M)
    assert scores == ["legal_ttt"], scores
    assert "eval:phases run:ttt skipped:roundtrip,doc (EVAL_PHASES=ttt)" in out
    assert "final_int6_roundtrip skipped (EVAL_PHASES=ttt)" in out and "final_int6_doc_isolated skipped" in out
    assert "eval:compile_warmup" not in out and "ttt:start mode:lora " in out
    s = json.loads((tmp_path / "logs" / "only.json").read_text())
    assert s["eval"]["roundtrip"] is None and s["eval"]["doc"] is None and list(s["eval"]) == ["ttt", "roundtrip", "doc"]
    assert s["val_bpb"] == s["eval"]["ttt"]["val_bpb"]
    tokens = tg.read_shard(str(artifact.parent / "data" / "fineweb_val_000000.bin"))
    he = tg.Hyperparameters.from_env(env)
    seq = max(he.train_seq_len, he.eval_seq_len)  # load_validation keeps whole sequences of targets
    assert s["compliance"]["val_positions"] == (len(tokens) - 1) // seq * seq == s["eval"]["ttt"]["tokens"]
    assert s["compliance"]["ok"] and s["compliance"]["phases_skipped"] == ["roundtrip", "doc"]
    assert np.load(tmp_path / "tl" / "ttt.npy").shape and not (tmp_path / "tl" / "doc.npy").exists()
    monkeypatch.setattr(tg, "EVAL_LIMIT_MS", 0)  # any eval overruns: B3 broken, the record attempt fails
    assert tg.main({**env, "RUN_ID": "only2"}) == 3
    assert json.loads((tmp_path / "logs" / "only2.json").read_text())["compliance"]["broken"][0].startswith("B3")


@pytest.mark.parametrize("env,message", [
    ({"EVAL_PHASES": "ttt,rountrip"}, "EVAL_PHASES=ttt,rountrip: must be auto or a comma list of distinct phases of "
                                      "prequant,roundtrip,doc,sliding,slot,ttt"),
    ({"EVAL_PHASES": "ttt,ttt"}, "EVAL_PHASES=ttt,ttt: must be auto or a comma list of distinct phases"),
    ({"EVAL_PHASES": ""}, "EVAL_PHASES=: must be auto or a comma list"),
    ({"EVAL_PHASES": "ttt", "TTT_ENABLED": "0"}, "EVAL_PHASES=ttt: ttt needs TTT_ENABLED=1"),
    ({"EVAL_PHASES": "doc"}, "EVAL_PHASES=doc: doc needs EVAL_MODE=doc"),
    ({"EVAL_PHASES": "roundtrip,slot"}, "EVAL_PHASES=roundtrip,slot: slot needs SLOT_ENABLED=1"),
    ({"EVAL_PHASES": "slot", "SLOT_ENABLED": "1"}, "EVAL_PHASES=slot: needs a phase besides slot"),
    ({"EVAL_PHASES": "prequant", "EVAL_ARTIFACT": "x.ptz"}, "EVAL_PHASES=prequant: prequant needs the trained weights"),
    ({"PRESET": "frontier", "TTT_ENABLED": "0"}, "EVAL_PHASES=ttt: ttt needs TTT_ENABLED=1"),
])
def test_eval_phases_validated(env, message):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env(env)
    assert str(e.value).startswith(message), str(e.value)


def test_eval_phases_run_auto_is_todays_and_a_list_runs_in_order():
    h = tg.Hyperparameters()
    assert tg.eval_phases_run(h) == ["prequant", "roundtrip", "sliding", "ttt"] and tg.eval_phases_skipped(h) == []
    doc = tg.dataclasses.replace(h, eval_mode="doc", slot_enabled=True)
    assert tg.eval_phases_run(doc) == ["prequant", "roundtrip", "doc", "slot", "ttt"]
    assert tg.eval_phases_run(tg.dataclasses.replace(doc, eval_artifact="a.ptz"))[0] == "roundtrip"
    picked = tg.dataclasses.replace(doc, eval_phases="ttt, sliding,roundtrip")
    assert tg.eval_phases_run(picked) == ["roundtrip", "sliding", "ttt"]
    assert tg.eval_phases_skipped(picked) == ["prequant", "doc", "slot"]
    for preset in ("frontier", "pr1855"):
        f = tg.Hyperparameters.from_env({"PRESET": preset})
        assert tg.eval_phases_run(f) == ["ttt"] and f.ttt_split_batches
