"""LOADER_PREFETCH (issue 16 item 1): the prefetching loader gives bitwise the batches of the
synchronous loader (every TRAIN_LOADER, before and after close), re-raises a loader error in the
main thread, and leaves no thread behind after close.

    python3 -m pytest -q tests/test_03_data_prefetch.py
"""

import threading

import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE_SHARDS

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
PATHS = tg.shard_paths(str(SAMPLE_SHARDS[1024] / "fineweb_train_*.bin"))


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "loader-prefetch" and t.is_alive()]


@pytest.mark.parametrize("name", sorted(tg.TRAIN_LOADERS))
@pytest.mark.parametrize("depth", [1, 3])
def test_same_batches_as_the_synchronous_loader_and_no_thread_left(name, depth):
    sync = tg.TRAIN_LOADERS[name](PATHS, RT, 7)
    pre = tg.PrefetchLoader(tg.TRAIN_LOADERS[name](PATHS, RT, 7), RT, depth, 4, 64)
    for _ in range(6):
        a, b = sync.next_batch(4, 64), pre.next_batch(4, 64)
        assert all(torch.equal(u, v) and u.dtype == v.dtype == torch.int64 for u, v in zip(a, b))
    pre.close()
    assert prefetch_threads() == []
    for _ in range(depth + 2):  # the prepared batches first, then the loader's own, in order
        a, b = sync.next_batch(4, 64), pre.next_batch(4, 64)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_loader_error_is_raised_in_the_main_thread():
    class Broken(tg.SequentialLoader):
        calls = 0

        def host_batch(self, seqs, seq_len):
            self.calls += 1
            if self.calls == 3:
                raise tg.ConfigError("TRAIN_SEQ_LEN=64: broken shard")
            return super().host_batch(seqs, seq_len)
    pre = tg.PrefetchLoader(Broken(PATHS, RT), RT, 2, 4, 64)
    pre.next_batch(4, 64), pre.next_batch(4, 64)
    with pytest.raises(tg.ConfigError, match="^TRAIN_SEQ_LEN=64: broken shard$"):
        pre.next_batch(4, 64)
    pre.close()
    assert prefetch_threads() == []


def test_knob_is_validated():
    with pytest.raises(tg.ConfigError, match="^LOADER_PREFETCH=-1: must be >= 0"):
        tg.Hyperparameters.from_env({"LOADER_PREFETCH": "-1"})
    assert tg.Hyperparameters().loader_prefetch == 0


def test_train_closes_the_thread_and_keeps_the_stream(hparams, runtime):
    """train() with LOADER_PREFETCH=2: the same losses as without, no thread left after it, and the
    loader it hands to calibration continues the synchronous stream."""
    runs = {}
    for depth in (0, 2):
        h = tg.dataclasses.replace(hparams, loader_prefetch=depth, iterations=3, warmup_steps=0)
        torch.manual_seed(0)
        base = tg.build_model(tg.ModelConfig.of(h), runtime)
        result, _, loader = tg.train(base, base, h, runtime)
        assert prefetch_threads() == []
        x, y = loader.next_batch(tg.batch_geometry(h, runtime)[0], h.train_seq_len)
        runs[depth] = (torch.cat([p.detach().reshape(-1) for p in base.parameters()]), x, y, result.steps)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[2][:3])) and runs[0][3] == runs[2][3] == 3
