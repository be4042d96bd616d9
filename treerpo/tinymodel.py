"""A tiny char-level Qwen2 model and tokenizer, built locally and saved in HF format.

Nothing is downloaded: the tokenizer is built with the `tokenizers` library from a fixed
alphabet, the model from a `Qwen2Config`. Saving and reloading with `from_pretrained` runs the
same loading code a real model goes through. Used by the tests, the benches and the demo.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

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
) -> Path:
    """Build, save (safetensors + config + tokenizer) and return the folder of a tiny Qwen2."""
    import torch  # noqa: PLC0415 -- treerpo.warmup imports this module; its cached path loads no torch
    from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415 -- transformers loads on use

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(path)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(path))
    (path / "treerpo_tiny.json").write_text(json.dumps({"seed": seed, "hidden_size": hidden_size}))
    return path
