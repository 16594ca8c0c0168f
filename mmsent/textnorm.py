"""Tweet text normalisation: the same function at training and at scoring time.

Mentions become `@user`, URLs `http` (as in TweetEval / Barbieri et al.), HTML entities are unescaped, broken
characters (mojibake, replacement characters, control characters, lone surrogates) are repaired or dropped, emoji
are kept (the tokenizer maps the ones it knows; the sentiment they carry is worth keeping), hashtags keep their word.
"""

from __future__ import annotations

import html
import re
import unicodedata

__all__ = ["normalize_tweet"]

_URL = re.compile(r"(?:https?://|www\.)\S*|\bt\.co/\S*", re.IGNORECASE)
_TRUNCATED_URL = re.compile(r"\bhttps?:?/?/?\S*…?$|\bhtt?p?…$", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w{1,30}")
_RT = re.compile(r"^RT\s+(?=@user)")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff\ufffd]")
_MOJIBAKE = re.compile(
    "[\u00c2\u00c3\u00e2]"
    "[\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]"
)


def _fix_mojibake(text: str) -> str:
    """Undo the common UTF-8-read-as-cp1252 damage (`donâ€™t` -> `don't`), run by run, where it round-trips."""
    if not _MOJIBAKE.search(text):
        return text

    def repair(match: re.Match[str]) -> str:
        run = match.group(0)
        try:
            return run.encode("cp1252").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return run

    return _NON_ASCII_RUN.sub(repair, text)


def normalize_tweet(text: str | None) -> str:
    if not text:
        return ""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    text = _fix_mojibake(text)
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _URL.sub(" http ", text)
    text = _TRUNCATED_URL.sub(" http", text)
    text = _MENTION.sub("@user", text)
    text = _RT.sub("", text.strip())
    text = text.replace("…", "...")
    return _SPACES.sub(" ", text).strip()
