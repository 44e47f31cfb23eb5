"""
Chat with an instruction-tuned WiggleGPT checkpoint:
    python chat.py --out_dir=out-wigglegpt-finetune-native
    python chat.py --ckpt=hf:edeneldith/WiggleGPT/ckpt_finetune.pt
    python chat.py --web=True            (the same chat in the browser, at http://127.0.0.1:8000)
Type a message after `You: `; /help lists the commands. With stdin not a terminal each input
line is one user turn, so a conversation can be scripted: printf 'Hi\nquit\n' | python chat.py
"""

import sys

import torch

import devices
from chat_template import chat_turn
from chatbot import Chatbot
from checkpoints import checkpoint_location

out_dir = 'out-wigglegpt-finetune-native'
ckpt = 'ckpt.pt'  # in out_dir ('ckpt_best.pt', an exported folder), or a hub name: hf:OWNER/REPO/FILE.pt
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
web = False  # serve the chat as a web page instead of the terminal REPL
host = '127.0.0.1'  # web: the address to listen on; 0.0.0.0 opens it to other machines
port = 8000  # web: 0 picks a free port
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
if web and not 0 <= port <= 65535:
    fail(f'port={port} is not a port number (0 to 65535; 0 picks a free one)')
location = checkpoint_location(out_dir, ckpt)
try:
    bot = Chatbot(location, device, dtype, compile)
except ValueError as e:
    fail(str(e))
generator = torch.Generator(device=device).manual_seed(seed)
if web:
    import web_chat
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, penalty_window=penalty_window)
    try:
        server = web_chat.make_server(bot, generator, sampling, system, host, port)
    except ValueError as e:
        fail(str(e))
    web_chat.serve(server, location)
    sys.exit(0)
interactive = sys.stdin.isatty()
if interactive:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass


exchanges = []  # the conversation so far: one string per (user turn + assistant turn)
if interactive:
    print(f'WiggleGPT chat ({location}); /help for commands')
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

    prompt, dropped = bot.prompt(system, exchanges, line, max_new_tokens)
    if dropped:
        exchanges = exchanges[dropped:]
    if show_prompt:
        print(f'[prompt]{prompt}[/prompt]', file=sys.stderr, flush=True)
    print('WiggleGPT: ', end='', flush=True)
    reply, generated = '', []
    try:
        for piece in bot.reply(prompt, generated, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               penalty_window, generator):
            print(piece, end='', flush=True)
            reply += piece
    except KeyboardInterrupt:
        print('\n(reply stopped)')
        continue  # an interrupted exchange is not kept
    print()
    if bot.ran_out(generated, max_new_tokens):
        print(f'[the reply ran to max_new_tokens={max_new_tokens} without its end marker]', file=sys.stderr)
    exchanges.append(chat_turn('user', line) + chat_turn('assistant', reply.strip()))
