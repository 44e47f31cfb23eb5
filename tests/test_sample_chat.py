"""
sample_bio.py and chat.py run as users run them.

    python -m pytest tests/test_sample_chat.py              (-m "not slow": the quick ones only)
"""

import re
import shutil

import pytest

from conftest import message_lines, run_script, write_bpe_checkpoint


@pytest.mark.slow
def test_sample_script_streams_from_a_trained_checkpoint(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    proc = run_script(workdir, 'sample_bio.py', '--out_dir=out', '--device=cpu', '--start=hello',
                      '--num_samples=2', '--max_new_tokens=5', '--top_p=0.9', '--repetition_penalty=1.2',
                      '--ckpt=ckpt_best.pt', fresh=True)
    samples = proc.stdout.split('---------------')
    assert len(samples) == 3 and samples[-1].strip() == ''
    for sample in samples[:2]:
        text = sample.strip('\n')
        assert text.startswith('hello') and len(text) == len('hello') + 5  # character-level: 5 new characters
    (workdir / 'prompt.txt').write_text('abc')
    proc = run_script(workdir, 'sample_bio.py', '--out_dir=out', '--device=cpu', '--start=FILE:prompt.txt',
                      '--num_samples=1', '--max_new_tokens=3', '--temperature=0', '--dtype=float16')
    assert proc.stdout.startswith('abc') and len(proc.stdout.split('---------------')[0].strip()) == 6


@pytest.mark.slow
def test_sample_script_user_mistakes_are_one_line_errors(workdir, tiny_run):
    shutil.copytree(tiny_run, workdir / 'out')
    (workdir / 'junk.pt').write_text('not a checkpoint')
    for args, message in [(['--out_dir=nowhere'], 'no checkpoint at'),
                          (['--out_dir=.', '--ckpt=junk.pt'], 'not a readable checkpoint'),
                          (['--out_dir=out', '--start=hello!'], "outside the model's 50-character vocabulary"),
                          (['--out_dir=out', '--start=FILE:missing.txt'], 'prompt file missing.txt not found'),
                          (['--out_dir=out', '--dtype=half'], "dtype='half' is not one of")]:
        proc = run_script(workdir, 'sample_bio.py', '--device=cpu', *args, check=False)
        assert proc.returncode != 0, args
        assert message in proc.stderr and len(message_lines(proc.stderr)) == 1, (args, proc.stderr)


def chat(workdir, lines, *args, fresh=False):
    return run_script(workdir, 'chat.py', '--out_dir=chat', '--device=cpu', '--temperature=0', '--max_new_tokens=6',
                      '--show_prompt=True', *args, input=''.join(line + '\n' for line in lines), fresh=fresh)


@pytest.mark.slow
def test_chat_through_a_pipe_sends_the_template_and_clears(workdir):
    write_bpe_checkpoint(workdir / 'chat', block_size=256)
    proc = chat(workdir, ['Hello there', 'How are you?', 'clear', 'Third turn', 'quit', 'never read'],
                '--system=Be brief.', fresh=True)
    assert proc.returncode == 0
    assert proc.stdout.count('WiggleGPT: ') == 3 and '(conversation cleared)' in proc.stdout
    assert 'never read' not in proc.stdout
    prompts = re.findall(r'\[prompt\](.*?)\[/prompt\]', proc.stderr, re.S)
    replies = re.findall(r'WiggleGPT: (.*)', proc.stdout)
    system = '<|system|>\nBe brief.\n<|/system|>\n'
    assert prompts[0] == system + '<|user|>\nHello there\n<|/user|>\n<|assistant|>\n'
    assert prompts[1] == (system + '<|user|>\nHello there\n<|/user|>\n'
                          f'<|assistant|>\n{replies[0].strip()}\n<|/assistant|>\n'
                          '<|user|>\nHow are you?\n<|/user|>\n<|assistant|>\n')
    assert prompts[2] == system + '<|user|>\nThird turn\n<|/user|>\n<|assistant|>\n'  # clear forgot the rest


@pytest.mark.slow
def test_chat_never_penalises_the_template_markers(workdir):
    # A reply ends with the closing marker: penalising its tokens for repetition would keep the model talking.
    # chat.py is run as a user runs it, with generate_tokens wrapped to record what it was told to spare.
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    write_bpe_checkpoint(workdir / 'chat', block_size=256)
    (workdir / 'spy.py').write_text(
        "import runpy, sys, generation\n"
        "real = generation.generate_tokens\n"
        "def spy(*args, **kwargs):\n"
        "    print('exempt', sorted(kwargs['penalty_exempt']), file=sys.stderr)\n"
        "    return real(*args, **kwargs)\n"
        "generation.generate_tokens = spy\n"
        "sys.argv = ['chat.py'] + sys.argv[1:]\n"
        "runpy.run_path('chat.py', run_name='__main__')\n")
    proc = run_script(workdir, 'spy.py', '--out_dir=chat', '--device=cpu', '--max_new_tokens=2',
                      '--repetition_penalty=1.3', input='Hi\n')
    exempt = set(eval(re.search(r'^exempt (.*)$', proc.stderr, re.M).group(1)))
    for marker in ('\n<|/assistant|>\n', '<|user|>\n', '<|/user|>\n', '<|assistant|>\n', '<|endoftext|>'):
        assert set(enc.encode(marker, allowed_special='all')) <= exempt, marker
    assert not set(enc.encode(' apples pears')) & exempt  # ordinary words are still penalised


@pytest.mark.slow
def test_chat_drops_the_oldest_turns_to_fit_block_size(workdir):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    # an exchange is about 40 tokens: two fit in 96 with room for a 6-token reply, three do not
    write_bpe_checkpoint(workdir / 'chat', block_size=96)
    turns = ['first question about apples and pears', 'second question about ships', 'third one']
    proc = chat(workdir, turns)
    prompts = re.findall(r'\[prompt\](.*?)\[/prompt\]', proc.stderr, re.S)
    assert len(prompts) == 3
    assert all(len(enc.encode(p)) + 6 <= 96 for p in prompts)
    assert 'apples' in prompts[1] and 'ships' in prompts[1]
    assert 'apples' not in prompts[2] and prompts[2].startswith('<|user|>\nsecond question about ships\n')
    assert prompts[2].endswith('<|user|>\nthird one\n<|/user|>\n<|assistant|>\n')


@pytest.mark.slow
def test_chat_commands_and_bad_checkpoints(workdir, tiny_run):
    write_bpe_checkpoint(workdir / 'chat', block_size=64)
    proc = chat(workdir, ['/help', '/temp 0.5', '/temp hot', '/topk 5', '/nonsense', 'exit'])
    assert 'clear' in proc.stdout and '(temp = 0.5)' in proc.stdout and '(topk = 5)' in proc.stdout
    assert '/temp needs a number' in proc.stdout and 'unknown command /nonsense' in proc.stdout
    assert 'WiggleGPT: ' not in proc.stdout
    # a character-level checkpoint cannot chat: the template needs GPT-2's vocabulary
    shutil.copytree(tiny_run, workdir / 'out')
    proc = run_script(workdir, 'chat.py', '--out_dir=out', '--device=cpu', check=False, input='hi\n')
    assert proc.returncode != 0 and 'needs a GPT-2 BPE model' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_chat_commands_hold_values_to_the_settings_rules(workdir):
    # /temp nan was taken (nan < 0 is False) and the next reply crashed in torch.multinomial
    write_bpe_checkpoint(workdir / 'chat', block_size=64)
    proc = chat(workdir, ['/temp nan', '/temp inf', '/temp -1', '/topk -1', '/topk 2.5', 'Hi', 'quit'])
    assert proc.stdout.count('/temp needs a number >= 0 (as --temperature), e.g. /temp 0.7') == 3
    assert proc.stdout.count('/topk needs a whole number >= 0 (as --top_k), e.g. /topk 50') == 2
    assert '(temp' not in proc.stdout and '(topk' not in proc.stdout
    assert proc.stdout.count('WiggleGPT: ') == 1 and 'Traceback' not in proc.stderr
