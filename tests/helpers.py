"""Helpers shared by several test files (and tests/tools/preset_fingerprint.py): each was written in
the file named in its section and moved here unchanged when the tests were regrouped by section."""

import dataclasses
import re

import numpy as np
import torch

import train_gpt as tg
from conftest import quant_spec


# ---------------------------------------------------------------------------------------------
# Byte tables (test_03_data.py)

BOS = 1


def load_sp(path):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(path))


def luts(sp, vocab_size=None) -> tg.ValidationData:
    base, space, boundary = tg.build_byte_luts(sp, vocab_size or sp.vocab_size())
    return tg.ValidationData(torch.zeros(1, dtype=torch.int64), 1, base, space, boundary)


def lut_bytes(vd: tg.ValidationData, stream) -> int:
    """Bytes credited to every target of a token stream, each predicted from the token before it."""
    t = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    return int(vd.target_bytes(t[:-1], t[1:]).sum())


def piece_bytes_by_decoding(sp, i: int, real: int) -> int:
    """Bytes piece i adds when decoded after the ordinary piece `real` (independent of the LUT code)."""
    return len(sp.decode([real, i]).encode()) - len(sp.decode([real]).encode())


def check_every_piece(sp):
    vd = luts(sp)
    real = sp.piece_to_id("a")
    assert not vd.is_boundary[real]
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            assert (vd.base_bytes[i], vd.has_leading_space[i], vd.is_boundary[i]) == (0, False, True), i
        elif sp.is_byte(i):
            assert (vd.base_bytes[i], vd.has_leading_space[i], vd.is_boundary[i]) == (1, False, False), i
        else:
            after_real = vd.target_bytes(torch.tensor([real]), torch.tensor([i])).item()
            after_bos = vd.target_bytes(torch.tensor([BOS]), torch.tensor([i])).item()
            assert after_real == piece_bytes_by_decoding(sp, i, real), sp.id_to_piece(i)
            assert after_bos == after_real - sp.id_to_piece(i).startswith("\u2581"), sp.id_to_piece(i)


# ---------------------------------------------------------------------------------------------
# The frontier model's parameter count (test_04_model.py, test_11_drivers.py, test_01_config.py)

def frontier_param_count(V, L, d, H, kv_heads, mlp_mult, window, n_virtual):
    """Written from frontier.md 2.9, independently of the model code."""
    hd = d // H
    matrices = L * (2 * d * d + 2 * kv_heads * hd * d + 2 * int(mlp_mult * d) * d)
    per_block = L * (d + d + 2 * d + H + H * window)  # attn/mlp scales, resid_mix, q_gain, attn_gate_w
    skips = 2 * min(n_virtual // 2, n_virtual - n_virtual // 2) * d
    return V * d + matrices + per_block + skips + L * 6 + window + 1


# ---------------------------------------------------------------------------------------------
# A tiny PRESET=frontier run's environment (test_11_drivers.py, test_01_config.py, tools/preset_fingerprint.py)

ITERATIONS = 12


def frontier_env(data, **overrides) -> dict:
    env = dict(PRESET="frontier", DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"),
               VOCAB_SIZE="512", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8",
               XSA_LAST_N="5", GATE_WINDOW="8", NUM_LOOPS="1", LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3",
               TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="128", EVAL_BATCH_SEQS="16",
               TRAIN_BATCH_TOKENS="2048", ITERATIONS=str(ITERATIONS), WARMDOWN_ITERS="4",
               # 1 process x 2 micro-batches of 8 = 2 processes x 8: the same arithmetic (the sequential
               # loader is world-size invariant; the preset's coprime loader is not)
               MICRO_BATCH_SEQS="8", TRAIN_LOADER="sequential",
               WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="4", GPTQ_CALIB_BATCHES="2",
               GPTQ_RESERVE_SECONDS="0", TTT_CHUNK_TOKENS="8192", TTT_BATCH_SEQS="16", TTT_EPOCHS="1", COMPILE="0",
               DEVICE="cpu", RUN_ID="frontier",
               EVAL_PHASES="auto")  # every phase, the diagnostics too (the preset's record run: ttt only)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# ---------------------------------------------------------------------------------------------
# Every preset at tiny dims (test_01_config.py, tools/preset_fingerprint.py)

TINY_KEEP_PRESET = {"train_loader", "gptq_reserve_seconds", "ttt_epochs"}


TINY_EXTRA = {"pr639": dict(TTT_FREEZE_BLOCKS=1),  # "the first 9 of 11" becomes the first 1 of 2
              "pr1306": dict(GPTQ_CALIB_BATCHES=2, SLOT_STEPS=2)}


def tiny_preset_env(name: str, data) -> dict:
    if name == "pr1855":
        # plain tiny shards: the CaseOps data path runs in test_03_data.py's tiny run
        return frontier_env(data, PRESET="pr1855", CASEOPS_ENABLED=0, RUN_ID=name, ITERATIONS=4,
                            TRAIN_BATCH_TOKENS=1024,
                            PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=1, TTT_BATCH_SIZE=16,
                            TTT_LORA_RANK=4, TTT_CHUNK_SIZE=128)
    env = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in tg.PRESETS["tiny"].items()
           if k not in TINY_KEEP_PRESET}
    env.update(PRESET=name, DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.model"), VOCAB_SIZE="512", RUN_ID=name,
               ITERATIONS="4", WARMUP_STEPS="1", TRAIN_BATCH_TOKENS="2048", EVAL_STRIDE="128",
               TTT_CHUNK_TOKENS="8192", TTT_EPOCHS="1", GPTQ_RESERVE_SECONDS="0")
    env.update({k: str(v) for k, v in TINY_EXTRA.get(name, {}).items()})
    return env


# ---------------------------------------------------------------------------------------------
# A trained-like state dict and every quantizer option (test_08_quantize.py)

def trained_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with the real names: 2 layers of block matrices, a tied embedding,
    gates and scalars (random, heavy-ish tails as after training)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: (torch.randn(*shape, generator=g) * 0.05 * (1 + torch.rand(shape[0], 1, generator=g))  # noqa: E731
                        if len(shape) == 2 else torch.randn(*shape, generator=g))
    state = {"tok_emb.weight": t(320, 64)}
    for i in range(2):
        for name, shape in (("attn.c_q", (64, 64)), ("attn.c_k", (32, 64)), ("attn.c_v", (32, 64)),
                            ("attn.proj", (64, 64)), ("mlp.fc", (192, 64)), ("mlp.proj", (64, 192))):
            state[f"blocks.{i}.{name}.weight"] = t(*shape)
        state[f"blocks.{i}.attn.attn_gate_w"] = t(4, 12)
        state[f"blocks.{i}.attn_scale"] = t(64)
    state["blocks.1.attn.attn_gate.weight"] = t(4, 12)  # a gate shaped and named like a block matrix
    state["skip_gates"] = t(1, 64)
    state["smear_gate.weight"] = t(1, 12)
    return state


ALL_OPTIONS = quant_spec(quant_clip="sdclip", quant_embed="gptq", embed_bits=7, gated_attn_quant_gate=True,
                         lqer_enabled=True, lqer_top_k=2)


# ---------------------------------------------------------------------------------------------
# GPTQ on a tiny GPT with trained-like weights (test_07_calibrate.py, test_08_quantize.py)

BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")


def output_error(X: torch.Tensor, W: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> float:
    D = (W.double() - tg.dequantize_rows(q, s).double())
    return float((X.double() @ D.T).pow(2).sum())


def realistic_model(hparams, vocab_size: int | None = None, seed: int = 1) -> tg.GPT:
    """A tiny GPT whose weights have trained-like magnitudes: block matrices with rows above the
    1/31 floor, nonzero zero-initialised projections and bigram table."""
    cfg = tg.ModelConfig.of(hparams)
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tg.is_int6_matrix(name, p) or name == "tok_emb.weight":
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def token_batches(vocab: int, n: int = 3, B: int = 4, T: int = 64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


# ---------------------------------------------------------------------------------------------
# bench_gpu_step's output (test_12_two_process.py, test_13_tools.py)

def bench_step_rows(out: str) -> tuple[list[dict], list[str], dict]:
    """bench_gpu_step's measured rows (key=value dicts), its skipped rows and its done line."""
    lines = [line.removeprefix("bench_step:") for line in out.splitlines() if line.startswith("bench_step:")]
    kv = lambda text: dict(w.split("=", 1) for w in text.split() if "=" in w)  # noqa: E731
    rows = [kv(x) for x in lines if x.startswith("compile_mode=")]
    return rows, [x for x in lines if x.startswith("skipped ")], kv(lines[-1].removeprefix("done"))
