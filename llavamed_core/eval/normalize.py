"""The answer normaliser of the LLaVA-Med paper's VQA evaluation (docs/formats.md).

Both the ground truth and the prediction pass through :func:`normalize_answer` before any metric
is computed. It reproduces the original batch evaluator's normaliser (itself derived from the VQA
challenge's answer processing), quirks included:

1. Lower-case.
2. For each character of :data:`PUNCTUATION`: when the *input* string has that character with a
   space on either side anywhere, or the input holds a digit-comma-digit group such as ``1,000``,
   the character is deleted everywhere; otherwise it is replaced by a space everywhere.
3. Delete ``.`` where it is not followed by a digit (``"2.5 cm."`` → ``"2.5 cm"``). Quirk kept:
   the original passed ``re.UNICODE`` (= 32) where ``re.sub`` takes its ``count``, so only the
   first 32 such periods of a string are deleted; the 33rd and later ones stay.
4. Split on whitespace; map ``none``/``zero`` → ``0`` and ``one`` … ``ten`` → ``1`` … ``10``;
   drop the articles ``a``, ``an``, ``the``; restore the apostrophe of contractions written without
   one (``dont`` → ``don't``, the VQA list); join with single spaces; delete remaining commas.

The function is idempotent on every string with at most 32 periods to delete (all answers of the
three benchmarks); beyond that a second pass deletes up to 32 more, which is why the metrics that
the original computed after normalising twice (recall, precision, F1, its "exact match score") are
computed here after two passes as well.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "PUNCTUATION", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS",
           "PERIOD_LIMIT"]

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
"""Characters deleted or replaced by a space, in the order the original processed them."""

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
"""Whole words replaced by digits (note ``none`` → ``0``, as the VQA answer processing does)."""

ARTICLES = frozenset({"a", "an", "the"})

PERIOD_LIMIT = 32
"""How many periods one pass deletes: ``re.UNICODE`` passed as ``count`` in the original."""

# Contracted forms of the VQA answer-processing list. A token equal to one of these with exactly
# one apostrophe left out is restored to it ("dont" -> "don't"; "couldnt've" and "couldn'tve" ->
# "couldn't've"; the fully stripped "couldntve" is not in the VQA list and stays as it is).
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
    "how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've "
    "o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll "
    "someone's something'd something'll that's there'd there're there's they'd they'll they're "
    "they've 'twas wasn't we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
    "you'll you're you've "
    "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've "
    "y'all'll y'all'd've 'ow's'at"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        for i, ch in enumerate(full):
            if ch == "'":
                table[full[:i] + full[i + 1:]] = full
    # One entry of the VQA list runs the other way round; kept so that scores match the original.
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()
"""Token → restored contraction (read-only by convention; built once at import)."""

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(s: str, period_limit: int | None = PERIOD_LIMIT) -> str:
    """Normalise an answer as the paper's evaluator did (see the module docstring).

    Args:
        s: ground-truth or predicted answer text.
        period_limit: how many periods one pass may delete; the original's quirk is 32.
            ``None`` deletes them all.

    Returns:
        The normalised string: lower case, words separated by single spaces.

    Examples:
        >>> normalize_answer("Yes, the left lung.")
        'yes left lung'
        >>> normalize_answer("Two")
        '2'
    """
    text = s.lower()
    # The test for "a space on either side" looks at the input string, not the partly cleaned one.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            cleaned = cleaned.replace(p, "")
        else:
            cleaned = cleaned.replace(p, " ")
    cleaned = _PERIOD.sub("", cleaned, count=period_limit or 0)
    words = []
    for w in cleaned.split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words).replace(",", "")
