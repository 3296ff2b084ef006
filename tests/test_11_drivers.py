"""Section 11 of train_gpt.py, drivers: end-to-end runs, the frontier run, preflight and its plan.

End to end: the real script as a subprocess on the tiny preset and a tiny SentencePiece dataset.

Covers the interface (interface.md): the log (sorted hyperparameters, final labels), the summary
JSON, the artifact and its size (rule D1), EVAL_ARTIFACT reproducing a run's scores from the
artifact and the val shard alone (rules C1, C2), TOKEN_LOSSES_DIR files, bitwise determinism,
and (slow) 2 gloo processes against 1 (the one-line errors with exit status 2: test_14_errors.py).

PRESET=frontier end to end at tiny dims (env overrides on top of the preset): every phase on
CPU, looping switched on mid-run and kept for calibration, eval and TTT; 1 and 2 processes
agree (bad frontier settings: tests/test_14_errors.py).

PREFLIGHT=1 (issue 8): the go/no-go run that times every phase on training tokens only.

One real preflight on the tiny preset (the table is printed, exit 0, nothing written but the log,
no validation token read: the val shard is garbage of the right size and every read_shard call is
recorded), and the projection arithmetic of `preflight_table` against hand computations.

PREFLIGHT=plan (issue 19 item 4): the 8xH100 run modelled on any CPU, nothing trained.

The memory model's parts against independent counts (FA3's backward scratch against the review's
53 GB, saved activations of single ops, optimizer state from the parameter shapes), the varlen
bound on today's and on a capacity-bounded `document_segments`, the eval projection against a hand
computation, the JSON table, NO-GO when a phase does not fit, and no validation file opened. The
full-size frontier plan: NO-GO on today's behaviour (pinned by copies of today's
`document_segments` and round-robin schedule, so it stays a test of the model after the fixes), and
GO with the fixes (compiled LoRA TTT, as lora_ttt_compiled reports), and the
split LPT schedule's per-rank balance on the same documents.

    python3 -m pytest -q tests/test_11_drivers.py -m "slow or not slow"
"""

import builtins
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT, run_script, tiny_env, SAMPLE_SHARDS, SAMPLE_TOKENIZER, SHARED_DATA
from helpers import ITERATIONS, frontier_env, frontier_param_count


# ==============================================================================================
# drivers end to end

SCRIPT = ROOT / "train_gpt.py"
PHASES = ("prequant", "roundtrip", "sliding", "ttt")
RESULT_KEYS = {"val_loss", "val_bpb", "tokens", "bytes", "time_ms"}


@dataclasses.dataclass
class Run:
    cwd: Path
    env: dict
    proc: object
    code_bytes: int  # size of train_gpt.py when the run started

    @property
    def log(self) -> str:
        return (self.cwd / "logs" / f"{self.env['RUN_ID']}.txt").read_text()

    @property
    def summary(self) -> dict:
        return json.loads((self.cwd / "logs" / f"{self.env['RUN_ID']}.json").read_text())

    @property
    def artifact(self) -> Path:
        return self.cwd / tg.ARTIFACT_NAME

    def check_ok(self):
        assert self.proc.returncode == 0, self.proc.stderr[-3000:]


def launch(cwd: Path, env: dict, nproc: int = 1) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    code = SCRIPT.stat().st_size
    return Run(cwd, env, run_script(env, cwd, nproc=nproc), code)


def val_stream_len(data: Path) -> int:
    """Tokens in the val shards, from the file sizes alone (256 int32 header + uint16 tokens)."""
    return sum((p.stat().st_size - 1024) // 2 for p in sorted(data.glob("fineweb_val_*.bin")))


def val_only_copy(data: Path, dest: Path) -> Path:
    """A DATA_PATH holding only the val shard(s) and the tokenizer: no training data to read."""
    dest.mkdir(parents=True)
    for p in [*data.glob("fineweb_val_*.bin"), data / "tokenizer.model"]:
        shutil.copy(p, dest / p.name)
    return dest


def exact_line(log: str, label: str) -> dict:
    """The fields of the one `<label>_exact key:value ...` line."""
    lines = [ln for ln in log.splitlines() if ln.startswith(label + "_exact ")]
    assert len(lines) == 1, label
    return {k: float(v) for k, v in re.findall(r"(\w+):(\S+)", lines[0])}


@pytest.fixture(scope="module")
def train_run(tiny_data, tmp_path_factory) -> Run:
    """The reference tiny run (1 process), also writing per-token losses. Micro-batches of 16 of
    the 32 sequences per step: 2 accumulation steps here do what 2 processes do (see below)."""
    run = launch(tmp_path_factory.mktemp("e2e"), tiny_env(tiny_data, RUN_ID="e2e", TOKEN_LOSSES_DIR="token_losses",
                                                          MICRO_BATCH_SEQS=16))
    run.check_ok()
    return run


@pytest.fixture(scope="module")
def eval_run(train_run, tiny_data, tmp_path_factory) -> Run:
    """EVAL_ARTIFACT on the reference artifact, with a DATA_PATH that has no train shards."""
    base = tmp_path_factory.mktemp("eval_artifact")
    data = val_only_copy(tiny_data, base / "data")
    run = launch(base / "run", tiny_env(data, RUN_ID="eval", EVAL_ARTIFACT=train_run.artifact,
                                        TOKEN_LOSSES_DIR="token_losses"))
    run.check_ok()
    return run


# ----------------------------------------------------------------------------------------------
# One tiny run: log, summary, artifact


@pytest.mark.slow
def test_log_starts_with_sorted_hyperparameters_and_ends_with_final_labels(train_run, tiny_data):
    lines = train_run.log.splitlines()
    names = sorted(f.name for f in dataclasses.fields(tg.Hyperparameters))
    expected = dataclasses.asdict(tg.Hyperparameters.from_env(train_run.env))
    assert lines[:len(names)] == [f"hparam:{n}={expected[n]!r}" for n in names]
    assert not lines[len(names)].startswith("hparam:")
    for label in ("final_int6_roundtrip", "final_int6_sliding_window", "legal_ttt"):
        exact_line(train_run.log, label)
    assert any(ln.startswith("Total submission size") for ln in lines)
    assert not any(ln.startswith("stopping_early") for ln in lines)  # no wall-clock cap in the tiny preset
    code = Path(tg.__file__).read_text()
    assert code in train_run.log  # the exact source is in the log file (not on the console)
    assert code not in train_run.proc.stdout
    assert train_run.summary["config"] == dict(expected, bos_id=1)  # BOS_ID=-1: the tokenizer's, as run


@pytest.mark.slow
def test_summary_json_has_the_interface_keys_and_consistent_numbers(train_run, tiny_data):
    s = train_run.summary
    assert (s["run_id"], s["seed"], s["world_size"]) == ("e2e", 1337, 1)
    assert isinstance(s["device"], str) and s["device"]
    h = tg.Hyperparameters.from_env(train_run.env)
    assert s["train"]["steps"] == h.iterations and s["train"]["stop"] == "iterations"
    assert s["train"]["tokens"] == h.iterations * h.train_batch_tokens
    assert s["train"]["train_time_ms"] > 0 and s["train"]["calib_time_ms"] > 0
    assert s["train"]["step_avg_ms"] == pytest.approx(s["train"]["train_time_ms"] / h.iterations, abs=0.01)
    assert s["versions"]["torch"] == torch.__version__ and s["versions"]["cuda"] == torch.version.cuda
    assert s["headline_phase"] == "ttt" and len(s["date"]) == 10 and s["date"][:2] == "20"

    art = s["artifact"]
    size = train_run.artifact.stat().st_size
    assert art["limit_bytes"] == 16_000_000 and Path(train_run.cwd, art["path"]) == train_run.artifact
    assert (art["model_bytes"], art["code_bytes"]) == (size, train_run.code_bytes)
    assert art["total_bytes"] == size + train_run.code_bytes < 16_000_000

    assert set(s["eval"]) == set(PHASES)
    seq = max(h.train_seq_len, h.eval_seq_len)
    val_tokens = (val_stream_len(tiny_data) - 1) // seq * seq
    for phase in PHASES:
        r = s["eval"][phase]
        assert RESULT_KEYS <= set(r)
        assert (r["tokens"], r["bytes"]) == (val_tokens, s["eval"]["roundtrip"]["bytes"])
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-12)
        assert r["time_ms"] > 0
        label = tg.PHASE_LABELS[phase]
        assert exact_line(train_run.log, label)["val_bpb"] == pytest.approx(r["val_bpb"], abs=1e-8)
    assert s["val_bpb"] == s["eval"]["ttt"]["val_bpb"]
    assert s["eval_time_ms"] >= sum(s["eval"][p]["time_ms"] for p in PHASES) - 1
    # it learned (uniform is ln V nats per token), and the int6 artifact stays close to the float model
    assert s["eval"]["prequant"]["val_loss"] < 0.6 * math.log(h.vocab_size)
    assert abs(s["eval"]["roundtrip"]["val_bpb"] - s["eval"]["prequant"]["val_bpb"]) < 0.05


@pytest.mark.slow
def test_token_losses_files_cover_the_val_stream(train_run, tiny_data):
    s = train_run.summary
    n = val_stream_len(tiny_data)
    arrays = {}
    for phase in ("sliding", "ttt"):
        a = np.load(train_run.cwd / "token_losses" / f"{phase}.npy")
        r = s["eval"][phase]
        assert a.dtype == np.float32 and a.shape == (n,)
        scored = ~np.isnan(a)
        assert not scored[0] and scored[1:r["tokens"] + 1].all() and not scored[r["tokens"] + 1:].any()
        assert (a[scored] >= 0).all()
        assert float(np.nansum(a.astype(np.float64))) == pytest.approx(r["val_loss"] * r["tokens"], rel=1e-9)
        arrays[phase] = a
    # TTT's first chunk is scored before any update: the same numbers as sliding there, not later
    c = s["config"]["ttt_chunk_tokens"]
    assert arrays["ttt"][1:c + 1].tobytes() == arrays["sliding"][1:c + 1].tobytes()
    assert arrays["ttt"][c + 1:].tobytes() != arrays["sliding"][c + 1:].tobytes()


@pytest.mark.slow
def test_eval_artifact_reproduces_scores_without_training_data(train_run, eval_run):
    s, e = train_run.summary, eval_run.summary
    assert not list(Path(eval_run.env["DATA_PATH"]).glob("fineweb_train_*"))
    assert e["train"] is None and set(e["eval"]) == {"roundtrip", "sliding", "ttt"}
    assert not (eval_run.cwd / tg.ARTIFACT_NAME).exists()  # nothing trained, nothing written
    assert e["artifact"]["model_bytes"] == s["artifact"]["model_bytes"]
    for phase in ("roundtrip", "sliding", "ttt"):
        assert e["eval"][phase]["val_bpb"] == pytest.approx(s["eval"][phase]["val_bpb"], abs=1e-6), phase
        assert (e["eval"][phase]["tokens"], e["eval"][phase]["bytes"]) == (s["eval"][phase]["tokens"],
                                                                         s["eval"][phase]["bytes"])
    for phase in ("sliding", "ttt"):
        a = np.load(train_run.cwd / "token_losses" / f"{phase}.npy")
        b = np.load(eval_run.cwd / "token_losses" / f"{phase}.npy")
        assert a.tobytes() == b.tobytes(), phase


@pytest.mark.slow
def test_two_identical_runs_give_bitwise_identical_artifacts(train_run, tmp_path):
    again = launch(tmp_path, train_run.env)
    again.check_ok()
    assert again.artifact.read_bytes() == train_run.artifact.read_bytes()
    assert again.summary["eval"]["ttt"]["val_bpb"] == train_run.summary["eval"]["ttt"]["val_bpb"]


@pytest.mark.slow
def test_artifact_over_the_cap_writes_nothing(tmp_path, monkeypatch, hparams, runtime, tiny_model):
    monkeypatch.chdir(tmp_path)
    blob = b"x" * 1000
    at_cap = tg.code_bytes() + len(blob)
    with pytest.raises(tg.ConfigError, match="cap"):
        tg.write_artifact(blob, "a.ptz", limit=at_cap)  # the cap is strict: total must be < limit
    assert list(tmp_path.iterdir()) == []
    sizes = tg.write_artifact(blob, "a.ptz", limit=at_cap + 1)
    assert sizes["total_bytes"] == at_cap and (tmp_path / "a.ptz").read_bytes() == blob
    (tmp_path / "a.ptz").unlink()

    # the real serialization path, with code that alone fills the cap
    monkeypatch.setattr(tg, "code_bytes", lambda: tg.SIZE_LIMIT_BYTES)
    with pytest.raises(tg.ConfigError, match="artifact"):
        tg.serialize(tiny_model, {}, hparams, runtime)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Slow: 2 gloo processes against 1


def step_loss(log: str, step: int) -> float:
    return float(re.search(rf"^step:{step}/\d+ train_loss:(\S+)", log, re.M).group(1))


class ScriptCrashed(Exception):
    """The script exited non-zero (kept apart from assertion failures for the xfail below)."""


@pytest.mark.slow
def test_two_process_training_matches_one_process(train_run, tmp_path):
    two = launch(tmp_path, dict(train_run.env, RUN_ID="e2e2"), nproc=2)
    # compared from the log lines, which rank 0 writes before the summary
    d_loss = abs(step_loss(two.log, 1) - step_loss(train_run.log, 1))
    d_bpb = abs(exact_line(two.log, "prequant_ema")["val_bpb"] - exact_line(train_run.log, "prequant_ema")["val_bpb"])
    print(f"1 vs 2 processes: step-1 loss diff {d_loss:.2e}, prequant val_bpb diff {d_bpb:.2e}")
    assert "world_size:2 " in two.log
    assert "quant:gptq_split ranks:2 " in two.log  # GPTQ_SPLIT's default: the two ranks share the GPTQ
    # Same micro-batches (16 sequences) on both sides, so training is bitwise the same arithmetic:
    # loss/2 backpropagates exactly half of every gradient, g1/2 + g2/2 == (g1 + g2)/2 in floats,
    # and the gloo sum of two is commutative. With unequal micro-batches (32 in one forward vs 2 x 16)
    # the loss means round differently and 40 steps of bf16 Newton-Schulz amplify that: 3e-8 bpb at
    # SEED=1337 and 5.5e-5 at SEED=0 (both measured on this data), 1.27e-4 once in CI. Its size is chaos (seed, the machine's
    # kernels), not a bound to tune; with equal micro-batches both sides measured bitwise equal.
    assert d_loss == 0
    assert d_bpb <= 1.5e-8  # the 8 printed decimals; only eval's float64 sums are split across ranks
    if two.proc.returncode != 0:
        raise ScriptCrashed(two.proc.stderr[-3000:])
    s1, s2 = train_run.summary, two.summary
    assert s2["world_size"] == 2 and s2["train"]["tokens"] == s1["train"]["tokens"]
    assert s2["eval"]["prequant"]["val_bpb"] == pytest.approx(s1["eval"]["prequant"]["val_bpb"], abs=1e-12)


@pytest.mark.slow
def test_two_process_eval_matches_one_process(train_run, eval_run, tmp_path):
    two = launch(tmp_path / "run", dict(eval_run.env, RUN_ID="eval2"), nproc=2)
    two.check_ok()
    e1, e2 = eval_run.summary["eval"], two.summary["eval"]
    diffs = {p: abs(e2[p]["val_bpb"] - e1[p]["val_bpb"]) for p in ("roundtrip", "sliding", "ttt")}
    print("1 vs 2 processes, eval val_bpb diffs:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for p in diffs:
        assert (e2[p]["tokens"], e2[p]["bytes"]) == (e1[p]["tokens"], e1[p]["bytes"])
    assert diffs["roundtrip"] <= 1e-6 and diffs["sliding"] <= 1e-6 and diffs["ttt"] <= 1e-5
    # sliding scores are per token and do not depend on which rank scored them
    a = np.load(eval_run.cwd / "token_losses" / "sliding.npy")
    b = np.load(two.cwd / "token_losses" / "sliding.npy")
    assert a.tobytes() == b.tobytes()


# ==============================================================================================
# drivers frontier e2e

@pytest.fixture(scope="module")
def frontier_run(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("frontier")
    env = frontier_env(tiny_data)
    proc = run_script(env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, env, (cwd / "logs" / "frontier.txt").read_text()


@pytest.mark.slow
def test_frontier_preset_runs_every_phase(frontier_run):
    cwd, env, log = frontier_run
    assert f"model_params:{frontier_param_count(512, 5, 64, 4, 2, 4.0, 8, 7)} " in log
    assert "bos_id:1 doc_masking:1" in log
    assert "warmup_step:1/1 looping:0" in log and "warmup_step:1/1 looping:1" in log  # both graphs
    switch = re.search(r"loop:on step:(\d+) budget_used:([\d.]+) layers:0,1,2,1,2,3,4", log)
    assert switch and int(switch.group(1)) == 5  # first step with step/ITERATIONS >= 0.35
    assert "hparam:smear_gate_enabled=True" in log and "hparam:sparse_attn_gate_scale=0.5" in log
    summary = json.loads((cwd / "logs" / "frontier.json").read_text())
    assert summary["compliance"]["ok"] and set(summary["eval"]) == {"prequant", "roundtrip", "doc", "ttt"}
    assert summary["eval"]["roundtrip"]["val_bpb"] < 8.0  # below uniform over 512 tokens per ~2.4 bytes
    cfg, _ = tg.unpack_artifact((cwd / tg.ARTIFACT_NAME).read_bytes())
    model = tg.GPT(cfg)
    assert cfg.bos_id == 1 and cfg.doc_masking and model.looping  # the artifact reloads looped


@pytest.mark.slow
def test_frontier_two_processes_match_one(frontier_run, tmp_path):
    cwd, env, log = frontier_run
    # GRAD_CLIP_MODE=local (the preset's, the record's) clips each rank's gradient: on 2 ranks that is
    # another update than 1 process's, by design. averaged on 2 ranks is what local is on 1.
    proc = run_script(dict(env, RUN_ID="frontier2", GRAD_CLIP_MODE="averaged"), tmp_path, nproc=2)
    two = (tmp_path / "logs" / "frontier2.txt").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size:2 " in two

    def exact(text, label):
        return float(re.search(label + r"_exact val_loss:[\d.]+ val_bpb:([\d.]+)", text).group(1))
    loss = [re.search(rf"step:{ITERATIONS}/{ITERATIONS} train_loss:([\d.]+)", t).group(1) for t in (log, two)]
    assert abs(float(loss[0]) - float(loss[1])) <= 1.0001e-4  # same global batch, float sum order aside
    assert exact(two, "prequant_ema") == pytest.approx(exact(log, "prequant_ema"), abs=1e-5)


# ==============================================================================================
# drivers preflight

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


# ==============================================================================================
# drivers preflight plan

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
    """World 2, one document per batch, no phases, LPT: rank 0 runs batch 0, rank 1 batches 1 and 2.
    The hand computation models the eager LoRA path (pinned); the compiled one (the default) at the end."""
    h = tg.dataclasses.replace(tg.Hyperparameters(), eval_mode="doc",
                               ttt_batch_size=1, ttt_chunk_size=48,
                               eval_seq_len=2048, phased_ttt_num_phases=0, ttt_grad_steps=1)
    spans = spans_of([5000, 3000, 100])
    plan = tg.lora_schedule(spans, h, 2)
    assert plan.mine == [[[0]], [[1, 2]]] and plan.phase_docs == []

    def work(n):  # rows x padded length per chunk, one document
        return sum(min((ci + 1) * 48, n, 2048) for ci in range(-(-n // 48)))
    assert plan.work == [work(5000), work(3000), work(100)]
    lora = 1.8 * max(work(5000) / 0.38e6, work(3000) / 0.38e6 + work(100) / 0.5e6)
    fwd = 47.85e6 / 6.7 / 8 * 2
    monkeypatch.setattr(tg, "lora_ttt_compiled", lambda h, rt=None: False)
    parts = tg.plan_eval_seconds(h, spans, plan, 2)
    assert parts["lora ttt"] == pytest.approx(lora)
    assert parts["prequant"] == parts["roundtrip"] == pytest.approx(4 * 2048 / fwd)  # 8,100 tokens: 4 windows
    assert parts["doc windows"] == pytest.approx(len(tg.doc_windows(spans, 2048, 48)) * 2048 / fwd)
    assert parts["eval compiles"] == 2 * tg.EVAL_COMPILE_S and "global phases" in parts
    assert parts["global phases"] == 0
    # GPTQ_SPLIT on 2 ranks halves the GPTQ part exactly here: the default model's GPTQ costs split into two
    # equal halves (tests/test_12_two_process.py); compression stays on rank 0
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

