"""End to end: the real script as a subprocess on the tiny preset and a tiny SentencePiece dataset.

Covers the interface (interface.md): the log (sorted hyperparameters, final labels), the summary
JSON, the artifact and its size (rule D1), EVAL_ARTIFACT reproducing a run's scores from the
artifact and the val shard alone (rules C1, C2), TOKEN_LOSSES_DIR files, bitwise determinism,
one-line errors with exit status 2 and nothing left behind, and (slow) 2 gloo processes against 1.

    python3 -m pytest -q tests/test_11_drivers_end_to_end.py -m "slow or not slow" # everything, about 1-2 minutes
"""

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import assert_one_error_line, ROOT, run_script, tiny_env

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


# ----------------------------------------------------------------------------------------------
# Errors: one line naming the cause, exit status 2, no artifact


def _copy_data(tiny_data: Path, dest: Path) -> Path:
    shutil.copytree(tiny_data, dest)
    return dest


def _bad_magic(tiny_data, tmp, name="fineweb_train_000000.bin", **env):
    data = _copy_data(tiny_data, tmp / "data")
    path = data / name
    raw = bytearray(path.read_bytes())
    raw[:4] = np.array([12345], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    return tiny_env(data, **env)


def _bad_size(tiny_data, tmp):
    data = _copy_data(tiny_data, tmp / "data")
    with open(data / "fineweb_train_000000.bin", "ab") as f:
        f.write(b"\0\0\0")
    return tiny_env(data)


def _no_shards(tiny_data, tmp):
    (tmp / "empty").mkdir()
    return dict(tiny_env(tmp / "empty"), TOKENIZER_PATH=str(tiny_data / "tokenizer.model"))


ERROR_CASES = {
    "missing_shards": (_no_shards, ["DATA_PATH", "no shards"]),
    "bad_header": (_bad_magic, ["fineweb_train_000000.bin", "bad shard header"]),
    "size_mismatch": (_bad_size, ["fineweb_train_000000.bin", "header promises"]),
    "vocab_mismatch": (lambda d, t: tiny_env(d, VOCAB_SIZE=256), ["VOCAB_SIZE=256", "tokenizer"]),
    "heads": (lambda d, t: tiny_env(d, NUM_HEADS=3), ["MODEL_DIM=64", "NUM_HEADS"]),
    "batch": (lambda d, t: tiny_env(d, TRAIN_BATCH_TOKENS=100), ["TRAIN_BATCH_TOKENS=100", "TRAIN_SEQ_LEN"]),
    "unknown_ttt_var": (lambda d, t: tiny_env(d, TTT_LEARNING_RATE=0.1), ["TTT_LEARNING_RATE", "unknown"]),
    "missing_artifact": (lambda d, t: tiny_env(d, EVAL_ARTIFACT=t / "nope.ptz"), ["EVAL_ARTIFACT=", "nope.ptz",
                                                                                  "not found"]),
}


class LeftBehind(Exception):
    """The run trained or wrote an artifact before failing (kept apart for the xfail below)."""


ERROR_PARAMS = list(ERROR_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", ERROR_PARAMS)
def test_bad_input_fails_with_one_error_line(case, tiny_data, tmp_path):
    make_env, words = ERROR_CASES[case]
    env = dict(make_env(tiny_data, tmp_path), RUN_ID="err")
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(env, cwd, timeout=120)
    assert_one_error_line(proc, words)
    if re.search(r"^step:\d+/", proc.stdout, re.M) or [p for p in cwd.iterdir() if p.name.startswith(tg.ARTIFACT_NAME)]:
        raise LeftBehind("trained or left an artifact (or its .tmp) in cwd: " + str(sorted(os.listdir(cwd))))


@pytest.mark.slow
def test_bad_val_shard_fails_at_eval_and_keeps_the_artifact(tiny_data, tmp_path):
    """Val shards are not even opened before the artifact exists (rule C1), so a bad val header is
    found when evaluation starts: exit 2 naming the file, and the complete artifact stays for
    EVAL_ARTIFACT (nothing half-written)."""
    env = dict(_bad_magic(tiny_data, tmp_path, "fineweb_val_000000.bin", ITERATIONS=2, WARMUP_STEPS=0), RUN_ID="err")
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(env, cwd, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "fineweb_val_000000.bin" in last and "EVAL_ARTIFACT=" in last, last
    assert (cwd / tg.ARTIFACT_NAME).is_file() and not list(cwd.glob(tg.ARTIFACT_NAME + ".tmp*"))
    cfg, state = tg.unpack_artifact((cwd / tg.ARTIFACT_NAME).read_bytes())
    assert cfg.num_layers == 2 and state


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


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["random", "missing"])
def test_eval_artifact_is_checked_before_the_val_shards(damage, tiny_data, tmp_path):
    """EVAL_ARTIFACT reads and checks the artifact first: a corrupt or missing artifact is the one error
    even when the val shard is broken too, and nothing (no logs/) is written."""
    data = _copy_data(tiny_data, tmp_path / "data")
    (data / "fineweb_val_000000.bin").write_bytes(b"\0" * 100)  # a broken val shard: never reached
    art = tmp_path / "a.ptz"
    if damage == "random":
        art.write_bytes(np.random.default_rng(0).bytes(4096))
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(dict(tiny_env(data), RUN_ID="err", EVAL_ARTIFACT=str(art)), cwd, timeout=120)
    words = ["EVAL_ARTIFACT", "does not decompress"] if damage == "random" else ["EVAL_ARTIFACT=", "not found"]
    last = assert_one_error_line(proc, words)
    assert "fineweb_val" not in last and list(cwd.iterdir()) == []
