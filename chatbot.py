"""
A chat with an instruction-tuned checkpoint, shared by chat.py's terminal REPL and its web page
(web_chat.py): the model loaded once, the prompt of a conversation with its oldest exchanges dropped
until a reply fits the context, and the reply streamed piece by piece.
"""

import torch

import devices
from chat_template import CHAT_STOPS, chat_turn
from checkpoints import load_model
from codec import EOT_ID, load_codec
from generation import generate_tokens, stream_text

# a reply's closing marker follows a newline that belongs to the template, not to the reply
REPLY_STOPS = tuple('\n' + s for s in CHAT_STOPS) + CHAT_STOPS


class Chatbot:
    """A model that chats. Raises ValueError (one line) for a checkpoint that cannot."""

    def __init__(self, location, device, dtype, compile=False):
        self.model, checkpoint = load_model(location, device)
        self.autocast = devices.autocast(device, dtype)
        vocab_size = checkpoint['model_args']['vocab_size']
        if vocab_size < 50257:
            raise ValueError(f'chat.py needs a GPT-2 BPE model; {location} has a {vocab_size}-token vocabulary '
                             '(use sample_bio.py for it)')
        self.model.eval()
        if compile:
            self.model = torch.compile(self.model)
        self.encode, self.decode = load_codec(checkpoint)
        self.block_size = checkpoint['model_args']['block_size']
        # markers are part of every turn: penalising them would keep the model from ending its reply
        self.marker_ids = {EOT_ID}
        for role in ('system', 'user', 'assistant'):
            self.marker_ids.update(self.encode(chat_turn(role, '')))

    def reply_room(self, max_new_tokens):
        """Tokens kept free for the reply: max_new_tokens, but at most half the context."""
        return min(max_new_tokens, self.block_size // 2)

    def prompt(self, system, exchanges, user_text, max_new_tokens):
        """(template text of the conversation, how many of the oldest exchanges were dropped to make
        room for a reply); exchanges holds one string per user turn + assistant turn."""
        head = chat_turn('system', system) if system else ''
        tail = chat_turn('user', user_text) + '<|assistant|>\n'
        budget = self.block_size - self.reply_room(max_new_tokens)
        # each exchange is a token at least: of a longer history only the last block_size can fit, and the
        # rest is not encoded at all (a web client may send thousands)
        first = max(0, len(exchanges) - self.block_size)
        # each exchange encoded once, so a long history costs linear time; the oldest go until the rest fit
        sizes = [0] * first + [len(self.encode(e)) for e in exchanges[first:]]
        total, dropped = len(self.encode(head + tail)) + sum(sizes), first
        while dropped < len(exchanges) and total > budget:
            total -= sizes[dropped]
            dropped += 1
        while True:  # the text itself decides: BPE may merge tokens across the joins
            text = head + ''.join(exchanges[dropped:]) + tail
            if dropped == len(exchanges) or len(self.encode(text)) <= budget:
                return text, dropped
            dropped += 1

    def reply(self, prompt, generated, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
              penalty_window, generator, should_stop=lambda: False, stops=()):
        """Yield the reply's text pieces as they become final, up to its end marker or one of stops (more
        stop strings); the token ids go into the list generated (to tell afterwards whether the reply ran
        out of room). should_stop() is asked before each token: True ends the reply there."""
        tokens = generate_tokens(self.model, self.encode(prompt), max_new_tokens, temperature=temperature,
                                 top_k=top_k or None, top_p=top_p, repetition_penalty=repetition_penalty,
                                 penalty_window=penalty_window, penalty_exempt=self.marker_ids, generator=generator)

        def until_stopped():
            while not should_stop():
                with self.autocast:
                    token = next(tokens, None)
                if token is None:
                    return
                generated.append(token)
                yield token

        yield from stream_text(until_stopped(), self.decode, REPLY_STOPS + tuple(stops))

    def ran_out(self, generated, max_new_tokens, stops=()):
        """Whether a reply ended at max_new_tokens without its end marker (or one of stops)."""
        text = self.decode(generated)
        return len(generated) == max_new_tokens and not any(s in text for s in CHAT_STOPS + tuple(stops))
