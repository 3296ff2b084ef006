"""Helpers for the document-isolated eval tests: a tiny model with visible context effects and a
validation stream of BOS-separated documents of chosen lengths, with random byte tables."""

import numpy as np
import torch

import train_gpt as tg

BOS = 1
L, C = 32, 8  # EVAL_SEQ_LEN and TTT_CHUNK_SIZE of the tests: 4 chunks per full window
# Many lengths: 1 (a BOS followed by the next BOS), < C, = C, < L, = L, > L, several x L.
DOC_LENGTHS = [70, 1, 5, 33, 8, 1, 100, 12, 32, 9, 2, 41, 17, 65, 3]


def doc_env(tiny_data, **overrides) -> dict:
    from conftest import tiny_env
    base = dict(EVAL_SEQ_LEN=L, TTT_CHUNK_SIZE=C, EVAL_BATCH_SEQS=5, EVAL_MODE="doc", TTT_BATCH_SIZE=3,
                TTT_LORA_RANK=4, TTT_LORA_ALPHA=8, TTT_LORA_LR=0.02, TTT_BETA2=0.99, TTT_WEIGHT_DECAY=0.5,
                PHASED_TTT_NUM_PHASES=0, PHASED_TTT_PREFIX_DOCS=6, GLOBAL_TTT_LR=0.05, GLOBAL_TTT_CHUNK_TOKENS=64,
                GLOBAL_TTT_BATCH_SEQS=2)
    base.update(overrides)
    return tiny_env(tiny_data, **base)


def noisy_model(h: tg.Hyperparameters, seed: int = 1) -> tg.GPT:
    """The tiny model with noise on every parameter, so that predictions depend on the context."""
    m = tg.GPT(tg.ModelConfig.of(h))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def doc_stream(vocab: int, lengths=DOC_LENGTHS, lead: int = 0, seed: int = 0) -> np.ndarray:
    """`lead` tokens without BOS, then one document per length: BOS + length-1 tokens (never BOS),
    then a final BOS, which is the last document's last target."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(4, vocab, lead)]
    for n in lengths:
        parts += [[BOS], rng.integers(4, vocab, n - 1)]
    return np.concatenate(parts + [[BOS]]).astype(np.int64)


def make_val(tokens: np.ndarray, vocab: int, tail: int = 0, seed: int = 0) -> tg.ValidationData:
    rng = np.random.default_rng(seed)
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:4] = True
    return tg.ValidationData(torch.from_numpy(tokens), len(tokens) + tail,
                             torch.from_numpy(rng.integers(0, 4, vocab).astype(np.int64)),
                             torch.from_numpy(rng.random(vocab) < 0.3), boundary)


class CountingLosses(tg.TokenLosses):
    """TokenLosses that also counts how often each target index is recorded."""

    def __init__(self, n: int, device):
        super().__init__(n, device)
        self.count = torch.zeros(n, dtype=torch.int64)

    def record(self, target_idx, nll):
        super().record(target_idx, nll)
        self.count.index_add_(0, target_idx.cpu(), torch.ones(len(target_idx), dtype=torch.int64))


def run_doc(model, val, h, rt, lora: bool):
    """(result, losses) of the doc phase (lora=False) or of LoRA TTT on a copy of the model."""
    import copy
    spans = tg.document_spans(val.tokens.numpy(), BOS)
    losses = CountingLosses(val.stream_len, rt.device)
    if lora:
        r = tg.lora_ttt_evaluate(copy.deepcopy(model), val, spans, h, rt, losses)
    else:
        r = tg.evaluate_docs(tg.nll_function(model), val, spans, h, rt, losses)
    return r, losses


# ---------------------------------------------------------------------------------------------
# Random token rows with BOS about every bos_every tokens (test_03_data.py, test_07_calibrate.py)

def random_ids(shape, bos_every: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    ids = g.integers(4, 60, shape)
    ids[g.random(shape) < 1 / bos_every] = BOS
    return torch.from_numpy(ids)
