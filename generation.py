"""
Generation from a model: sampling the next token (temperature, top-k, top-p, a repetition
penalty), generating with the KV cache, and turning the tokens into text as they come.

generate_tokens, used by sample_bio.py and chat.py, takes temperature (0 is greedy), top-k, top-p,
a seeded torch.Generator, and a repetition penalty over the last penalty_window tokens that divides
positive logits and multiplies negative ones, so a seen token always gets less likely (the original
divided both, which made seen tokens with negative logits more likely); it spares an exemption list
(the chat template's markers). With the KV cache each step runs only the newest token. Once the text
is longer than block_size the model sees the last block_size tokens; every position then shifts at
each step, so the cache is rebuilt from that window at each step. The tokens are therefore always
exactly those of recomputing the whole context (tested for greedy and seeded sampling, with learned
positions, RoPE and no positions), and the cache pays off only within the context length.
stream_text turns the tokens into text as they are generated, ending before a stop sequence and
holding back text that may be the start of one.
"""

import torch
import torch.nn.functional as F


def apply_repetition_penalty(logits, recent_ids, penalty, exempt_ids=()):
    """Make each token seen in recent_ids less likely: positive logits divided by penalty, negative multiplied.

    exempt_ids (e.g. chat template markers) are never penalised. logits: (vocab,), changed in place.
    """
    penalised = sorted(set(recent_ids) - set(exempt_ids))
    if penalty == 1.0 or not penalised:
        return logits
    index = torch.tensor(penalised, device=logits.device)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id from logits (vocab,): greedy at temperature 0, else softmax sampling after top-k and top-p."""
    if temperature < 1e-6:  # greedy; a tinier one would only overflow the scaled logits
        return int(logits.argmax())
    logits = (logits - logits.max()) / temperature  # the same softmax; the largest at 0 cannot overflow
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        # keep the most likely tokens until their probabilities sum to top_p (at least one)
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[0] = False  # a top_p too small for float32 (1e-300) is 0 there and would mask every token
        logits = logits.masked_fill(outside.scatter(0, order, outside), float('-inf'))
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, penalty_window=64, penalty_exempt=(), generator=None, use_cache=True):
    """Yield up to max_new_tokens token ids that continue prompt_ids (a list of at least one id).

    The model sees the last block_size tokens. With use_cache each step feeds only the newest
    token; once the text outgrows block_size the window slides, every position changes and the
    cache is rebuilt from the window at each step, so the tokens always equal a full recompute.
    repetition_penalty applies to the ids among the last penalty_window tokens, except penalty_exempt.
    Output that is not finite raises ValueError (one line).
    """
    assert len(prompt_ids) > 0, 'the prompt needs at least one token'
    block_size = model.config.block_size
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    kv_cache = None
    for _ in range(max_new_tokens):
        # no_grad per step, not as a decorator: a caller may stop reading (a stop sequence) and leave
        # this generator suspended, and a decorated generator complains when it is collected later
        with torch.no_grad():
            if kv_cache is not None and len(ids) <= block_size:
                logits, _ = model(torch.tensor([ids[-1:]], device=device), kv_cache=kv_cache)
            else:
                kv_cache = model.new_kv_cache() if use_cache else None
                logits, _ = model(torch.tensor([ids[-block_size:]], device=device), kv_cache=kv_cache)
        logits = logits[0, -1].float()
        if not torch.isfinite(logits).all():  # NaN would sample garbage (or raise deep in torch); stop in one line
            raise ValueError(f'the model\'s output is not finite (NaN or infinity) at new token {len(ids) - len(prompt_ids) + 1}: '
                             'its weights or its dtype\'s range cannot be sampled from (try --dtype=float32)')
        apply_repetition_penalty(logits, ids[-penalty_window:], repetition_penalty, penalty_exempt)
        next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
        ids.append(next_id)
        yield next_id


def stream_text(token_ids, decode, stop_sequences=()):
    """Turn a stream of token ids into text pieces as they become final; end before the first stop sequence.

    Text that may be the start of a stop sequence (or of a character still being spelled out in
    UTF-8 bytes) is held back until the next tokens settle it; the start of a stop sequence that the
    tokens end in (a reply cut off by max_new_tokens while writing its end marker) is never shown.
    """
    def partial_stop(text):  # the length of the longest start of a stop sequence that text ends with
        return max([n for s in stop_sequences for n in range(1, len(s)) if text.endswith(s[:n])], default=0)

    ids, shown, text = [], 0, ''
    for token in token_ids:
        ids.append(token)
        text = decode(ids)
        hits = [text.find(s, max(shown - len(s), 0)) for s in stop_sequences]
        hits = [h for h in hits if h >= 0]
        if hits:
            if min(hits) > shown:
                yield text[shown:min(hits)]
            return
        ready = len(text)
        while ready > shown and text[ready - 1] == '\ufffd':
            ready -= 1
        ready -= partial_stop(text[:ready])
        if ready > shown:
            yield text[shown:ready]
            shown = ready
    end = len(text) - partial_stop(text)
    if end > shown:
        yield text[shown:end]
