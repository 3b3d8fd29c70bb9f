"""A tiny random reward model directory (Llama classifier, one label, byte-level tokenizer
with a chat template), for the examples and the tests: nothing is downloaded.

    write_tiny_reward_model("examples/data/tiny-rm")
"""

from __future__ import annotations

from pathlib import Path

import torch

# ChatML-like turns; `eos` closes each one, so a scored reply ends with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ("<s>", "</s>", "<pad>")


def tiny_tokenizer(chat_template: bool = True):
    """One token per byte (256) plus <s>, </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_reward_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2,
                      pad_token_id: int = 0, max_positions: int = 2048) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, num_labels=1, pad_token_id=pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
        # A random head on a tiny model gives rewards near 0 for everything; a larger one
        # makes them differ by response, as a trained model's do.
        torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.float().eval()


def write_tiny_reward_model(directory: str | Path, seed: int = 0,
                            chat_template: bool = True) -> Path:
    directory = Path(directory)
    tok = tiny_tokenizer(chat_template)
    model = tiny_reward_model(len(tok), seed=seed, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory
