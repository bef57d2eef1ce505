"""A tiny, randomly initialized teacher (transformers LlamaForCausalLM + a character tokenizer)
built offline in well under a second, for tests and examples. Imports transformers when called."""
from __future__ import annotations

import string


def tiny_tokenizer():
    """Character-level PreTrainedTokenizerFast: <unk>=0, <eos>=1, then printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def tiny_teacher(vocab_size: int = 1031, hidden: int = 32, layers: int = 2, seed: int = 0,
                 tie: bool = True, logit_spread: float = 3.0, **config_kw):
    """(model, tokenizer): a Llama with `vocab_size` >= the tokenizer's size, weights scaled so the
    next-token distributions are peaked like a trained model's (logit std about `logit_spread`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size must be >= {len(tok)}")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=tie,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None,
                      **config_kw)
    g = torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w.normal_(0.0, logit_spread / hidden ** 0.5, generator=g)
    model.eval()
    model.requires_grad_(False)
    return model, tok
