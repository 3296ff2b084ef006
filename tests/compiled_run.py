"""The run's compiled phases in miniature, for tests/test_02_runtime.py and tests/gpu/: training
steps through `maybe_compile(model)`, sliding eval and score-first TTT through
`maybe_compile(nll_function(model))`, with TorchDynamo's counters read after each phase so that a
test can assert one graph per phase, no graph break and no recompile across steps and batches."""

import dataclasses

import torch
from torch._dynamo.utils import counters

import train_gpt as tg


def dynamo_graphs() -> tuple[int, int]:
    """(graphs compiled so far, graph breaks so far) in this process since the last reset."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@dataclasses.dataclass
class Phases:
    losses: list  # training loss per step
    first_step_params: dict  # weights after the first step
    sliding: torch.Tensor  # score_windows sums (nll, tokens, bytes)
    ttt: tg.EvalResult
    graphs: dict  # phase -> dynamo_graphs() after it


def run_phases(h: tg.Hyperparameters, rt: tg.Runtime, steps: int, ttt_chunks: int = 3) -> Phases:
    """Train `steps` steps (graphs read after the first and the last), sliding-eval a stand-in stream
    of training tokens, then TTT on `ttt_chunks` chunks of it. Deterministic given h.seed."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(h.seed)
    base = tg.build_model(tg.ModelConfig.of(h), rt)
    model = tg.maybe_compile(base, h, rt)
    params, opts, geometry = list(base.parameters()), tg.build_optimizers(base, h, rt), tg.batch_geometry(h, rt)
    loader, losses, graphs = tg.make_train_loader(h, rt), [], {}
    for i in range(steps):
        losses.append(tg.train_step(model, opts, loader, h, rt, geometry, params, 1.0, i).item())
        if i == 0:
            graphs["first_step"] = dynamo_graphs()
            first = {n: p.detach().clone() for n, p in base.named_parameters()}
    graphs["train"] = dynamo_graphs()
    stream = tg.stand_in_stream(h, ttt_chunks * h.ttt_chunk_tokens + 1).to(rt.device)
    nll_fn = tg.maybe_compile(tg.nll_function(base), h, rt)
    wins = tg.sliding_windows(len(stream.tokens) - 1, h.eval_seq_len, h.eval_stride)
    assert len(wins) % h.eval_batch_seqs, "the last batch should be padded"
    sliding = tg.score_windows(nll_fn, stream, wins, h.eval_batch_seqs, rt)
    graphs["sliding"] = dynamo_graphs()
    ttt = tg.ttt_evaluate(base, nll_fn, stream, h, rt)
    graphs["ttt"] = dynamo_graphs()
    return Phases(losses, first, sliding, ttt, graphs)


def small_hparams(data, **overrides) -> tg.Hyperparameters:
    """The tiny preset with a 2-micro-step batch, 3 TTT chunks of 4 sequences and a padded last
    eval batch: every shape the run compiles, at the least compile time."""
    env = {"PRESET": "tiny", "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"), "VOCAB_SIZE": "512",
           "TRAIN_BATCH_TOKENS": "512", "MICRO_BATCH_SEQS": "2", "TTT_CHUNK_TOKENS": "512", "TTT_BATCH_SEQS": "4",
           "EVAL_BATCH_SEQS": "8", "TTT_EPOCHS": "1"}
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters.from_env(env)


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

