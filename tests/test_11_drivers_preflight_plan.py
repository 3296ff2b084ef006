"""PREFLIGHT=plan (issue 19 item 4): the 8xH100 run modelled on any CPU, nothing trained.

The memory model's parts against independent counts (FA3's backward scratch against the review's
53 GB, saved activations of single ops, optimizer state from the parameter shapes), the varlen
bound on today's and on a capacity-bounded `document_segments`, the eval projection against a hand
computation, the JSON table, NO-GO when a phase does not fit, and no validation file opened. The
full-size frontier plan: NO-GO on today's behaviour (pinned by copies of today's
`document_segments` and round-robin schedule, so it stays a test of the model after the fixes), and
GO with the fixes (compiled LoRA TTT, as lora_ttt_compiled reports), and the
split LPT schedule's per-rank balance on the same documents.

    python3 -m pytest -q tests/test_11_drivers_preflight_plan.py
"""

import builtins
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import SAMPLE_SHARDS, SAMPLE_TOKENIZER, SHARED_DATA, tiny_env

# The shipped sp8192 sample: its PLAN_LENGTHS_NAME holds the stand-in train shard's 2,677 document
# lengths (tests/tools/make_sample_data.py), so the full-size plans below run in any clone.
SP8192 = SAMPLE_SHARDS[8192]
SP8192_TOKENIZER = SAMPLE_TOKENIZER[8192]
needs_sp8192 = pytest.mark.skipif(not (SP8192 / tg.PLAN_LENGTHS_NAME).is_file(), reason="needs the shipped sample")
PLAN_ROWS = ["memory: train micro-batch", "memory: LoRA TTT chunk", "memory: global TTT step",
             "varlen sequences per call", "varlen calls on single-document rows", "eval seconds (projected)"]


def frontier(**overrides) -> tg.Hyperparameters:
    env = {"PRESET": "frontier", "DATA_PATH": str(SP8192), "TOKENIZER_PATH": str(SP8192_TOKENIZER), "BOS_ID": "1"}
    return tg.Hyperparameters.from_env({**env, **{k: str(v) for k, v in overrides.items()}})


def todays_document_segments(ids, bos_id, seg_len=0):
    """document_segments as of 5208198: cu_seqlens padded to B*T+1 entries (issue 19 finding 1)."""
    B, T = ids.shape
    starts = ids == bos_id
    starts[:, 0] = True
    pos = torch.nonzero_static(starts.flatten(), size=B * T, fill_value=B * T).flatten()
    return tg.VarlenSegments(torch.cat((pos, pos.new_full((1,), B * T))).int(), T)


def bounded_document_segments(ids, bos_id, seg_len=0, capacity=2048):
    """The review's fix (a): a fixed capacity of segments, padded with the total length."""
    B, T = ids.shape
    starts = ids == bos_id
    starts[:, 0] = True
    pos = torch.nonzero_static(starts.flatten(), size=capacity - 1, fill_value=B * T).flatten()
    return tg.VarlenSegments(torch.cat((pos, pos.new_full((1,), B * T))).int(), T)


def todays_lora_schedule(spans, h, world_size):
    """lora_schedule as of 5208198: round-robin within segments, phases on the queue prefix."""
    queue = tg.ttt_queue(spans, h.ttt_batch_size)
    order = np.concatenate(queue)
    bounds = tg.phase_boundaries(len(spans), h.ttt_batch_size, h.phased_ttt_prefix_docs, h.phased_ttt_num_phases)
    cuts = [0] + [min(k, len(queue)) for k, _ in bounds] + [len(queue)]
    mine = [[list(range(cuts[s] + r, cuts[s + 1], world_size)) for s in range(len(cuts) - 1)]
            for r in range(world_size)]
    work = [tg.lora_batch_work(spans[q], h.ttt_chunk_size, h.eval_seq_len) for q in queue]
    return tg.LoraSchedule(queue, mine, work, [order[:b] for _, b in bounds], cuts)


def pin_todays_ttt_rows(monkeypatch):
    """Before F1b, LoRA and global TTT rows went through the document-masked (varlen) forward: the
    plan measures them with doc_mask=False now, so today's behaviour is pinned by ignoring it."""
    real = tg.GPT.forward_hidden
    monkeypatch.setattr(tg.GPT, "forward_hidden", lambda self, ids, doc_mask=True: real(self, ids, True))


def spans_of(lengths):
    n = np.asarray(lengths, dtype=np.int64)
    return np.stack((np.cumsum(n) - n, n), axis=1)


def test_fa3_workspace_is_the_reviews_53_gb_at_the_training_shape():
    """48x2048 with cu_seqlens of B*T+1 entries: rows = 98,304 + 98,304 * 128 = 12,681,216;
    dq_accum 8x64 fp32, softmax_d + lse 2x8 fp32, dk/dv accum 2x4x64 fp32 per row."""
    call = dict(varlen=True, seqs=98_304, total_q=98_304, T=2048, heads=8, kv_heads=4, head_dim=64)
    rows = 12_681_216
    assert tg.fa3_backward_workspace_bytes(call) == rows * 4 * (8 * 64 + 2 * 8 + 2 * 4 * 64)
    assert tg.fa3_backward_workspace_bytes(call) / 1e9 == pytest.approx(52.75, abs=0.01)
    dense = dict(call, varlen=False, seqs=48, total_q=98_304)  # 48 rows of 2048 (a multiple of 128)
    assert tg.fa3_backward_workspace_bytes(dense) == 98_304 * 4 * (8 * 66 + 2 * 4 * 64)
    no_gqa = dict(dense, kv_heads=8, T=2000)  # rounded up to 2048 per row, no dk/dv accumulators
    assert tg.fa3_backward_workspace_bytes(no_gqa) == 48 * 2048 * 4 * 8 * 66


def test_saved_activation_bytes_counts_what_autograd_keeps():
    w = torch.nn.Parameter(torch.empty(64, 32, device="meta"))
    x = torch.empty(6, 10, 32, device="meta")
    saved, out = tg.saved_activation_bytes(lambda: F.linear(x, w).sum(), exclude=[w])
    assert saved == 6 * 10 * 32 * 4 and out.requires_grad  # the input, for w's gradient; w itself excluded
    x2 = torch.empty(12, 10, 32, device="meta")
    assert tg.saved_activation_bytes(lambda: F.linear(x2, w).sum(), exclude=[w])[0] == 2 * saved
    y = torch.empty(5, 7, device="meta", dtype=torch.bfloat16, requires_grad=True)
    assert tg.saved_activation_bytes(lambda: (y * y).sum())[0] == 5 * 7 * 2  # one storage saved twice: once
    with torch.no_grad():
        assert tg.saved_activation_bytes(lambda: F.linear(x, w).sum(), exclude=[w])[0] == 0


@pytest.mark.parametrize("world", [1, 3])
def test_train_state_bytes_against_the_parameter_shapes(hparams, runtime, world):
    model = tg.GPT(tg.ModelConfig.of(hparams))
    n_params = sum(p.numel() for p in model.parameters())
    muon = tg.build_optimizers(model, hparams, runtime)[1].param_groups[0]["params"]
    shapes = {}
    for p in muon:
        shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    muon_share = sum(-(-n // world) * int(np.prod(s)) for s, n in shapes.items())  # this rank's momentum
    adam = n_params - sum(p.numel() for p in muon)
    state = tg.train_state_bytes(model, hparams, world)
    assert state == dict(params=4 * n_params, grads=4 * n_params, optimizer=4 * (2 * adam + muon_share + n_params))
    swa = tg.train_state_bytes(model, tg.dataclasses.replace(hparams, weight_average="blend"), world)
    assert swa["optimizer"] - state["optimizer"] == 4 * n_params  # the SWA sum next to the EMA


def test_lora_largest_chunk_and_global_rows_from_chunk_rows():
    h = tg.dataclasses.replace(tg.Hyperparameters(), ttt_batch_size=4, ttt_chunk_size=48, eval_seq_len=256,
                               phased_ttt_num_phases=1, phased_ttt_prefix_docs=6, global_ttt_chunk_tokens=1024,
                               global_ttt_batch_seqs=3)
    spans = spans_of([700, 300, 260, 250, 100, 90, 80, 10, 5])
    plan = tg.lora_schedule(spans, h, 2)
    best = max(((len(length), int(length.max())) for q in plan.queue
                for ci in range(-(-int(spans[q, 1].max()) // 48))
                for length in [tg.chunk_rows(spans[q], ci, 48, 256)[1]]), key=lambda s: s[0] * s[1])
    assert tg.lora_largest_chunk(spans, plan, h) == best == (4, 256)  # 4 docs past 240 tokens, rows of 256
    # phase 1 trains on the 6 shortest of the 8 documents scored before it (2 batches of 4):
    # 10 | 80 | 90 | 100 | 250 | 256,4 -> steps of 1024 tokens
    pieces, step_of = tg.global_pieces(spans[plan.phase_docs[0]], h)
    assert pieces[:, 1].sum() == 10 + 80 + 90 + 100 + 250 + 260
    assert tg.global_rows_per_forward(spans, plan, h, 2) == min(3, -(-int(np.bincount(step_of).max()) // 2))


def test_eval_projection_against_a_hand_computation(monkeypatch):
    """World 2, one document per batch, no phases, round robin: rank 0 runs batches 0 and 2, rank 1 batch 1.
    The hand computation models the eager LoRA path (pinned); the compiled one (the default) at the end."""
    h = tg.dataclasses.replace(tg.Hyperparameters(), eval_mode="doc", ttt_balance="round_robin",
                               ttt_batch_size=1, ttt_chunk_size=48,
                               eval_seq_len=2048, phased_ttt_num_phases=0, ttt_grad_steps=1)
    spans = spans_of([5000, 3000, 100])
    plan = tg.lora_schedule(spans, h, 2)
    assert plan.mine == [[[0, 2]], [[1]]] and plan.phase_docs == []

    def work(n):  # rows x padded length per chunk, one document
        return sum(min((ci + 1) * 48, n, 2048) for ci in range(-(-n // 48)))
    assert plan.work == [work(5000), work(3000), work(100)]
    lora = 1.8 * max(work(5000) / 0.38e6 + work(100) / 0.5e6, work(3000) / 0.38e6)
    fwd = 47.85e6 / 6.7 / 8 * 2
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, rt=None: False)
    parts = tg.plan_eval_seconds(h, spans, plan, 2)
    assert parts["lora ttt"] == pytest.approx(lora)
    assert parts["prequant"] == parts["roundtrip"] == pytest.approx(4 * 2048 / fwd)  # 8,100 tokens: 4 windows
    assert parts["doc windows"] == pytest.approx(len(tg.doc_windows(spans, 2048, 48)) * 2048 / fwd)
    assert parts["eval compiles"] == 2 * tg.EVAL_COMPILE_S and "global phases" in parts
    assert parts["global phases"] == 0
    # GPTQ_SPLIT on 2 ranks halves the GPTQ part exactly here: the default model's GPTQ costs split into two
    # equal halves (tests/test_gptq_split.py); compression stays on rank 0
    assert parts["quantize+compress"] == pytest.approx(tg.RANK0_COMPRESS_S + tg.GPTQ_S / 2)
    alone = tg.plan_eval_seconds(tg.dataclasses.replace(h, gptq_split=False), spans, plan, 2)["quantize+compress"]
    assert alone == tg.RANK0_COMPRESS_S + tg.GPTQ_S
    two = tg.plan_eval_seconds(tg.dataclasses.replace(h, ttt_grad_steps=2), spans, plan, 2)["lora ttt"]
    assert two == pytest.approx(lora * (1 + 2 * tg.STEP_COST) / (1 + tg.STEP_COST))
    # COMPILE=-1 (the default: compiled on CUDA): the LoRA path runs compiled, no eager factor, its compile counted
    monkeypatch.undo()
    comp = tg.plan_eval_seconds(h, spans, plan, 2)
    assert comp["lora ttt"] == pytest.approx(lora / tg.EAGER_TTT_FACTOR) and comp["ttt compile"] == tg.RECORD_TTT_COMPILE_S


def test_varlen_bound_today_and_with_a_bounded_capacity(monkeypatch):
    """The record's shapes (48x2048 training micro-batches on 8 ranks, 64-document LoRA batches) on
    a one-layer model: today's cu_seqlens make FA3's batch B*T (98,304 > 65,535: NO-GO) and LoRA /
    global TTT rows go through varlen; a capacity of 2048 segments is under the bound."""
    h = tg.dataclasses.replace(tg.Hyperparameters.from_env({"PRESET": "frontier"}), bos_id=1, num_layers=1,
                               num_loops=0, parallel_start_layer=0, xsa_last_n=1,
                               ttt_split_batches=False)  # whole 64-document batches, as before the split
    spans = spans_of([4096] * 64 + [300] * 70)
    plan = tg.lora_schedule(spans, h, 8)
    monkeypatch.setattr(tg, "document_segments", todays_document_segments)
    pin_todays_ttt_rows(monkeypatch)
    phases = {p["name"]: p for p in tg.plan_phase_memory(h, spans, plan)}
    assert [c["seqs"] for c in phases["train micro-batch"]["calls"]] == [48 * 2048]
    assert phases["LoRA TTT chunk"]["shape"] == (64, 2048)
    assert [c["seqs"] for c in phases["LoRA TTT chunk"]["calls"]] == [64 * 2048]
    rows = {r[0]: r for r in tg.preflight_plan_rows(h, spans, plan)}
    assert rows["varlen sequences per call"][1:4] == (64 * 2048, 65_535, "NO-GO")
    assert rows["varlen calls on single-document rows"][3] == "NO-GO"
    monkeypatch.setattr(tg, "document_segments", bounded_document_segments)
    rows = {r[0]: r for r in tg.preflight_plan_rows(h, spans, plan)}
    assert rows["varlen sequences per call"][1:4] == (2047, 65_535, "ok")


def test_plan_run_writes_json_opens_no_val_file_and_says_no_go_when_a_phase_does_not_fit(
        tiny_data, tmp_path, monkeypatch, capsys):
    opened = []
    real_open, real_fromfile = builtins.open, np.fromfile
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(np, "fromfile", lambda f, *a, **k: opened.append(str(f)) or real_fromfile(f, *a, **k))
    monkeypatch.chdir(tmp_path)
    env = tiny_env(tiny_data, PREFLIGHT="plan", EVAL_MODE="doc", TTT_CHUNK_SIZE=16, TTT_BATCH_SIZE=4,
                   PHASED_TTT_NUM_PHASES=2, RUN_ID="plan", PREFLIGHT_GPU_GIB="0.001", DOC_MASKING=1,
                   PREFLIGHT_VAL_TOKENS=20_000, PREFLIGHT_VAL_DOCS=100)
    assert tg.main(env) == 4
    out = capsys.readouterr()
    table = json.loads((tmp_path / "logs" / "plan.preflight.json").read_text())
    assert table["verdict"] == "NO-GO" and [r["name"] for r in table["rows"]] == PLAN_ROWS
    assert all(set(r) == {"name", "value", "limit", "status", "detail"} for r in table["rows"])
    assert all(isinstance(r["value"], (int, float)) and isinstance(r["limit"], (int, float)) for r in table["rows"])
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["memory: train micro-batch"]["status"] == "NO-GO"  # tiny: eager training, 1 MiB per rank
    assert rows["memory: train micro-batch"]["limit"] == 0.001
    assert "error: preflight: NO-GO: memory: train micro-batch" in out.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["logs", "plan.preflight.json", "plan.txt"]
    assert opened and not [p for p in opened if "fineweb_val_" in p]  # the val shard is never opened
    assert any("fineweb_train_" in p for p in opened)  # document lengths come from a train shard
    env.pop("PREFLIGHT_GPU_GIB")
    assert tg.main(env) in (0, 4)
    rows = {r["name"]: r for r in json.loads((tmp_path / "logs" / "plan.preflight.json").read_text())["rows"]}
    assert rows["memory: train micro-batch"]["status"] == "ok"  # a tiny model fits 79.6 GiB


def test_plan_fields_validated():
    with pytest.raises(tg.ConfigError, match="PREFLIGHT="):
        tg.Hyperparameters.from_env({"PREFLIGHT": "yes"})
    with pytest.raises(tg.ConfigError, match="PREFLIGHT_WORLD_SIZE"):
        tg.Hyperparameters.from_env({"PREFLIGHT_WORLD_SIZE": "0"})


@needs_sp8192
@pytest.mark.slow
def test_frontier_plan_is_no_go_on_todays_behaviour(monkeypatch):
    """Today's code (pinned): FA3's batch of 98,304/131,072 sequences, the eager 64x2048 LoRA chunk
    over 79.6 GiB, and an eval projected far over 600 s (eager, rank 0 holding the longest docs)."""
    monkeypatch.setattr(tg, "document_segments", todays_document_segments)
    monkeypatch.setattr(tg, "lora_schedule", todays_lora_schedule)
    pin_todays_ttt_rows(monkeypatch)
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, *a: False)
    monkeypatch.setattr(tg, "eval_phases_run", lambda h: ["prequant", "roundtrip", "doc", "ttt"])
    h = frontier(TTT_SPLIT_BATCHES=0)  # today's whole 64-document batches (todays_lora_schedule ignores it too)
    spans = tg.plan_documents(h)
    assert len(spans) == 50_000 and abs(int(spans[:, 1].sum()) - 40_540_000) < 40_540
    rows = {r[0]: r for r in tg.preflight_plan_rows(h, spans, tg.lora_schedule(spans, h, 8))}
    assert list(rows) == PLAN_ROWS
    assert rows["memory: LoRA TTT chunk"][3] == "NO-GO" and rows["memory: LoRA TTT chunk"][1] > 79.6
    assert rows["varlen sequences per call"][1] == 64 * 2048 and rows["varlen sequences per call"][3] == "NO-GO"
    assert rows["varlen calls on single-document rows"][3] == "NO-GO"
    assert rows["eval seconds (projected)"][1] > 600 and rows["eval seconds (projected)"][3] == "NO-GO"


@needs_sp8192
@pytest.mark.slow
def test_frontier_plan_is_go_after_the_fixes():
    """Bounded varlen, plain attention on single-document rows, EVAL_PHASES=ttt, the split LPT
    schedule and compiled LoRA TTT: GO, the eval projected under the planner's deadline (600 s
    less EVAL_MARGIN), each part as the phases run: no eval-forward compile, no diagnostic."""
    h = frontier()
    assert tg.lora_ttt_compiled(h)  # the plan models the compiled LoRA path the run takes (COMPILE=-1: on for CUDA)
    spans = tg.plan_documents(h)
    plan = tg.lora_schedule(spans, h, 8)
    rows = {r[0]: r for r in tg.preflight_plan_rows(h, spans, plan)}
    assert rows["varlen sequences per call"][1] <= 4096  # well under 65,535
    assert rows["varlen calls on single-document rows"][1] == 0
    parts = tg.plan_eval_seconds(h, spans, plan, 8)
    assert set(parts) == {"quantize+compress", "decompress", "eval compiles", "ttt compile", "lora ttt", "global phases"}
    assert parts["eval compiles"] == 0 and parts["ttt compile"] == tg.RECORD_TTT_COMPILE_S
    assert rows["eval seconds (projected)"][1] == pytest.approx(sum(parts.values()), abs=0.05)
    assert rows["eval seconds (projected)"][2] == 582.0 == 600 * (1 - tg.EVAL_MARGIN)
    assert rows["eval seconds (projected)"][1] < 582.0
    assert all(r[3] != "NO-GO" for r in rows.values())


def independent_batch_work(n: np.ndarray, chunk: int, seq_len: int) -> int:
    """Token positions of one LoRA batch of documents of lengths n: chunk ci holds the documents
    longer than ci x chunk, each padded to the longest one's (ci + 1) x chunk, at most seq_len."""
    ci = np.arange(-(-int(n.max()) // chunk))
    rows = (n[None, :] > ci[:, None] * chunk).sum(1)
    return int((rows * np.minimum(np.minimum((ci + 1) * chunk, n.max()), seq_len)).sum())


@needs_sp8192
@pytest.mark.slow
def test_frontier_schedule_balances_every_phase_segment_on_the_plan_documents():
    """PRESET=frontier (LPT, TTT_SPLIT_BATCHES=1) on plan_documents' 50,000 documents over 8 ranks:
    in every phase segment the most loaded rank's work (token positions, summed independently from
    the document lengths) is within 1.05x of the mean; each document runs exactly once."""
    h = frontier()
    spans = tg.plan_documents(h)
    plan = tg.lora_schedule(spans, h, 8)
    assert sorted(np.concatenate(plan.queue).tolist()) == list(range(len(spans)))
    assert len(plan.mine[0]) == h.phased_ttt_num_phases + 1
    for s in range(len(plan.mine[0])):
        loads = [sum(independent_batch_work(spans[plan.queue[b], 1], h.ttt_chunk_size, h.eval_seq_len)
                     for b in rank[s]) for rank in plan.mine]
        assert all(plan.cuts[s] <= b < plan.cuts[s + 1] for rank in plan.mine for b in rank[s])
        assert max(loads) <= 1.05 * np.mean(loads), (s, max(loads) / np.mean(loads))
    unsplit = tg.lora_schedule(spans, tg.dataclasses.replace(h, ttt_split_batches=False), 8)
    first = [sum(unsplit.work[b] for b in rank[0]) for rank in unsplit.mine]
    assert max(first) > 1.5 * np.mean(first)  # without the split, the longest documents' batches dominate


def test_preflight_doc_mode_runs_the_real_eval_phases_on_training_tokens(tiny_data, tmp_path, monkeypatch, capsys):
    """PREFLIGHT=1 with EVAL_MODE=doc (issue 19 item 5): lora_ttt_evaluate twice (a long and a
    short batch, no phases) and global_ttt once, on training tokens; the val shard is garbage of
    the right size, so reading it would fail; the projection names the doc phases and is in the JSON."""
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_data.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    val = data / "fineweb_val_000000.bin"
    val.write_bytes(b"\xff" * val.stat().st_size)
    called = []
    for name in ("lora_ttt_evaluate", "global_ttt"):
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, _real=real, _name=name, **k: called.append((_name, len(a[2])))
                            or _real(*a, **k))
    monkeypatch.chdir(tmp_path)
    env = tiny_env(data, PREFLIGHT=1, PREFLIGHT_STEPS=2, PREFLIGHT_EVAL_WINDOWS=8, EVAL_MODE="doc", TTT_CHUNK_SIZE=32,
                   TTT_BATCH_SIZE=4, PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_CHUNK_TOKENS=1024, RUN_ID="doc",
                   PREFLIGHT_VAL_TOKENS=20_000, PREFLIGHT_VAL_DOCS=100)
    assert tg.main(env) in (0, 4)
    out = capsys.readouterr().out
    assert [c[0] for c in called] == ["lora_ttt_evaluate", "lora_ttt_evaluate", "global_ttt"]
    assert called[0][1] == called[1][1] == 4  # one batch of TTT_BATCH_SIZE documents each
    assert "preflight:doc lora_long:" in out
    table = json.loads((tmp_path / "logs" / "doc.preflight.json").read_text())
    row = {r["name"]: r for r in table["rows"]}["eval + post-train"]
    assert "doc windows" in row["value"] and "lora ttt" in row["value"] and "global phases" in row["value"]
    assert table["verdict"] == ("NO-GO" if any(r["status"] == "NO-GO" for r in table["rows"]) else "GO")


@pytest.mark.slow
def test_bare_frontier_plan_in_a_fresh_clone_models_the_shipped_lengths(tmp_path, monkeypatch, capsys):
    """`PRESET=frontier PREFLIGHT=plan python3 train_gpt.py` with no data in the working directory:
    the shipped sample stands in (logged), its lengths file is what the plan reads (the same 2,677
    lengths as the stand-in train shard, when ../shared has it), and the verdict is GO."""
    monkeypatch.chdir(tmp_path)
    assert tg.main({"PRESET": "frontier", "PREFLIGHT": "plan", "RUN_ID": "bare"}) == 0
    log = (tmp_path / "logs" / "bare.txt").read_text()
    assert f"modelled with the shipped sample {SP8192}" in log and "hparam:data_path=" + repr(str(SP8192)) in log
    assert f"preflight:plan document lengths: {SP8192 / tg.PLAN_LENGTHS_NAME} (2677 documents, 4723868 tokens)" in log
    table = json.loads((tmp_path / "logs" / "bare.preflight.json").read_text())
    assert table["verdict"] == "GO"
    standin = SHARED_DATA / "standin_sp8192" / "fineweb_train_000000.bin"
    if standin.is_file():  # the shipped lengths are the stand-in shard's, exactly
        lengths = tg.document_spans(np.asarray(tg.read_shard(str(standin))), 1)[:, 1]
        assert np.array_equal(np.load(SP8192 / tg.PLAN_LENGTHS_NAME), lengths)
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "PREFLIGHT": "plan", "DATA_PATH": "/nonexistent"})
    assert tg.plan_sample_data(h)[0].data_path == str(SP8192)
    other, note = tg.plan_sample_data(tg.dataclasses.replace(h, preflight="0"))
    assert (other.data_path, note) == ("/nonexistent", "")  # only the plan falls back; a run gets its error
