"""PREFLIGHT=1 (issue 8): the go/no-go run that times every phase on training tokens only.

One real preflight on the tiny preset (the table is printed, exit 0, nothing written but the log,
no validation token read: the val shard is garbage of the right size and every read_shard call is
recorded), and the projection arithmetic of `preflight_table` against hand computations.

    python3 -m pytest -q tests/test_11_drivers_preflight.py
"""

import json
import math
import shutil

import pytest

import train_gpt as tg
from conftest import tiny_env

MEASURED = dict(train_compile_s=30.0, step_s=0.1, loss_nan=0.0, peak_alloc_mib=0.0, peak_reserved_mib=0.0,
                calib_s=5.0, selfgen_s=0.0, gptq_s=1.5, quantize_s=2.0, compress_s=3.0, decompress_s=0.25,
                model_bytes=1_000_000.0, payload_bytes=2_000_000.0, eval_compile_s=4.0, window_s=0.001,
                ttt_chunk_train_s=0.5)
DOC_MEASURED = dict(lora_long_s_per_pos=2e-6, lora_short_s_per_pos=1e-6, global_s_per_token=3e-6, ttt_compile_s=7.0)


@pytest.fixture
def garbage_val_data(tiny_data, tmp_path):
    """tiny_data with its val shard overwritten by bytes that are not a shard (same size): any
    attempt to read validation tokens fails with a ConfigError naming the file."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    val = data / "fineweb_val_000000.bin"
    val.write_bytes(b"\xff" * val.stat().st_size)
    return data


def test_preflight_prints_table_writes_nothing_and_reads_no_val_token(garbage_val_data, tmp_path, monkeypatch,
                                                                       capsys):
    read = []
    real_read_shard = tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda path: read.append(path) or real_read_shard(path))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    env = tiny_env(garbage_val_data, PREFLIGHT=1, PREFLIGHT_STEPS=3, PREFLIGHT_EVAL_WINDOWS=16, RUN_ID="pf")
    assert tg.main(env) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("preflight| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["train steps", "train loss", "train + calib",
                                                      "eval + post-train", "artifact bytes", "attention, compile",
                                                      "peak memory"]
    assert all(r.rstrip().endswith(("| ok", "| warn")) for r in rows)
    assert "preflight:verdict GO" in out
    assert read and all("fineweb_train_" in p for p in read)  # training shards only
    assert sorted(p.name for p in run_dir.rglob("*")) == ["logs", "pf.preflight.json", "pf.txt"]  # no artifact
    table = json.loads((run_dir / "logs" / "pf.preflight.json").read_text())
    assert table["verdict"] == "GO" and [r["name"] for r in table["rows"]] == [r.split("|")[1].strip() for r in rows]
    assert all(set(r) == {"name", "value", "limit", "status"} for r in table["rows"])
    logged = (run_dir / "logs" / "pf.txt").read_text().splitlines()
    assert [ln for ln in logged if ln.startswith("preflight| ")] == rows


def test_preflight_projection_arithmetic(hparams, runtime, tiny_data):
    """Steps, eval seconds and bytes against computations from the hyperparameters and shard size."""
    h = tg.dataclasses.replace(hparams, max_wallclock_seconds=600.0, gptq_reserve_seconds=10.0, iterations=20_000)
    rows = {r[0]: r for r in tg.preflight_table(h, runtime, MEASURED)}
    assert rows["train steps"][1].startswith(f"{int(590 / 0.1)} steps of 100.0 ms")
    assert rows["train + calib"][1].startswith("595.0 s") and rows["train + calib"][3] == "ok"
    stream = ((tiny_data / "fineweb_val_000000.bin").stat().st_size - 1024) // 2
    positions = (stream - 1) // 128 * 128
    n_sliding = 1 + math.ceil((positions - 128) / 32)  # first window of 128, then one per 32 new positions
    n_plain, chunks = positions // 128, math.ceil(positions / 4096)
    # GPTQ (1.5 s, one rank: all of it) and decompression (0.25 s) are parts since the projection follows the phases run
    eval_s = 2 * 4.0 + 2 * n_plain * 0.001 + 2 * n_sliding * 0.001 + 2.0 + 3.0 + 1.5 + 0.25 + (chunks - 1) * 0.5
    assert rows["eval + post-train"][1].startswith(f"{eval_s:.1f} s:")
    assert f"({n_sliding} windows)" in rows["eval + post-train"][1] and f"({chunks} chunks" in rows["eval + post-train"][1]
    assert rows["artifact bytes"][1].startswith(f"{tg.code_bytes() + int(2_000_000 * tg.TRAINED_COMPRESSED_PER_PAYLOAD_BYTE)}: ")
    assert all(r[3] == "ok" for r in rows.values())


@pytest.mark.parametrize("change,row,status", [
    (dict(calib_s=11.0), "train + calib", "NO-GO"),  # calibration overruns its 10 s reserve
    (dict(loss_nan=1.0), "train loss", "NO-GO"),
    (dict(ttt_chunk_train_s=1000.0), "eval + post-train", "warn"),  # the TTT planner cuts epochs
    (dict(window_s=1.0), "eval + post-train", "NO-GO"),  # scoring alone is over 600 s
    (dict(payload_bytes=30_000_000.0), "artifact bytes", "warn"),  # a trained model over the cap: pruned
    (dict(model_bytes=16_000_000.0), "artifact bytes", "warn"),  # even now over the cap
    (dict(projected_bytes=15_990_000.0), "artifact bytes", "warn"),  # the entropy projection (SDClip) over the cap
    (dict(step_s=1.0), "train steps", "warn"),  # 590 steps < WARMDOWN_ITERS: never at full LR
], ids=["calib-over-reserve", "nan-loss", "ttt-too-slow", "scoring-too-slow", "trained-bytes-over", "bytes-over",
      "projected-bytes-over", "few-steps"])
def test_preflight_statuses(hparams, runtime, change, row, status):
    h = tg.dataclasses.replace(hparams, max_wallclock_seconds=600.0, gptq_reserve_seconds=10.0,
                               iterations=20_000, warmdown_iters=3500)
    rows = {r[0]: r for r in tg.preflight_table(h, runtime, {**MEASURED, **change})}
    assert rows[row][3] == status
    assert all(r[3] == "ok" for name, r in rows.items() if name != row)


def test_preflight_artifact_row_takes_the_entropy_projection(hparams, runtime):
    """With projected_bytes (preflight_measure's project_model_bytes for SDClip) the row uses it,
    not the payload x #1060 rate (which would say 1,166,000 here)."""
    rows = {r[0]: r for r in tg.preflight_table(hparams, runtime, {**MEASURED, "projected_bytes": 1_500_000.0})}
    assert rows["artifact bytes"][1].startswith(f"{tg.code_bytes() + 1_500_000}: ")


def test_preflight_no_go_exits_4(garbage_val_data, tmp_path, monkeypatch, capsys):
    """A limit that breaks (no wall-clock cap, ITERATIONS far past 600 s) -> NO-GO, exit status 4."""
    monkeypatch.setattr(tg, "preflight_measure", lambda h, rt: MEASURED)
    monkeypatch.chdir(tmp_path)
    assert tg.main(tiny_env(garbage_val_data, PREFLIGHT=1, ITERATIONS=100_000, RUN_ID="nogo")) == 4
    captured = capsys.readouterr()
    assert "preflight:verdict NO-GO: train + calib" in captured.out
    assert captured.err.strip() == "error: preflight: NO-GO: train + calib"


def test_preflight_fields_validated():
    with pytest.raises(tg.ConfigError, match="PREFLIGHT_STEPS"):
        tg.Hyperparameters.from_env({"PREFLIGHT_STEPS": "0"})


def test_preflight_without_ttt_projects_no_ttt_time(hparams, runtime):
    h = tg.dataclasses.replace(hparams, ttt_enabled=False)
    no_ttt = {k: v for k, v in MEASURED.items() if k != "ttt_chunk_train_s"}  # not measured without TTT
    with_ttt = {r[0]: r for r in tg.preflight_table(hparams, runtime, MEASURED)}["eval + post-train"][1]
    without = {r[0]: r for r in tg.preflight_table(h, runtime, no_ttt)}["eval + post-train"][1]
    part = lambda row, name: float(row.split(f"{name} ")[1].split()[0].rstrip(","))  # noqa: E731
    sliding_s = part(without, "sliding")
    ttt_s = part(with_ttt, "ttt scoring") + part(with_ttt, "ttt train")
    assert float(with_ttt.split()[0]) - float(without.split()[0]) == pytest.approx(ttt_s, abs=0.11)
    # TTT scores every window again, then trains; without it no TTT part at all (was "TTT 0.0": skipped costs nothing)
    assert ttt_s > sliding_s and "ttt" not in without.split(";")[0]


def doc_hparams(hparams, **kw):
    """The tiny preset in EVAL_MODE=doc on a small modelled val set (plan_documents of the train shard)."""
    return tg.dataclasses.replace(hparams, eval_mode="doc", ttt_enabled=True, doc_masking=False, ttt_chunk_size=32,
                                  ttt_batch_size=4, phased_ttt_num_phases=2, preflight_val_tokens=20_000,
                                  preflight_val_docs=100, **kw)


def lora_and_global_s(h, m):
    """LoRA TTT on one rank (its critical path: every batch in turn) at the long/short paces, plus
    the global phases' tokens at the measured rate."""
    spans = tg.plan_documents(h)
    plan = tg.lora_schedule(spans, h, 1)
    lora = sum(w * (m["lora_long_s_per_pos"] if spans[q, 1].max() >= h.eval_seq_len else m["lora_short_s_per_pos"])
               for q, w in zip(plan.queue, plan.work))
    return lora, tg.phase_tokens_run(spans, plan, h) * m["global_s_per_token"], spans


@pytest.mark.parametrize("compiled", [True, False])
def test_preflight_eval_phases_ttt_projects_only_what_runs(hparams, runtime, monkeypatch, compiled):
    """EVAL_PHASES=ttt (PRESET=frontier's): no prequant/roundtrip/sliding/doc part, no eval compile
    (doc-mode TTT compiles only the LoRA path), the LoRA compile as measured when compiled; the
    total is the sum of the parts that run, computed here from the measurements."""
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, rt=None: compiled)
    h = doc_hparams(hparams, eval_phases="ttt")
    m = {**MEASURED, **DOC_MEASURED}
    parts = tg.preflight_eval_seconds(h, runtime, m)
    lora, glob, _ = lora_and_global_s(h, m)
    assert set(parts) == {"quantize+compress", "decompress", "eval compiles", "lora ttt", "global phases"} | (
        {"ttt compile"} if compiled else set())
    expected = 2.0 + 3.0 + 1.5 + 0.25 + 0 * 4.0 + (7.0 if compiled else 0.0) + lora + glob
    assert lora > 0 and glob > 0 and sum(parts.values()) == pytest.approx(expected)
    row = {r[0]: r for r in tg.preflight_table(h, runtime, m)}["eval + post-train"][1]
    assert row.startswith(f"{expected:.1f} s: ") and row.endswith("; phases ttt")
    assert not any(w in row for w in ("prequant", "roundtrip", "sliding", "doc windows"))
    if compiled:  # no measured compile: the record's
        no_compile = {k: v for k, v in m.items() if k != "ttt_compile_s"}
        assert tg.preflight_eval_seconds(h, runtime, no_compile)["ttt compile"] == tg.RECORD_TTT_COMPILE_S


def test_preflight_eval_phases_auto_projects_the_diagnostics_again(hparams, runtime, monkeypatch):
    """EVAL_PHASES=auto in EVAL_MODE=doc: prequant, roundtrip (full windows) and the doc windows are
    back, with two eval compiles (trained weights, artifact); decompression falls back to
    DECOMPRESS_S when not measured."""
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, rt=None: False)
    h = doc_hparams(hparams)
    m = {k: v for k, v in {**MEASURED, **DOC_MEASURED}.items() if k not in ("decompress_s", "ttt_compile_s")}
    parts = tg.preflight_eval_seconds(h, runtime, m)
    lora, glob, spans = lora_and_global_s(h, m)
    assert list(parts) == ["quantize+compress", "decompress", "eval compiles", "prequant", "roundtrip", "doc windows",
                           "lora ttt", "global phases"]
    n_plain = tg.val_positions(h) // 128
    # one window for the document's first 128 tokens (4 chunks of 32 with their whole prefix), then one a chunk
    n_doc = sum(1 + max(-(-(int(n) - 128) // 32), 0) for n in spans[:, 1])
    expected = (2.0 + 3.0 + 1.5 + tg.DECOMPRESS_S[h.quant_compressor] + 2 * 4.0 + 2 * n_plain * 0.001
                + n_doc * 0.001 + lora + glob)
    assert sum(parts.values()) == pytest.approx(expected)
    assert {r[0]: r for r in tg.preflight_table(h, runtime, m)}["eval + post-train"][1].startswith(f"{expected:.1f} s: ")


def test_preflight_doc_measure_times_the_lora_compile_apart(hparams, runtime, monkeypatch):
    """Compiled LoRA path: the long batch runs twice (cold 5 s, warm 1 s here), the compile is the
    difference and the long pace the warm run's; eager: two lora_ttt_evaluate calls, no compile."""
    for compiled, times in ((True, [5000.0, 1000.0, 500.0]), (False, [1000.0, 500.0])):
        calls = []
        monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, rt=None, c=compiled: c)
        monkeypatch.setattr(tg, "lora_ttt_evaluate", lambda model, val, spans, h, rt, t=iter(times):
                            calls.append(spans) or tg.EvalResult(0.0, 1, 1, next(t)))
        monkeypatch.setattr(tg, "global_ttt", lambda *a, **k: None)
        h = doc_hparams(hparams, global_ttt_chunk_tokens=1024)
        m = tg.preflight_doc_measure(None, h, runtime)
        one = tg.dataclasses.replace(h, phased_ttt_num_phases=0)
        long_work = sum(tg.lora_schedule(calls[-2], one, 1).work)
        assert len(calls) == len(times) and (not compiled or tg.np.array_equal(calls[0], calls[1]))  # long twice first
        assert m["lora_long_s_per_pos"] == pytest.approx(1.0 / long_work)
        assert m.get("ttt_compile_s") == (4.0 if compiled else None)
