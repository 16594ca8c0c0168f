"""Tweet text normalisation: the same function at training and at scoring time.

Mentions become `@user`, URLs `http` (as in TweetEval / Barbieri et al.), HTML entities are unescaped, broken
characters (mojibake, replacement characters, control characters, lone surrogates) are repaired or dropped, emoji
are kept (the tokenizer maps the ones it knows; the sentiment they carry is worth keeping), hashtags keep their word.

    text -> lone surrogates '?' -> ftfy: mojibake repaired -> HTML unescaped -> NFC -> controls dropped
         -> URLs `http` -> mentions `@user` -> leading RT dropped -> '…' as '...' -> whitespace collapsed
"""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy

__all__ = ["normalize_tweet"]

_URL = re.compile(r"(?:https?://|www\.)\S*|\bt\.co/\S*", re.IGNORECASE)
_TRUNCATED_URL = re.compile(r"\bhttps?:?/?/?\S*…?$|\bhtt?p?…$", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w{1,30}")
_RT = re.compile(r"^RT\s+(?=@user)")
_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff\ufffd]")


def normalize_tweet(text: str | None) -> str:
    if not text:
        return ""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    # Mojibake (`donâ€™t` -> `don’t`) by ftfy's encoding steps alone: its other fixes (curly quotes, widths,
    # ligatures) would change text that is not broken. Stray C1 controls stay controls, removed below.
    text = ftfy.fix_encoding(text, fix_c1_controls=False)
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _URL.sub(" http ", text)
    text = _TRUNCATED_URL.sub(" http", text)
    text = _MENTION.sub("@user", text)
    text = _RT.sub("", text.strip())
    text = text.replace("…", "...")
    return _SPACES.sub(" ", text).strip()
