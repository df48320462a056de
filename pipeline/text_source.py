"""Text for the shard writer: JSON Lines records ``{"prompt": str, "response": str}`` tokenised with a
Hugging Face tokenizer folder, as a :class:`pipeline.shard_sources.Source` (``fip shard text``).

The tokenizer is its folder's ``tokenizer.json``, loaded with ``PreTrainedTokenizerFast(tokenizer_file=...)``:
nothing is unpickled and nothing downloads. Its end-of-sequence and padding tokens come from the folder's
``tokenizer_config.json`` or ``special_tokens_map.json`` (read as JSON) where they exist; otherwise the eos is
the first of :data:`EOS_NAMES` in the vocabulary and the padding is the eos (a causal LM's usual choice;
padding is never scored). The SHA-256 of ``tokenizer.json`` identifies the tokenizer in the manifest.

Tokenising happens in the writing process, a block of :data:`GROUP` records at a time (the fast
tokenizer is Rust and batched); the shard workers receive token ids and only write JSON. The prompt is
tokenised with the tokenizer's special tokens (a Llama-style BOS, recorded as ``bos_id`` so that a cut
prompt keeps it), the response without: the reader appends the eos (:func:`pipeline.shards.text_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.shard_sources import Sample, Source
from pipeline.shardfmt import CAUSAL_LM, ShardError, ShardManifest, TokenizerInfo
from pipeline.storage import Storage, join

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # where a folder names its eos and pad tokens
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[EOS]")
GROUP = 1000  # records tokenised at once; D_val takes its share of each such block (a fixed, seeded choice)
DEFAULT_MAX_LENGTH = 512


class TextSourceError(ValueError):
    """A JSONL source or a tokenizer folder that cannot be used; one line naming the file and the problem."""


# ---------------------------------------------------------------- the tokenizer
def tokenizer_file(folder: str | Path) -> Path:
    """The folder's ``tokenizer.json``, or a one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TextSourceError(f"tokenizer folder {folder} does not exist")
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise TextSourceError(f"tokenizer folder {folder} has no {TOKENIZER_FILE} (a Hugging Face fast tokenizer "
                              f"saved with save_pretrained); other formats are not read")
    return path


def tokenizer_sha256(folder: str | Path) -> str:
    return hashlib.sha256(tokenizer_file(folder).read_bytes()).hexdigest()


def _named_token(folder: Path, name: str) -> str | None:
    """`name` (eos_token, pad_token) as the folder's JSON configs give it, a string or ``{"content": ...}``."""
    for file in CONFIG_FILES:
        path = folder / file
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get(name)
        except (json.JSONDecodeError, AttributeError) as e:
            raise TextSourceError(f"{path} is not a JSON object: {e}") from e
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def load_tokenizer(folder: str | Path):
    """(the tokenizer, its :class:`TokenizerInfo`) of a Hugging Face tokenizer folder."""
    from fip.families import import_transformers

    folder = Path(folder)
    path = tokenizer_file(folder)
    tok = import_transformers().PreTrainedTokenizerFast(tokenizer_file=str(path))
    vocab = tok.get_vocab()

    def token_id(text: str, role: str) -> int:
        if text not in vocab:
            raise TextSourceError(f"tokenizer {folder}: its {role} token {text!r} is not in its vocabulary")
        return int(vocab[text])

    eos = _named_token(folder, "eos_token") or next((t for t in EOS_NAMES if t in vocab), None)
    if eos is None:
        raise TextSourceError(f"tokenizer {folder} names no end-of-sequence token: set eos_token in its "
                              f"tokenizer_config.json (none of {', '.join(EOS_NAMES)} is in its vocabulary)")
    eos_id = token_id(eos, "eos")
    pad = _named_token(folder, "pad_token")
    pad_id = token_id(pad, "pad") if pad else eos_id
    lead = tok("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts before any prompt: a BOS or nothing
    bos_id = int(lead[0]) if lead and lead[0] != eos_id else None
    info = TokenizerInfo(folder.resolve().name, hashlib.sha256(path.read_bytes()).hexdigest(), len(tok), pad_id,
                         eos_id, bos_id)
    tok.eos_token, tok.pad_token = eos, pad or eos  # so generation stops and pads as the shards were written
    return tok, info


TOKENIZER_DIR = "tokenizer"  # beside text shards: the tokenizer they were written with, so they say how to read them


def _shards_base(source_urls: list[str]) -> str:
    return source_urls[0].rsplit("/", 1)[0]


def store_tokenizer(folder: str | Path, dest: str, store: Storage) -> None:
    """Copy the tokenizer folder's files (``tokenizer.json`` and its JSON configs) to ``DEST/tokenizer/``: the
    pipeline registers a purified language model with the tokenizer its data was written with."""
    for name in (TOKENIZER_FILE, *CONFIG_FILES):
        path = Path(folder) / name
        if path.is_file():
            store.write_bytes(join(dest, f"{TOKENIZER_DIR}/{name}"), path.read_bytes())


def fetch_tokenizer(urls: list[str], manifest: ShardManifest, store: Storage, into: str | Path) -> Path:
    """The tokenizer folder stored beside text shards (:func:`store_tokenizer`), fetched into `into` and checked
    against the manifest's SHA-256; a one-line error where there is none."""
    base = _shards_base(urls)
    folder = Path(into) / TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, *CONFIG_FILES):
        url = join(base, f"{TOKENIZER_DIR}/{name}")
        if store.exists(url):
            (folder / name).write_bytes(store.read_bytes(url))
        elif name == TOKENIZER_FILE:
            raise ShardError(f"text shards at {base} have no {TOKENIZER_DIR}/{TOKENIZER_FILE} beside them (written "
                             "before fip shard text stored it): write them again to register a language model")
    check_tokenizer(manifest, folder, base)
    return folder


def check_tokenizer(manifest: ShardManifest, folder: str | Path, where: str) -> None:
    """Refuse a tokenizer other than the one the shards at `where` were written with."""
    if not manifest.is_text:
        raise ShardError(f"{where} holds {manifest.task} shards, not text: a tokenizer does not apply")
    got = tokenizer_sha256(folder)
    if got != manifest.tokenizer.sha256:
        raise ShardError(f"tokenizer {folder} is not the one {where} was written with: tokenizer.json SHA-256 "
                         f"{got[:16]}..., the manifest says {manifest.tokenizer.sha256[:16]}... "
                         f"({manifest.tokenizer.name})")


# ---------------------------------------------------------------- JSON Lines records
def jsonl_files(path: str | Path) -> list[Path]:
    """The JSONL file, or a folder's ``*.jsonl`` files in sorted order (their order is the samples')."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TextSourceError(f"text source {path} does not exist")
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise TextSourceError(f"text source {path} holds no .jsonl files")
    return files


def _record(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TextSourceError(f"{where}: not JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise TextSourceError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
    if missing:
        raise TextSourceError(f"{where}: a record needs string fields \"prompt\" and \"response\"; "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing or not text")
    return record["prompt"], record["response"]


def iter_records(files: list[Path], root: Path) -> Iterator[tuple[str, str, str]]:
    """(where, prompt, response) of every non-blank line, ``where`` being ``file:line``."""
    for file in files:
        rel = file.relative_to(root) if file != root else Path(file.name)
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{rel}:{lineno}"
                    yield (where, *_record(line, where))


def _has_a_record(files: list[Path]) -> bool:
    for file in files:
        with open(file, encoding="utf-8") as f:
            if any(line.strip() for line in f):
                return True
    return False


def jsonl_source(path: str | Path, tokenizer: str | Path, max_length: int = DEFAULT_MAX_LENGTH,
                 split: str = "train", name: str = "") -> Source:
    """A JSONL file or folder of ``{"prompt", "response"}`` records, tokenised with the `tokenizer` folder,
    streamed :data:`GROUP` records at a time. Bad records fail the write, naming ``file:line``; records
    whose response does not fit `max_length` are left out and listed (the writer's ``meta.skipped``)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise TextSourceError(f"max_length must be an integer >= 2, got {max_length!r}")
    path = Path(path)
    files = jsonl_files(path)
    root = path if path.is_dir() else path.parent
    if not _has_a_record(files):
        raise TextSourceError(f"text source {path} is empty: no records in {len(files)} file(s)")
    tok, info = load_tokenizer(tokenizer)

    def encode(texts: list[str], special: bool) -> list[list[int]]:
        return [list(map(int, ids)) for ids in tok(texts, add_special_tokens=special)["input_ids"]]

    def block(records: list[tuple[str, str, str]], first: int) -> list[Sample]:
        prompts = encode([r[1] for r in records], True)
        responses = encode([r[2] for r in records], False)
        samples = []
        for k, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            out = [t for t in p + r if not 0 <= t < info.vocab_size]
            if out:
                raise TextSourceError(f"{records[k][0]}: token id {out[0]} is outside the tokenizer's vocabulary "
                                      f"of {info.vocab_size}")
            samples.append(Sample(first + k, 0, text=(p, r, records[k][0])))
        return samples

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        index, pending = 0, []
        for record in iter_records(files, root):
            pending.append(record)
            if len(pending) == GROUP:
                yield f"{pending[0][0]}+{GROUP}", block(pending, index)
                index, pending = index + GROUP, []
        if pending:
            yield f"{pending[0][0]}+{len(pending)}", block(pending, index)

    return Source(name or path.stem, split, [], 0, groups, root=str(root.resolve()),
                  describe={"kind": "jsonl", "path": str(path.resolve()), "group": GROUP},
                  task=CAUSAL_LM, tokenizer=info, max_length=max_length)


# ---------------------------------------------------------------- text shards written from text shards
def copy_tokenizer(source_urls: list[str], dest: str, store: Storage) -> None:
    """The tokenizer stored beside text shards (:func:`store_tokenizer`), copied beside shards written from them."""
    base = _shards_base(source_urls)
    for name in (TOKENIZER_FILE, *CONFIG_FILES):
        url = join(base, f"{TOKENIZER_DIR}/{name}")
        if store.exists(url):
            store.write_bytes(join(dest, f"{TOKENIZER_DIR}/{name}"), store.read_bytes(url))
