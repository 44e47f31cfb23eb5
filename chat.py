r"""
Chat with an instruction-tuned WiggleGPT checkpoint:
    python chat.py --out_dir=out-wigglegpt-finetune-native
    python chat.py --ckpt=hf:edeneldith/WiggleGPT/ckpt_finetune.pt
    python chat.py --web=True            (the same chat in the browser, at http://127.0.0.1:8000)
Type a message after `You: `; /help lists the commands. With stdin not a terminal each input
line is one user turn, so a conversation can be scripted: printf 'Hi\nquit\n' | python chat.py

The model must use GPT-2 BPE (a character-level one is refused in one line). Each turn is sent as
the original release's template, in plain text (chat_template.py); the system turn comes first only
with --system. --show_prompt=True prints the exact text the model gets, on stderr. The reply streams
as it is generated and ends at <|/assistant|>, <|endoftext|> or <|user|>, none of them shown; a
reply that runs to max_new_tokens instead is noted on stderr. The history keeps whole exchanges and
drops the oldest so that the prompt plus room for a reply (max_new_tokens, at most half the context)
fits in block_size.

Commands: quit or exit (or Ctrl-D), clear (forget the conversation), /temp X, /topk N, /help.
Ctrl-C stops the current reply only, and that exchange is not kept. The defaults are the original's
(temperature 0.7, top_k 50, max_new_tokens 512, repetition penalty 1.15 over the last 64 tokens),
except that the template markers are exempt from the penalty, so it never discourages the stop
marker.

--web=True serves the same chat as one page, and the OpenAI chat API beside it (web_chat.py: Starlette
on uvicorn), at http://127.0.0.1:8000 (the API at /v1: OpenAI(base_url='http://127.0.0.1:8000/v1',
api_key='...') and any client or chat front-end that speaks it). --host and --port choose the address
(--port=0 picks a free port; an IPv6 address such as --host=::1 works). It listens on this machine only
unless --host names another address (0.0.0.0: every one), which needs --api_key=SECRET (every request
carries it as a Bearer token; a browser asks for it as the password) or --allow_anyone=True; startup
says who can reach it. On every host it answers only requests addressed to its own address or to one of
this machine's names (localhost, 127.0.0.1, ::1, its host name); --allowed_hosts=name1,name2 adds more
(each without a port), such as the name or address other machines reach it by. The model is loaded once.
The page streams each reply, keeps the conversation and sends it with each message, so the server trims
it as the REPL does (and the page forgets what was dropped); it offers temperature, top-k, a system
prompt (the operator's --system applies unless a visitor writes one; the page shows it only with
--show_system=True), Stop (or Escape) and Clear. Replies are generated one at a time, first come, first
served (a waiting tab says so); closing a tab or pressing Stop ends its reply at the next token. A bad
request gets a 4xx with a one-line reason (the API: OpenAI's error object), which the page shows. The
limits (a deadline per request, connections per client, the queue's length) are in web_chat.py's docstring.
"""

import sys

out_dir = 'out-wigglegpt-finetune-native'
ckpt = 'ckpt.pt'  # in out_dir ('ckpt_best.pt', an exported folder), a hub name hf:OWNER/REPO/FILE.pt, or gpt2...
system = ''  # an optional system prompt, kept at the start of every conversation
max_new_tokens: '>= 1' = 512
temperature: '>= 0' = 0.7  # 0 is greedy
top_k: '>= 0' = 50  # 0 disables
top_p: 'in (0, 1]' = 1.0  # 1.0 disables
repetition_penalty: 'in [0.01, 100]' = 1.15  # 1.0 disables; markers never penalised (sample_bio.py says why bounded)
penalty_window: '>= 1' = 64  # how many recent tokens the penalty looks at
seed: '>= 0' = 1337
device = 'auto'
dtype = 'auto'
compile = False
show_prompt = False  # print the exact text sent to the model (to stderr) before each reply
web = False  # serve the chat as a web page instead of the terminal REPL
host = '127.0.0.1'  # web: the address to listen on; 0.0.0.0 opens it to other machines
port: 'in [0, 65535]' = 8000  # web: 0 picks a free port
allowed_hosts = ''  # web: more host names the page may be reached by, comma-separated (e.g. a machine's LAN name)
api_key = ''  # web: a key every request must carry (Bearer token; a browser's password); needed off loopback;
# never printed (in a config file, rather than --api_key, it stays out of the machine's process list)
allow_anyone = False  # web: off loopback without a key, anyone who can reach the port may chat
show_system = False  # web: the page shows the --system prompt to its visitors
# -----------------------------------------------------------------------------
from configurator import allows, configure, declared_rules, fail, settings_in  # noqa: E402

RULES = declared_rules(__file__)  # the REPL's /temp and /topk are held to them too
globals().update(configure(settings_in(globals()), sys.argv[1:], RULES))
# imported once the settings are read: a mistake in them is reported at once, not after torch's seconds
import torch  # noqa: E402

import devices  # noqa: E402
from chat_template import chat_turn  # noqa: E402
from chatbot import Chatbot  # noqa: E402
from checkpoints import checkpoint_location  # noqa: E402
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
if web:
    import web_chat
    if temperature > web_chat.MAX_TEMPERATURE:  # the page's requests are held to it too
        fail(f'temperature={temperature} is more than the web chat allows ({web_chat.MAX_TEMPERATURE:g})')
location = checkpoint_location(out_dir, ckpt)
try:
    bot = Chatbot(location, device, dtype, compile)
except ValueError as e:
    fail(str(e))
generator = torch.Generator(device=device).manual_seed(seed)
if web:
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, penalty_window=penalty_window)
    try:
        server = web_chat.ChatServer(bot, generator, sampling, system, host, port, allowed_hosts, api_key, allow_anyone,
                                     show_system)
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
        name, kind, example = ('temperature', float, '0.7') if command == '/temp' else ('top_k', int, '50')
        try:
            value = kind(argument)
        except ValueError:
            value = None
        if value is None or not allows(RULES[name], value):  # allows() refuses nan and inf too
            print(f'{command} needs a{" whole" if kind is int else ""} number {RULES[name]} (as --{name}), '
                  f'e.g. {command} {example}')
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
    except ValueError as e:  # output that is not finite: every later reply would be the same
        print(flush=True)
        fail(str(e))
    print()
    if bot.ran_out(generated, max_new_tokens):
        print(f'[the reply ran to max_new_tokens={max_new_tokens} without its end marker]', file=sys.stderr)
    exchanges.append(chat_turn('user', line) + chat_turn('assistant', reply.strip()))
