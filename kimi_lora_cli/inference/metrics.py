"""Word and character error rates with a documented text normalisation.

Normalisation (`normalize_text`), applied to reference and prediction alike:
  1. Unicode NFKC (full-width letters and digits become ASCII, compatibility forms fold);
  2. lower-case;
  3. apostrophes (' and the typographic ones) are deleted, so "don't" -> "dont";
  4. every other punctuation character (Unicode category P*) becomes a space;
  5. CJK characters (Han ideographs, Hiragana, Katakana) are split apart, one "word" each;
  6. runs of whitespace collapse to one space; leading/trailing space is dropped.
WER = word-level edit distance (substitutions + deletions + insertions) / reference words.
CER = character-level edit distance over the normalised text with spaces removed / reference
characters. Corpus figures sum the edits and the reference lengths over all samples (not a
mean of per-sample rates). An empty reference scores 0 errors against an empty prediction
and one error per predicted word (character) otherwise. The edit distance is rapidfuzz's
(C++; a 3,000-word pair takes milliseconds), used by `infer` and by evaluation during training.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

APOSTROPHES = {"'", "\u2019", "\u2018", "\u02bc", "`"}
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0x20000, 0x2FA1F),  # extensions B.. and compatibility supplement
)


def is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def normalize_text(text: str) -> str:
    """The normalised form used for scoring (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    out = []
    for ch in text:
        if ch in APOSTROPHES:
            continue
        if unicodedata.category(ch).startswith("P"):
            out.append(" ")
        elif is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (unit costs) between two sequences of words or characters."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(ref, hyp)


@dataclass
class ErrorCounts:
    word_errors: int = 0
    ref_words: int = 0
    char_errors: int = 0
    ref_chars: int = 0
    samples: int = 0

    def add(self, other: ErrorCounts) -> None:
        self.word_errors += other.word_errors
        self.ref_words += other.ref_words
        self.char_errors += other.char_errors
        self.ref_chars += other.ref_chars
        self.samples += other.samples

    @property
    def wer(self) -> float:
        return _rate(self.word_errors, self.ref_words)

    @property
    def cer(self) -> float:
        return _rate(self.char_errors, self.ref_chars)


def _rate(errors: int, total: int) -> float:
    if total == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / total


def score(reference: str, prediction: str) -> ErrorCounts:
    """Edit counts of one prediction against its reference."""
    ref, hyp = normalize_text(reference), normalize_text(prediction)
    ref_words, hyp_words = ref.split(), hyp.split()
    ref_chars, hyp_chars = ref.replace(" ", ""), hyp.replace(" ", "")
    return ErrorCounts(
        word_errors=edit_distance(ref_words, hyp_words),
        ref_words=len(ref_words),
        char_errors=edit_distance(ref_chars, hyp_chars),
        ref_chars=len(ref_chars),
        samples=1,
    )


def wer(reference: str, prediction: str) -> float:
    return score(reference, prediction).wer


def cer(reference: str, prediction: str) -> float:
    return score(reference, prediction).cer
