"""Words for matching: keyword queries and citation checks use the same rules.

"Content words" are lowercased word tokens that carry meaning: stop words are
dropped and a light suffix stripper folds plurals and verb endings together,
so "batteries" matches "battery" and "charged" matches "charging".
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)

_STOPWORDS = """
a about above after again against all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each
either else ever every few for from further had has have having he her here hers
herself him himself his how however i if in into is it its itself just let me might
more most much must my myself neither no nor not now of off often on once only or
other ought our ours ourselves out over own per rather same shall she should since so
some such than that the their theirs them themselves then there these they this those
though through thus to too under until up upon us very was we were what when where
whether which while who whom whose why will with within without would yet you your
yours yourself yourselves tell say said says give gives given know
"""
STOPWORDS = frozenset(_STOPWORDS.split())


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` in order (letters and digits)."""
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def stem(word: str) -> str:
    """A light, predictable suffix stripper (not Porter): enough to fold
    plurals, -ed, -ing and -ly so that a claim and its passage match."""
    if word.isdigit() or len(word) <= 3:
        return word
    if word.endswith("'s"):
        word = word[:-2]
    for suffix, keep in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("ly", ""),
                         ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: len(word) - len(suffix)] + keep
    return word


def content_words(text: str) -> list[str]:
    """Stemmed content words of ``text``, in order, duplicates kept."""
    return [stem(w) for w in words(text) if w not in STOPWORDS]


def keyword_terms(text: str, limit: int = 32) -> list[str]:
    """The distinct, unstemmed content words of a query, for a keyword engine
    (which stems by its own rules). At most ``limit`` terms. An apostrophe
    splits a word as the keyword index does ("dell'acqua": "dell", "acqua")."""
    seen: dict[str, None] = {}
    for w in words(text):
        for part in w.split("'"):
            if part not in STOPWORDS and (len(part) > 1 or part.isdigit()):
                seen.setdefault(part, None)
    return list(seen)[:limit]


def numbers(text: str) -> set[str]:
    """Numbers written in ``text`` ("1,200" and "1200" are the same number)."""
    return {n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)
            if n.replace(",", "")}
