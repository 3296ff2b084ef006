"""Shared fixtures: tiny hyperparameters, a CPU runtime, tiny models, shards in the real format,
a tiny SentencePiece dataset made on the spot, and a runner for the script as a subprocess.
Every test is CPU-only and deterministic; `../shared/data` is used only when present."""

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "tools"))  # the user-run tools the tests import (pack, sweep, ...)

import train_gpt as tg  # noqa: E402
from make_tiny_data import make_dataset  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
REAL_SHARDS = SHARED_DATA / "standin_sp1024"
# The real-text sample shipped in the repo (tests/data/README.md): present in every clone.
SAMPLE = TESTS / "data"
SAMPLE_TOKENIZER = {1024: SAMPLE / "fineweb_1024_bpe.model", 8192: SAMPLE / "fineweb_8192_bpe.model"}
SAMPLE_SHARDS = {1024: SAMPLE / "sp1024", 8192: SAMPLE / "sp8192"}
SAMPLE_DOCS = 60  # documents in each sample shard (tests/tools/make_sample_data.py DOCS)
TINY_DATA_VOCAB = 512  # make_dataset's tokenizer; PRESET=tiny's own default is the sample's 1024


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread, as the subprocess runs get (OMP_NUM_THREADS=1): the tensors are tiny,
    and on a busy 2-core machine two spinning OpenMP threads make GPTQ's column loop and the
    small forwards 10-40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolate():
    """Seed every RNG and restore module globals (attention backend, logging) after each test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    attention, logging = dict(tg._ATTENTION), dict(tg._LOG)
    tg._LOG.update(path=None, is_main=True)
    yield
    tg._ATTENTION.clear()
    tg._ATTENTION.update(attention)
    tg._LOG.clear()
    tg._LOG.update(logging)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Folder with tokenizer.model (vocab TINY_DATA_VOCAB), two train shards and one val shard."""
    return Path(make_dataset(str(tmp_path_factory.mktemp("tiny_data"))))


def tiny_env(data: Path, **overrides) -> dict:
    env = {"PRESET": "tiny", "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"),
           "VOCAB_SIZE": str(TINY_DATA_VOCAB)}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def hparams(tiny_data) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env(tiny_env(tiny_data))


@pytest.fixture
def runtime() -> tg.Runtime:
    return tg.Runtime(distributed=False, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def tiny_model(hparams) -> tg.GPT:
    return tg.GPT(tg.ModelConfig.of(hparams))


@pytest.fixture
def synthetic_shards(tmp_path):
    """write(name, tokens) -> path of a shard in the real format under tmp_path."""
    def write(name: str, tokens) -> Path:
        path = tmp_path / name
        tg.write_shard(str(path), np.asarray(tokens, dtype=np.uint16))
        return path
    return write


def script_env(env: dict) -> dict:
    """The caller's environment without any of the script's own variables, plus `env`."""
    names = {f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)}
    base = {k: v for k, v in os.environ.items()
            if k not in names and not k.startswith(tg.OWNED_ENV_PREFIXES) and k not in ("RANK", "WORLD_SIZE")}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base.update(env)
    return base


def assert_one_error_line(proc: subprocess.CompletedProcess, words) -> str:
    """A bad input's contract: exit 2, the last stderr line is `error:` naming every word, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), last
    assert "Traceback" not in proc.stderr
    return last


def run_script(env: dict, cwd: Path, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_gpt.py in `cwd` as `python3 train_gpt.py` or under torchrun with nproc processes."""
    script = str(ROOT / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout)


def end_worker(rt, code: int = 0):
    """End a test's hand-spawned gloo rank as the script's main() and __main__ end one: all ranks
    meet, the group is torn down, then tg.exit_process (gloo can abort in C++ static teardown)."""
    import torch.distributed as dist
    rt.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    tg.exit_process(code)


def quant_spec(**fields) -> "tg.QuantSpec":
    """The QuantSpec of the default Hyperparameters with these fields changed (by their env names,
    lower-cased), validated as a run's would be."""
    return tg.QuantSpec.of(dataclasses.replace(tg.Hyperparameters(), **fields))
