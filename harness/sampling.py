"""Text from a trained GPT on CPU: the prompt through GPT-2's tokenizer, then one token at a time.

`generate` is greedy (argmax) at temperature 0; otherwise it samples from softmax(logits / T),
restricted to the top_k most likely tokens when top_k is given, with a torch.Generator seeded by
`seed` (the same seed, the same text). Only the model ids that stand for a token are candidates
(the padding rows of a padded vocabulary never are). The context is the last `context` tokens
(the run's seq_len). Generation stops after max_new_tokens or at <|endoftext|>, the end of a
document.
"""

from __future__ import annotations

import torch

from base import UserError
from harness.export import Vocab
from harness.model import GPT


@torch.no_grad()
def generate(model: GPT, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, n_real: int | None = None, stop_id: int | None = None,
             context: int | None = None) -> list[int]:
    """The new model ids (without the prompt's)."""
    if not ids:
        raise ValueError("generate needs at least one prompt token")
    n_real = n_real or model.shape.vocab_size
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.tensor([ids], dtype=torch.long)
    out: list[int] = []
    for _ in range(max_new_tokens):
        window = x if context is None else x[:, -context:]
        logits = model.logits(window)[0, -1, :n_real].float()
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        out.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def prompt_ids(vocab: Vocab, prompt: str) -> list[int]:
    """<|endoftext|> (a document starts with it in the shards), then the prompt's tokens."""
    eot = vocab.eot()
    ids = ([] if eot is None else [eot]) + vocab.encode(prompt)
    if not ids:
        raise UserError("--prompt is empty and this model's vocabulary has no <|endoftext|> to start from")
    return ids


def sample_text(model: GPT, vocab: Vocab, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                top_k: int | None = None, seed: int = 0, context: int | None = None) -> tuple[str, list[int]]:
    """(the continuation as text, its model ids); <|endoftext|> ends it and is not part of the text."""
    eot = vocab.eot()
    new = generate(model, prompt_ids(vocab, prompt), max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   n_real=vocab.n_real, stop_id=eot, context=context)
    text_ids = new[:-1] if new and new[-1] == eot else new
    return vocab.decode(text_ids), new
