import pytest

from data.tokenizer import EOT, VOCAB_SIZE, gpt2_encoding


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        (" the", [262]),
        ("hello", [31373]),
        (" Hello", [18435]),
        ("\n", [198]),
        ("!", [0]),
    ],
)
def test_known_gpt2_ids(text, ids):
    assert gpt2_encoding().encode_ordinary(text) == ids


def test_special_token():
    enc = gpt2_encoding()
    assert EOT == 50256 and VOCAB_SIZE == 50257 == enc.n_vocab
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.eot_token == EOT
    with pytest.raises(ValueError):  # special text in documents is not silently a special token
        enc.encode("<|endoftext|>")


def test_round_trip_and_cache():
    enc = gpt2_encoding()
    assert gpt2_encoding() is enc
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert max(ids) < VOCAB_SIZE
    assert enc.decode([EOT]) == "<|endoftext|>"
