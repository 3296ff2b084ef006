"""Section 10 of train_gpt.py, report: compliance rules and the record files.

Rules a reviewer checks (shared/spec/rules.md): validation data opened only after the artifact
is written (C1, C3), the eval-budget planner for TTT (B3), the compliance audit and RECORD=1,
pruning to a byte target (D1), and the multi-seed summarizer's
statistics against scipy (F1).

The committed record files describe the shipped script: train.log's `code:` line (bytes and
sha256 of the source that ran) must equal train_gpt.py as committed. Fails whenever train_gpt.py
changes after train.log was made: rerun tests/README.md's `train.log` command on the final file.

    python3 -m pytest -q tests/test_10_report.py -m "slow or not slow"
"""

import hashlib
import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from scipy import stats

import summarize
import train_gpt as tg
from conftest import tiny_env


# ==============================================================================================
# report compliance


@pytest.mark.slow
def test_validation_opened_only_after_artifact_written(tiny_data, tmp_path, monkeypatch):
    """Training, calibration on training data and quantization never read a val shard."""
    events = []
    real_read, real_write = tg.read_shard, tg.write_artifact
    monkeypatch.setattr(tg, "read_shard", lambda p: (events.append(("read", p)), real_read(p))[1])
    monkeypatch.setattr(tg, "write_artifact", lambda *a, **k: (events.append(("artifact", "")), real_write(*a, **k))[1])
    monkeypatch.chdir(tmp_path)
    assert tg.main(tiny_env(tiny_data, RUN_ID="c1", GPTQ_CALIB="train", ITERATIONS=6, TTT_ENABLED=0)) == 0
    written = events.index(("artifact", ""))
    val_reads = [i for i, (kind, p) in enumerate(events) if kind == "read" and "fineweb_val_" in p]
    train_reads = [i for i, (kind, p) in enumerate(events) if kind == "read" and "fineweb_train_" in p]
    assert val_reads and train_reads
    assert min(val_reads) > written, "a validation shard was read before the artifact existed"
    assert max(train_reads) < written, "training data was read after quantization (rule C2)"


@pytest.mark.parametrize("epochs,left,score_s,epoch_s,time_left,expected", [
    (3, 10, 1.0, 1.0, 100.0, 3),   # 10 + 9*3 = 37 fits
    (3, 10, 1.0, 1.0, 30.0, 2),    # 10 + 9*2 = 28 fits, 37 does not
    (3, 10, 1.0, 1.0, 12.0, 0),    # even one epoch (19) does not fit: score only
    (3, 1, 5.0, 100.0, 6.0, 3),    # the last chunk is never trained: only scoring counts
    (2, 4, 0.5, 2.0, 5.0, 0),      # 2 + 3*1*2 = 8 > 5
], ids=["fits", "shrinks", "score-only", "last-chunk", "tight"])
def test_ttt_plan_epochs(epochs, left, score_s, epoch_s, time_left, expected):
    assert tg.ttt_plan_epochs(epochs, left, score_s, epoch_s, time_left) == expected


@pytest.mark.slow
def test_ttt_planner_keeps_slowed_run_inside_budget(hparams, runtime, tiny_model, tiny_data, monkeypatch):
    """On a virtual clock where each TTT epoch of a chunk costs 1 s, a 10 s budget cannot hold
    13 trained chunks x 3 epochs: the planner cuts epochs, finishes in time, scores every token."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    val = tg.load_validation(hparams, sp, runtime, hparams.eval_seq_len)
    virtual = [0.0]
    monkeypatch.setattr(tg, "clock", lambda: virtual[0])
    real_train = tg.ttt_train_chunk

    def slow_train(*args, **kwargs):
        virtual[0] += 1.0 * args[5]  # args[5] = epochs
        return real_train(*args, **kwargs)
    monkeypatch.setattr(tg, "ttt_train_chunk", slow_train)
    h = tg.dataclasses.replace(hparams, ttt_epochs=3, ttt_chunk_tokens=2048)
    r = tg.ttt_evaluate(tiny_model, tg.nll_function(tiny_model), val, h, runtime, deadline=10.0)
    assert virtual[0] <= 10.0
    assert r.notes["chunks"] == 14 and r.notes["epochs_min"] < 3 and r.notes["epochs_total"] >= 3, r.notes
    assert r.tokens == len(val.tokens) - 1
    unlimited = tg.ttt_evaluate(tg.GPT(tiny_model.cfg), tg.nll_function(tiny_model), val, h, runtime)
    assert unlimited.notes["epochs_total"] == 13 * 3


def _results(tokens: int) -> dict:
    return {k: tg.EvalResult(1.0 * tokens, tokens, tokens) for k in ("roundtrip", "sliding")}


@pytest.mark.parametrize("train_ms,calib_ms,eval_ms,quant_ms,total_bytes,tokens,broken", [
    (590_000, 9_000, 500_000, 99_000, 15_999_999, 100, []),
    (595_000, 6_000, 500_000, 0, 15_000_000, 100, ["B1/B2"]),
    (500_000, 0, 600_001, 0, 15_000_000, 100, ["B3/B4"]),
    (500_000, 0, 550_000, 50_001, 15_000_000, 100, ["B3/B4"]),
    (500_000, 0, 500_000, 0, 16_000_000, 100, ["D1"]),
    (500_000, 0, 500_000, 0, 15_000_000, 99, ["A3/C4"]),
], ids=["ok", "train-over", "eval-over", "eval-plus-quant-over", "bytes-at-cap", "unscored"])
def test_compliance_report(hparams, runtime, train_ms, calib_ms, eval_ms, quant_ms, total_bytes, tokens, broken):
    """Training data work counts with training; data-free post-training work (quantization,
    self-generation) counts with evaluation (the safe reading of rule B4)."""
    record = tg.RunRecord(train=tg.TrainResult(10, train_ms, 1, "wallclock", 0.0),
                          calib=tg.Calibration({}, calib_time_ms=calib_ms), quant_time_ms=quant_ms,
                          sizes={"total_bytes": total_bytes}, results=_results(100), eval_ms=eval_ms)
    record.results["sliding"] = tg.EvalResult(1.0, tokens, tokens)
    report = tg.compliance_report(hparams, runtime, record)
    assert [b.split()[0] for b in report["broken"]] == broken
    assert report["ok"] == (not broken)
    assert report["train_plus_calib_ms"] == train_ms + calib_ms
    assert report["eval_plus_post_train_ms"] == eval_ms + quant_ms


@pytest.mark.slow
def test_record_run_breaking_a_rule_exits_3_after_writing_logs(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tg, "EVAL_LIMIT_MS", 0)  # any eval overruns: a broken B3
    env = tiny_env(tiny_data, RUN_ID="rec", ITERATIONS=4, TTT_ENABLED=0)
    assert tg.main(env) == 0  # not a record attempt: reported, not fatal
    assert json.load(open("logs/rec.json"))["compliance"]["broken"][0].startswith("B3")
    assert tg.main({**env, "RECORD": "1", "RUN_ID": "rec2"}) == 3
    summary = json.load(open("logs/rec2.json"))
    assert summary["compliance"]["ok"] is False and summary["compliance"]["record_attempt"] is True
    assert "compliance: ok:False" in open("logs/rec2.txt").read()


def test_prune_to_fit_lands_under_target(tiny_model):
    """Pruning zeroes only +-1 entries, cheapest first, and the blob fits the byte target."""
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    qstate = tg.quantize_state(state, {})
    cfg = tiny_model.cfg
    full = len(tg.pack_artifact(qstate, cfg, "zstd"))
    blob, pruned = tg.prune_to_fit(qstate, {}, cfg, "zstd", full - 300)
    assert pruned > 0 and len(blob) <= full - 300
    _, deq = tg.unpack_artifact(blob)
    changed = 0
    for name, (q, s) in qstate["gptq"].items():
        q2 = torch.round(deq[name] / s.float()[:, None])
        diff = q2 != q.float()
        assert torch.all(q[diff].abs() == 1) and torch.all(q2[diff] == 0)
        changed += int(diff.sum())
    assert changed == pruned
    assert tg.prune_to_fit(qstate, {}, cfg, "zstd", full + 10)[1] == 0
    with pytest.raises(tg.ConfigError, match="cannot fit"):
        tg.prune_to_fit(qstate, {}, cfg, "zstd", 100)


def test_welch_matches_scipy():
    new, base = [1.1151, 1.1144, 1.1148], [1.1192, 1.1200, 1.1189, 1.1195]
    ours = summarize.welch(new, base)
    ref = stats.ttest_ind(new, base, equal_var=False, alternative="less")
    assert ours["t_statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert ours["welch_df"] == pytest.approx(ref.df, rel=1e-12)
    assert ours["p_one_sided"] == pytest.approx(ref.pvalue, rel=1e-9)
    for df in (1.0, 2.7, 30.0):
        for t in (-8.0, -1.2, 0.0, 2.5):
            assert summarize.t_cdf(t, df, use_scipy=False) == pytest.approx(stats.t.cdf(t, df), abs=1e-13)


def _run_json(seed: float, loss: float, bpb: float) -> dict:
    return dict(seed=seed, world_size=8, device="H100", train={"steps": 7000, "step_avg_ms": 85.0 + seed},
                artifact={"total_bytes": 15_900_000 + seed}, eval={"sliding": {"val_loss": loss, "val_bpb": bpb}},
                eval_time_ms=500_000.0 + 1000 * seed, date=f"2026-12-0{seed}",
                versions={"torch": "2.9.1+cu128", "cuda": "12.8", "flash_attn": "flash_attn_3 3.0.0"})


# #1019's submission.json (stack spec 10.3) less its free-text PR and technique fields
RECORD_KEYS = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_loss_std",
               "val_bpb_std", "seeds", "seed_results", "artifact_bytes_mean", "artifact_bytes_max", "bytes_total",
               "train_steps_mean", "step_avg_ms_mean", "hardware", "pytorch_version", "cuda_version",
               "flash_attn_version"}


def test_summarize_has_the_records_fields_and_refuses_a_repeated_seed(tmp_path):
    runs = [_run_json(s, 1.89, b) for s, b in ((1, 1.0611), (2, 1.0620), (3, 1.0605))]
    runs[2]["eval"] = {"doc": {"val_loss": 9.0, "val_bpb": 9.0}, "ttt": {"val_loss": 1.79, "val_bpb": 1.0605}}
    runs[2]["headline_phase"] = "ttt"
    sub = summarize.summarize(runs, name="n", author="Ada", github_id="ada")
    assert RECORD_KEYS <= set(sub) and sub["author"] == "Ada" and sub["github_id"] == "ada"
    assert sub["val_bpb"] == pytest.approx((1.0611 + 1.0620 + 1.0605) / 3)  # the ttt headline, not doc's 9.0
    assert set(sub["seed_results"]["2"]) >= {"val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms"}
    assert sub["step_avg_ms_mean"] == pytest.approx(87.0) and sub["artifact_bytes_max"] == 15_900_003
    assert sub["eval_time_s_max"] == pytest.approx(503.0) and sub["date"] == "2026-12-03"
    assert (sub["hardware"], sub["pytorch_version"], sub["cuda_version"], sub["flash_attn_version"]) == (
        "8x H100", "2.9.1+cu128", "12.8", "flash_attn_3 3.0.0")
    paths = []
    for i, seed in enumerate((1, 2, 1)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(_run_json(seed, 1.89, 1.06)))
    with pytest.raises(SystemExit, match=r"seed 1 appears twice .*r0.json.*r2.json"):
        summarize.main([str(p) for p in paths] + ["--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_summarize_writes_submission(tmp_path):
    runs = []
    for seed, bpb in ((1, 1.1120), (2, 1.1125), (3, 1.1118)):
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps(_run_json(seed, bpb / 0.59226, bpb)))
        runs.append(str(p))
    out = tmp_path / "submission.json"
    assert summarize.main(runs + ["--baseline-bpb", "1.1192", "1.1200", "1.1189", "--out", str(out)]) == 0
    sub = json.loads(out.read_text())
    assert sub["val_bpb"] == pytest.approx(np.mean([1.1120, 1.1125, 1.1118]))
    assert sub["val_bpb_std"] == pytest.approx(np.std([1.1120, 1.1125, 1.1118], ddof=1))
    assert sub["bytes_total"] == 15_900_003 and sub["seeds"] == [1, 2, 3]
    nats = sub["vs_baseline"]["nats"]
    assert nats["delta"] == pytest.approx((np.mean([1.1120, 1.1125, 1.1118]) - np.mean([1.1192, 1.1200, 1.1189])) / 0.59226)
    assert sub["vs_baseline"]["bar_met"] is True  # -0.012 nats, p ~ 1e-4
    weak = summarize.summarize([_run_json(s, 1.89, 1.119) for s in (1, 2, 3)], [1.1192, 1.1200, 1.1189])
    assert weak["vs_baseline"]["bar_met"] is False


def test_paired_by_document(tmp_path):
    tokens = np.array([1, 5, 6, 7, 1, 8, 9, 1, 4, 4, 4])
    base = np.where(np.arange(len(tokens)) == 0, np.nan, 2.0)
    new = base - np.array([0, .1, .1, .1, .2, .2, .2, .3, .3, .3, .3])
    np.save(tmp_path / "n.npy", new), np.save(tmp_path / "b.npy", base)
    r = summarize.paired_by_document(str(tmp_path / "n.npy"), str(tmp_path / "b.npy"), tokens)
    assert r["documents"] == 3
    assert r["mean_delta_nats"] == pytest.approx(-0.2)
    d = np.array([-0.1, -0.2, -0.3])
    assert r["t_statistic"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)))


@pytest.mark.slow
def test_slot_is_never_the_headline_and_breaks_a_record(tiny_data, tmp_path, monkeypatch):
    """SLOT_ENABLED=1 adds a labelled non-record phase; the headline stays TTT; with RECORD=1 the
    audit lists rule A7 and the run exits 3."""
    monkeypatch.chdir(tmp_path)
    env = tiny_env(tiny_data, RUN_ID="slot", ITERATIONS=4, SLOT_ENABLED=1, SLOT_STEPS=2)
    assert tg.main(env) == 0
    summary = json.load(open("logs/slot.json"))
    assert set(summary["eval"]) == {"prequant", "roundtrip", "sliding", "slot", "ttt"}
    assert summary["val_bpb"] == summary["eval"]["ttt"]["val_bpb"] != summary["eval"]["slot"]["val_bpb"]
    assert summary["eval"]["slot"]["tokens"] == summary["eval"]["sliding"]["tokens"]
    log = open("logs/slot.txt").read()
    assert "causal_slot_nonrecord_exact" in log and "non-record technique" in log
    assert tg.main({**env, "RUN_ID": "slot2", "RECORD": "1"}) == 3
    assert any(b.startswith("A7") for b in json.load(open("logs/slot2.json"))["compliance"]["broken"])


def test_budget_cuts_name_every_cut_of_the_planners_and_nothing_else():
    R = lambda **notes: tg.EvalResult(1.0, 1, 1, notes=notes)  # noqa: E731
    results = {"prequant": R(), "sliding": R(),
               "ttt": R(chunks=24, epochs_requested=3, epochs_min=1, epochs_total=40, plan_changes=2)}
    assert tg.budget_cuts(results) == ["ttt_epochs:3->1"]
    results["ttt"] = R(mode="lora", grad_steps_requested=2, grad_steps_min=0, plan_changes=1)
    assert tg.budget_cuts(results) == ["ttt_grad_steps:2->0"]
    results["ttt"] = R(chunks=24, epochs_requested=3, epochs_min=3)
    assert tg.budget_cuts(results) == []


@pytest.mark.slow
def test_a_small_eval_budget_shows_in_the_summary_line(tiny_data, tmp_path, monkeypatch, capsys):
    """A reproduction on a slow machine: the TTT planner cuts epochs, and the last line says so."""
    monkeypatch.chdir(tmp_path)
    env = tiny_env(tiny_data, RUN_ID="cut", ITERATIONS=4, TTT_EPOCHS=3, EVAL_BUDGET_SECONDS=0.5)
    assert tg.main(env) == 0
    summary = json.load(open("logs/cut.json"))
    last = open("logs/cut.txt").read().splitlines()[-1]
    assert summary["budget_cuts"] == [f"ttt_epochs:3->{summary['eval']['ttt']['epochs_min']}"]
    assert summary["eval"]["ttt"]["epochs_min"] < 3
    assert last.startswith("summary:logs/cut.json") and last.endswith(f"budget_cuts:{summary['budget_cuts'][0]}")
    env.update(EVAL_BUDGET_SECONDS="0", RUN_ID="nocut")  # no budget: nothing is cut, whatever the machine
    assert tg.main(env) == 0
    summary = json.load(open("logs/nocut.json"))
    assert summary["budget_cuts"] == [] and summary["eval"]["ttt"]["epochs_min"] == 3
    assert open("logs/nocut.txt").read().splitlines()[-1].endswith("budget_cuts:none")


# ==============================================================================================
# report record files

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_log_code_hash_is_the_shipped_script():
    code = (ROOT / "train_gpt.py").read_bytes()
    lines = [l for l in (ROOT / "train.log").read_text().splitlines() if l.startswith("code: bytes:")]
    assert len(lines) == 1, f"expected one 'code:' line in train.log, found {len(lines)}"
    m = re.match(r"code: bytes:(\d+) sha256:([0-9a-f]{64})", lines[0])
    assert m, lines[0]
    assert (int(m.group(1)), m.group(2)) == (len(code), hashlib.sha256(code).hexdigest()), (
        "train.log was made by another train_gpt.py: regenerate it with tests/README.md's train.log command")


def test_submission_json_holds_train_log_s_numbers():
    """submission.json (tests/tools/summarize.py over the seeds) has train.log's seed with the headline
    val_bpb of its `legal_ttt_exact` line and the artifact bytes of its `Total submission size` line,
    and its mean is the mean of its seeds."""
    log = (ROOT / "train.log").read_text()
    sub = json.loads((ROOT / "submission.json").read_text())
    seed = re.search(r"^hparam:seed=(\d+)$", log, re.M).group(1)
    bpb = float(re.search(r"^legal_ttt_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M).group(1))
    total = int(re.search(r"^Total submission size [^:]*: (\d+) bytes", log, re.M).group(1))
    assert sub["seed_results"][seed]["val_bpb"] == pytest.approx(bpb, abs=5e-9)
    assert sub["seed_results"][seed]["artifact_bytes"] == total
    assert sub["val_bpb"] == pytest.approx(sum(r["val_bpb"] for r in sub["seed_results"].values()) / len(sub["seeds"]))
    assert "not a leaderboard score" in sub["name"] and "CPU" in sub["hardware"].upper()

