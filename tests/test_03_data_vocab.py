"""Any SentencePiece vocabulary (issue 9 item 1): with VOCAB_SIZE=8192 and the 8192-token model, the
byte tables built from TOKENIZER_PATH satisfy rule E2 on the sp8192 stand-in validation documents
(sum of table bytes == UTF-8 bytes of the decoded documents, per document and over the stream, and
per piece); a VOCAB_SIZE that does not match the tokenizer stops the run with one ConfigError line
naming VOCAB_SIZE and nothing written. On the sp8192 sample shipped in tests/data (every clone), and
the E2 proof also on the full stand-in shard where ../shared/data is present.

    python3 -m pytest -q tests/test_03_data_vocab.py
"""

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SAMPLE_DOCS, SAMPLE_SHARDS, SAMPLE_TOKENIZER, SHARED_DATA
from helpers import BOS, check_every_piece, lut_bytes

SP8192 = SAMPLE_TOKENIZER[8192]
SHARDS8192 = SAMPLE_SHARDS[8192]
SHARED_SP8192 = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
SHARED_SHARDS8192 = SHARED_DATA / "standin_sp8192"
shared_data = pytest.mark.skipif(not (SHARED_SP8192.exists() and (SHARED_SHARDS8192 / "fineweb_val_000000.bin").exists()),
                                 reason="../shared/data (sp8192 tokenizer and stand-in shards) not present")
# (tokenizer, shard folder, documents in its val shard)
SOURCES = {"sample": (SP8192, SHARDS8192, SAMPLE_DOCS), "shared": (SHARED_SP8192, SHARED_SHARDS8192, 300)}


def env8192(source: str = "sample", **overrides) -> dict:
    tokenizer, shards, _ = SOURCES[source]
    env = {"PRESET": "tiny", "VOCAB_SIZE": "8192", "DATA_PATH": str(shards), "TOKENIZER_PATH": str(tokenizer)}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def load_val8192(source: str, runtime):
    h = tg.Hyperparameters.from_env(env8192(source))
    sp = tg.load_tokenizer(h)
    return sp, tg.load_validation(h, sp, runtime, h.eval_seq_len)


@pytest.fixture(scope="module")
def val8192(runtime_module):
    return load_val8192("sample", runtime_module)


@pytest.fixture(scope="module")
def runtime_module():
    return tg.Runtime(distributed=False, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("source", ["sample", pytest.param("shared", marks=shared_data)])
def test_rule_e2_on_every_sp8192_validation_document(source, runtime_module):
    sp, val = load_val8192(source, runtime_module)
    _, shards, n_docs = SOURCES[source]
    assert sp.vocab_size() == 8192 and val.base_bytes.numel() == 8192
    tokens = np.asarray(tg.read_shard(str(shards / "fineweb_val_000000.bin")), dtype=np.int64)
    assert tokens.max() < 8192 and tokens.max() >= 1024  # really uses the large vocabulary
    starts = np.flatnonzero(tokens == BOS)
    assert starts[0] == 0 and len(starts) == n_docs
    total = 0
    for k, doc in enumerate(np.split(tokens, starts[1:])):
        assert doc[0] == BOS and BOS not in doc[1:]
        n = len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert lut_bytes(val, doc) == n, f"document {k}"
        total += n
    assert lut_bytes(val, tokens) == total  # the whole stream, with the tables load_validation gives scoring


def test_every_sp8192_piece_against_decoding(val8192):
    check_every_piece(val8192[0])


def test_vocab_mismatch_is_one_error_naming_vocab_size_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tg.main(env8192(VOCAB_SIZE=1024, RUN_ID="mismatch")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: VOCAB_SIZE=1024 does not match the tokenizer's vocab_size=8192")
    assert list(tmp_path.iterdir()) == []  # no logs/, no artifact


def test_model_and_luts_at_vocab_8192(val8192):
    h = tg.Hyperparameters.from_env(env8192())
    model = tg.GPT(tg.ModelConfig.of(h))
    assert model.tok_emb.weight.shape == (8192, h.model_dim)
    x = val8192[1].tokens[:2 * h.train_seq_len].view(2, -1)
    loss = model(x, val8192[1].tokens[1:2 * h.train_seq_len + 1].view(2, -1))
    assert abs(loss.item() - np.log(8192)) < 0.5  # near-uniform at init over 8192 tokens
