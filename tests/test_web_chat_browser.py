"""
chat.py's web page in a real browser (headless Chromium driven by Playwright), with the keyboard alone:
a message sent with Enter, the settings changed by Tab and typing, a second message that carries the
first exchange as history, and Clear. Skipped where Chromium or the playwright package is missing
(apt install chromium; pip install playwright; .ci/run installs both).

    python -m pytest tests/test_web_chat_browser.py
    WEB_CHAT_CKPT=out-finetune-synthetic/ckpt.pt WEB_CHAT_SCREENSHOTS=shots python -m pytest tests/test_web_chat_browser.py
(WEB_CHAT_CKPT: a fine-tuned checkpoint to talk to instead of a tiny untrained one; WEB_CHAT_SCREENSHOTS:
where the screenshots go, to look at.)
"""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, python, write_bpe_checkpoint

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
playwright = pytest.importorskip('playwright.sync_api', reason='the playwright package is not installed')
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM, reason='Chromium is not installed')]
# as the machine's notes advise: no sandbox as root, and no background connections on a closed network
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


def test_a_conversation_in_the_browser_with_the_keyboard_alone(tmp_path):
    ckpt = os.environ.get('WEB_CHAT_CKPT')
    if not ckpt:
        write_bpe_checkpoint(tmp_path / 'chat', block_size=256)
        ckpt = str(tmp_path / 'chat' / 'ckpt.pt')
    shots = os.environ.get('WEB_CHAT_SCREENSHOTS') or str(tmp_path / 'shots')
    os.makedirs(shots, exist_ok=True)
    server = subprocess.Popen([python(), os.path.join(REPO, 'chat.py'), f'--ckpt={os.path.abspath(ckpt)}',
                               '--device=cpu', '--web=True', '--port=0', '--max_new_tokens=16'],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(' at ')[-1].split(' ')[0]
        assert url.startswith('http://127.0.0.1:'), url
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={'width': 900, 'height': 760})
            sent = []
            page.on('request', lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith('/chat') else None)
            page.goto(url)
            focused = lambda: page.evaluate('document.activeElement.id')  # noqa: E731
            assert focused() == 'message'  # the page opens ready to type

            def reply_count():
                return page.locator('.turn.assistant').count()

            page.keyboard.type('What is 2 plus 3?')
            page.keyboard.press('Enter')
            page.wait_for_function('!document.getElementById("send").disabled && document.querySelectorAll(".assistant").length == 1')
            first_reply = page.locator('.turn.assistant').first.inner_text()
            assert first_reply.startswith('WiggleGPT: ') and focused() == 'message'
            page.screenshot(path=os.path.join(shots, '1-first-reply.png'))

            # the settings by keyboard: Tab past Send and Clear (Stop is disabled) to the temperature
            for expected in ('send', 'clear', 'temperature'):
                page.keyboard.press('Tab')
                assert focused() == expected
            page.keyboard.press('Control+A')
            page.keyboard.type('0')
            page.keyboard.press('Tab')
            assert focused() == 'top_k'
            page.keyboard.press('Control+A')
            page.keyboard.type('5')
            page.keyboard.press('Tab')  # the system prompt's summary: Enter opens it
            page.keyboard.press('Enter')
            page.keyboard.press('Tab')
            assert focused() == 'system'
            page.keyboard.type('Answer briefly.')
            for _ in range(6):  # back to the message box
                page.keyboard.press('Shift+Tab')
            assert focused() == 'message'
            page.keyboard.type('Count from 3 to 7.')
            page.keyboard.press('Enter')
            page.wait_for_function('!document.getElementById("send").disabled && document.querySelectorAll(".assistant").length == 2')
            page.screenshot(path=os.path.join(shots, '2-second-reply-settings.png'))
            assert sent[0]['history'] == [] and sent[0]['message'] == 'What is 2 plus 3?'
            assert sent[1]['history'] == [['What is 2 plus 3?', first_reply[len('WiggleGPT: '):].strip()]]
            assert (sent[1]['temperature'], sent[1]['top_k'], sent[1]['system']) == (0, 5, 'Answer briefly.')

            # Clear, by keyboard: the log empties, the next message goes without history
            page.keyboard.press('Tab')
            page.keyboard.press('Tab')
            assert focused() == 'clear'
            page.keyboard.press('Enter')
            assert reply_count() == 0 and page.locator('#status').inner_text() == 'Conversation cleared.'
            assert focused() == 'message'
            page.keyboard.type('What colour is the sky?')
            page.keyboard.press('Enter')
            page.wait_for_function('!document.getElementById("send").disabled && document.querySelectorAll(".assistant").length == 1')
            assert sent[2]['history'] == []
            page.screenshot(path=os.path.join(shots, '3-after-clear.png'))

            # a bad request shows the server's reason and keeps the message to edit
            page.keyboard.type('word ' * 300)
            page.keyboard.press('Enter')
            page.wait_for_selector('.turn.note >> text=Not sent')
            assert 'tokens too long' in page.locator('.turn.note').last.inner_text()
            assert page.input_value('#message').startswith('word word') and page.locator('.turn.user').count() == 1
            page.screenshot(path=os.path.join(shots, '4-refused.png'))
            browser.close()
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_with_a_key_the_browser_asks_for_it_and_the_page_chats(tmp_path):
    """--api_key: the browser's password prompt (answered here by Playwright) lets the page and its messages
    through; without it the page is refused."""
    write_bpe_checkpoint(tmp_path / 'chat', block_size=128)
    server = subprocess.Popen([python(), os.path.join(REPO, 'chat.py'), '--out_dir=chat', '--device=cpu', '--web=True',
                               '--port=0', '--max_new_tokens=8', '--api_key=sesame'],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(' at ')[-1].split(' ')[0]
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            with pytest.raises(playwright.Error, match='ERR_INVALID_AUTH_CREDENTIALS'):  # headless: no one to ask
                browser.new_page().goto(url)
            page = browser.new_context(http_credentials={'username': 'me', 'password': 'sesame'}).new_page()
            assert page.goto(url).status == 200
            page.keyboard.type('Hello?')
            page.keyboard.press('Enter')
            page.wait_for_function('!document.getElementById("send").disabled && document.querySelectorAll(".assistant").length == 1')
            assert page.locator('.turn.note').count() == 0  # no 'Not sent' or failure note: /chat took the key too
            browser.close()
    finally:
        server.terminate()
        server.communicate(timeout=30)
