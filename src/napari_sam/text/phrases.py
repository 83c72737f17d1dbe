"""Text prompts -> phrases, in the form open-vocabulary detectors read them."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["parse_prompt"]

# Grounding DINO separates phrases with "."; a newline or ";" is taken as a separator too, so
# that a list typed one phrase per line works. Commas stay inside a phrase ("kidney, left").
_SEPARATORS = re.compile(r"[.\n;]+")


def parse_prompt(text: str | Iterable[str]) -> list[str]:
    """Split a text prompt into phrases: lowercased, whitespace collapsed, each ending in ".".

    Parameters
    ----------
    text : str or iterable of str
        ``"liver. kidney."`` or ``["liver", "kidney"]``. Repeated phrases are kept once, in
        the order given.

    Returns
    -------
    list of str
        ``["liver.", "kidney."]``

    Raises
    ------
    ValueError
        When no phrase is left (empty text, only separators).
    """
    parts = [text] if isinstance(text, str) else list(text)
    phrases: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"a text prompt must be a string or strings, got {type(part).__name__}")
        for piece in _SEPARATORS.split(part):
            words = " ".join(piece.lower().split())
            if words and f"{words}." not in phrases:
                phrases.append(f"{words}.")
    if not phrases:
        raise ValueError(
            f"no phrase in the text prompt {text!r}: give one or more phrases separated by '.', "
            "e.g. 'liver. left kidney.'"
        )
    return phrases
