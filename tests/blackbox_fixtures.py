"""A tiny teacher for the black-box tests: a 300-token BPE with a chat template and a 1-layer Llama.

Import it from a test module (``from blackbox_fixtures import tiny_model, tiny_tokenizer``);
pytest puts ``tests/`` on ``sys.path``. Built from config classes, offline, in a second.
"""

from __future__ import annotations

import torch

from lightning_distill.data.tokenizer import train_bpe_tokenizer
from lightning_distill.models import causal_lm_from_config

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "alpha beta gamma delta def return import class the of and to in is".split()
PROMPTS = ["alpha beta gamma", "def f(x): return", "the class of delta is", "import gamma"]


def tiny_tokenizer(chat_template: bool = True):
    """A 300-token byte-level BPE trained offline (with a chat template unless told not to)."""
    tok = train_bpe_tokenizer([" ".join(WORDS) * 4, "def f(x):\n    return x\n"], 300)
    tok.chat_template = TEMPLATE if chat_template else None
    return tok


def tiny_model(tokenizer, seed: int = 0):
    """A 1-layer Llama over ``tokenizer``'s vocabulary, random weights drawn under ``seed``."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return causal_lm_from_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
