r"""
The chat template of the original WiggleGPT release, as plain text (GPT-2 BPE, no added tokens):

    <|system|>\n{system prompt}\n<|/system|>\n
    <|user|>\n{message}\n<|/user|>\n<|assistant|>\n{reply}\n<|/assistant|>\n

and a conversation ends with <|endoftext|> (codec.EOT_ID).
"""

CHAT_STOPS = ('<|/assistant|>', '<|endoftext|>', '<|user|>')  # where a reply ends


def chat_turn(role, content):
    """One turn of a conversation: role is 'system', 'user' or 'assistant'."""
    return f'<|{role}|>\n{content}\n<|/{role}|>\n'
