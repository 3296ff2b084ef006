"""What the benchmarks share: their config (the benchmark's model under any field the environment
sets) and a model trained as run() trains it."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402


def script_fields(environ=os.environ) -> dict:
    """The variables of `environ` that name a Hyperparameters field."""
    names = {f.name.upper() for f in tg.dataclasses.fields(tg.Hyperparameters)}
    return {k: v for k, v in environ.items() if k in names}


def bench_hparams(model: dict, **fixed: str) -> "tg.Hyperparameters":
    """`model` (env names -> values), overridden by the fields the environment sets, then `fixed`."""
    return tg.Hyperparameters.from_env({**model, **script_fields(), **fixed})


def train_averaged(h: "tg.Hyperparameters", rt, compiled: bool = False):
    """Seed, build, train (compiled when asked, as run() does) and apply the weight average:
    (model, TrainResult, the training loader calibration continues)."""
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    base = tg.build_model(tg.ModelConfig.of(h), rt)
    result, averager, loader = tg.train(tg.maybe_compile(base, h, rt) if compiled else base, base, h, rt)
    tg.apply_weight_average(base, averager, h.weight_average)
    return base, result, loader
