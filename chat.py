"""
Chat with an instruction-tuned WiggleGPT checkpoint:
    python chat.py --out_dir=out-wigglegpt-finetune-native
Type a message after `You: `; /help lists the commands. With stdin not a terminal each input
line is one user turn, so a conversation can be scripted: printf 'Hi\nquit\n' | python chat.py
"""

import os
import sys

import torch

import devices
from chat_template import CHAT_STOPS, chat_turn
from checkpoints import load_model
from codec import EOT_ID, load_codec
from generation import generate_tokens, stream_text

out_dir = 'out-wigglegpt-finetune-native'
ckpt = 'ckpt.pt'  # or 'ckpt_best.pt'
system = ''  # an optional system prompt, kept at the start of every conversation
max_new_tokens = 512
temperature = 0.7  # 0 is greedy
top_k = 50  # 0 disables
top_p = 1.0  # 1.0 disables
repetition_penalty = 1.15  # 1.0 disables; template markers are never penalised
penalty_window = 64  # how many recent tokens the penalty looks at
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False
show_prompt = False  # print the exact text sent to the model (to stderr) before each reply
# -----------------------------------------------------------------------------
from configurator import configure, fail, settings_in  # noqa: E402

globals().update(configure(settings_in(globals()), sys.argv[1:]))
# -----------------------------------------------------------------------------

HELP = """commands:
  quit, exit   leave (Ctrl-D too)
  clear        forget the conversation so far
  /temp X      set the temperature (0 is greedy)
  /topk N      keep the N most likely tokens (0: all)
  /help        this list
Ctrl-C during a reply stops that reply."""

try:
    device = devices.pick_device(device)
    dtype = devices.pick_dtype(device, dtype)
except ValueError as e:
    fail(str(e))
autocast = devices.autocast(device, dtype)
try:
    model, checkpoint = load_model(os.path.join(out_dir, ckpt), device)
except ValueError as e:
    fail(str(e))
model.eval()
if checkpoint['model_args']['vocab_size'] < 50257:
    fail(f'chat.py needs a GPT-2 BPE model; {out_dir}/{ckpt} has a '
         f'{checkpoint["model_args"]["vocab_size"]}-token vocabulary (use sample_bio.py for it)')
if compile:
    model = torch.compile(model)
encode, decode = load_codec(checkpoint)
block_size = model.config.block_size
# markers are part of every turn: penalising them would keep the model from ending its reply
marker_ids = {EOT_ID}
for role in ('system', 'user', 'assistant'):
    marker_ids.update(encode(chat_turn(role, '')))
# a reply's closing marker follows a newline that belongs to the template, not to the reply
stops = tuple('\n' + s for s in CHAT_STOPS) + CHAT_STOPS
generator = torch.Generator(device=device).manual_seed(seed)
interactive = sys.stdin.isatty()
if interactive:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass


def build_prompt(exchanges, user_text):
    """The template text for the conversation, dropping the oldest whole exchanges until a reply fits."""
    head = chat_turn('system', system) if system else ''
    tail = chat_turn('user', user_text) + '<|assistant|>\n'
    reply_room = min(max_new_tokens, block_size // 2)
    kept = list(exchanges)
    while True:
        prompt = head + ''.join(kept) + tail
        if len(encode(prompt)) + reply_room <= block_size or not kept:
            return prompt, len(exchanges) - len(kept)
        kept.pop(0)


exchanges = []  # the conversation so far: one string per (user turn + assistant turn)
if interactive:
    print(f'WiggleGPT chat ({out_dir}/{ckpt}); /help for commands')
while True:
    try:
        line = input('You: ' if interactive else '')
    except EOFError:
        if interactive:
            print()
        break
    except KeyboardInterrupt:
        print()
        continue
    line = line.strip()
    if not line:
        continue
    if not interactive:
        print(f'You: {line}')
    command, _, argument = line.partition(' ')
    if line in ('quit', 'exit'):
        break
    if line == 'clear':
        exchanges = []
        print('(conversation cleared)')
        continue
    if line == '/help':
        print(HELP)
        continue
    if command in ('/temp', '/topk'):
        try:
            value = float(argument) if command == '/temp' else int(argument)
            if value < 0:
                raise ValueError
        except ValueError:
            print(f'{command} needs a number >= 0{"" if command == "/temp" else " (whole)"}, e.g. {command} {"0.7" if command == "/temp" else "50"}')
            continue
        if command == '/temp':
            temperature = value
        else:
            top_k = value
        print(f'({command[1:]} = {value})')
        continue
    if line.startswith('/'):
        print(f'unknown command {command}; /help lists them')
        continue

    prompt, dropped = build_prompt(exchanges, line)
    if dropped:
        exchanges = exchanges[dropped:]
    if show_prompt:
        print(f'[prompt]{prompt}[/prompt]', file=sys.stderr, flush=True)
    print('WiggleGPT: ', end='', flush=True)
    reply, generated = '', []
    try:
        with autocast:
            tokens = generate_tokens(model, encode(prompt), max_new_tokens, temperature=temperature,
                                     top_k=top_k or None, top_p=top_p, repetition_penalty=repetition_penalty,
                                     penalty_window=penalty_window, penalty_exempt=marker_ids, generator=generator)
            # generated keeps the reply's token ids, to tell afterwards whether it ran out of room
            for piece in stream_text((generated.append(t) or t for t in tokens), decode, stops):
                print(piece, end='', flush=True)
                reply += piece
    except KeyboardInterrupt:
        print('\n(reply stopped)')
        continue  # an interrupted exchange is not kept
    print()
    if len(generated) == max_new_tokens and not any(s in decode(generated) for s in CHAT_STOPS):
        print(f'[the reply ran to max_new_tokens={max_new_tokens} without its end marker]', file=sys.stderr)
    exchanges.append(chat_turn('user', line) + chat_turn('assistant', reply.strip()))
