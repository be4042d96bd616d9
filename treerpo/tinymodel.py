"""Tiny models and tokenizers, built locally and saved in HF format: the demo's char-level Qwen2,
and a Llama with a byte-level BPE tokenizer and a chat template (the shape of a real chat model).

Nothing is downloaded: the tokenizer is built with the `tokenizers` library from a fixed
alphabet (or trained here, BPE), the model from its config. Saving and reloading with `from_pretrained` runs the
same loading code a real model goes through. Used by the tests, the benches and the demo.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
ALPHABET = list("0123456789+-*/()=;:.,? \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ[]{}\\^_!'\"<>|&%$#@~`")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VLLM_CPU_TINY = {"hidden_size": 128, "num_heads": 2}
"""`build_tiny_model` kwargs for vLLM's CPU backend, whose attention kernels need head_dim 64."""


def build_char_tokenizer(path: str | Path | None = None):
    """A char-level `PreTrainedTokenizerFast`: one id per character, <pad>/<bos>/<eos> first."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 -- transformers loads on use

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="?"
    )
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template of the BPE tokenizer (SmolLM2's and Qwen's shape: <|im_start|>role ... <|im_end|>)."""
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bpe_corpus(n: int = 400) -> list[str]:
    """Chat-style worked arithmetic with the step breaks real BPE vocabularies merge: "\\n\\n" alone,
    "\\n\\n\\n" and " \\n\\n" as single tokens, "." then "\\n\\n" (SmolLM2's vocabulary does the same)."""
    lines = []
    for i in range(n):
        a, b, c = 2 + i % 13, 3 + (i * 7) % 11, 1 + (i * 5) % 9
        breaks = ["\n\n", "\n\n\n", " \n\n", ".\n\n"][i % 4]
        lines.append(f"<|im_start|>user\nWhat is {a} + {b} + {c}?<|im_end|>\n<|im_start|>assistant\n"
                     f"First, {a} + {b} = {a + b}{breaks}Then {a + b} + {c} = {a + b + c}{breaks}"
                     f"The answer is \\boxed{{{a + b + c}}}.<|im_end|>\n")
    return lines


def build_bpe_tokenizer(path: str | Path | None = None, vocab_size: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast` trained here on a fixed corpus (deterministic),
    with ChatML specials (<|endoftext|> = pad, <|im_start|> = bos, <|im_end|> = eos) and template."""
    from tokenizers import trainers  # noqa: PLC0415 -- the char tokenizer does not need it
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 -- transformers loads on use

    core = Tokenizer(models.BPE())
    # words with their leading space, and whitespace runs whole (so "\n\n\n" and " \n\n" can merge)
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[^\s]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_bpe_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    architecture: str = "qwen2",
    tokenizer: str = "char",
) -> Path:
    """Build, save (safetensors + config + tokenizer) and return the folder of a tiny model.

    architecture: "qwen2" (the demo's) or "llama" (SmolLM2's); tokenizer: "char" (one id per
    character) or "bpe" (byte-level BPE with a ChatML template, whose end-of-turn <|im_end|> and
    <|endoftext|> both end generation, as in a real chat model's generation config)."""
    import torch  # noqa: PLC0415 -- treerpo.warmup imports this module; its cached path loads no torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415

    if architecture not in ("qwen2", "llama") or tokenizer not in ("char", "bpe"):
        raise ValueError(f"architecture={architecture!r} (qwen2|llama), tokenizer={tokenizer!r} (char|bpe)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer == "char":
        tok = build_char_tokenizer(path)
        pad, bos, eos = PAD_ID, BOS_ID, [EOS_ID]
    else:
        tok = build_bpe_tokenizer(path)
        pad, bos = tok.pad_token_id, tok.bos_token_id
        eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")]
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if architecture == "qwen2" else (LlamaConfig,
                                                                                             LlamaForCausalLM)
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos[0],
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos if len(eos) > 1 else eos[0],
                                               pad_token_id=pad)
    model.save_pretrained(str(path))
    (path / "treerpo_tiny.json").write_text(json.dumps({"seed": seed, "hidden_size": hidden_size,
                                                        "architecture": architecture, "tokenizer": tokenizer}))
    return path
