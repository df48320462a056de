"""The lab's English corpus: sentences from Debian's ``fortunes`` package (fortune-mod's quotations, BSD licence).

A registry package, installed by ``make setup`` like the image data, so nothing downloads at run time and
every machine reads the same text. Quotations are cut into sentences and split into train / held-out by a
hash of each sentence, so the split does not depend on file order and a sentence is never on both sides.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
PACKAGE = "fortunes"  # Debian main; fortune-mod's data files, BSD-3-Clause (docs/language-models.md)
# the package's plain-prose files: no ASCII art, no offensive or code-heavy collections
FILES = ("wisdom", "literature", "science", "people", "platitudes", "education", "food", "pets", "kids",
         "work", "humorists", "love", "tao", "miscellaneous", "law", "medicine", "sports", "news", "politics",
         "cookie", "fortunes", "computers", "definitions", "pratchett", "songs-poems", "magic", "riddles")
MIN_WORDS, MAX_WORDS = 4, 14
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CLEAN = re.compile(r"^[A-Z][A-Za-z ,;:'\-]*[A-Za-z][.!?]$")  # plain prose: letters and light punctuation only


class CorpusMissing(FileNotFoundError):
    """The corpus package is not installed."""


@dataclass(frozen=True)
class Corpus:
    """Sentences on each side of the split, in a stable order."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def _quotes(text: str) -> list[str]:
    """A fortune file's quotations (``%`` lines between them), attributions (``-- Author``) dropped."""
    out = []
    for block in re.split(r"^%\s*$", text, flags=re.M):
        lines = [ln for ln in block.splitlines() if not ln.strip().startswith("--")]
        out.append(" ".join(" ".join(lines).split()))
    return out


def sentences(text: str) -> list[str]:
    """Clean sentences of MIN_WORDS..MAX_WORDS words from fortune-file text, in order, each once."""
    seen, out = set(), []
    for quote in _quotes(text):
        for s in _SENTENCE_END.split(quote):
            if _CLEAN.match(s) and MIN_WORDS <= len(s.split()) <= MAX_WORDS and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def heldout_side(sentence: str, heldout_fraction: float) -> bool:
    """Whether a sentence is held out: a hash of its text, so the split ignores file order."""
    h = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big") / 2**64
    return h < heldout_fraction


def load_corpus(root: str | Path = FORTUNES_DIR, heldout_fraction: float = 0.1) -> Corpus:
    """The corpus split into train / held-out sentences; a one-line error names the package when it is missing."""
    root = Path(root)
    paths = [root / name for name in FILES if (root / name).is_file()]
    if not paths:
        raise CorpusMissing(f"no fortune files under {root}: install the Debian package '{PACKAGE}' "
                            f"(`apt-get install {PACKAGE}`, or `make setup`)")
    text = "\n%\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in paths)
    all_sentences = sentences(text)
    held = tuple(s for s in all_sentences if heldout_side(s, heldout_fraction))
    train = tuple(s for s in all_sentences if not heldout_side(s, heldout_fraction))
    return Corpus(train, held)
