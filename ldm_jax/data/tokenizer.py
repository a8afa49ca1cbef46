"""A word-level tokenizer for small captioned datasets, built locally with no download.

Token ids: "[PAD]" = 0, "[UNK]" = 1, "[BOS]" = 2, "[EOS]" = 3, then the vocabulary words in
sorted order. Text is lowercased and split on whitespace and punctuation. A caption encodes
as ``[BOS] words... [EOS] [PAD]...``; the empty caption, ``[BOS] [EOS] [PAD]...``, is the null
condition of classifier-free guidance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from ldm_jax import storage

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))


def _empty_tokenizer(vocabulary: dict[str, int]) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK))
    # Registered as special, they are skipped by decode and never split by the pre-tokenizer.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    return tokenizer


def build_word_tokenizer(words_or_captions: Iterable[str]) -> tokenizers.Tokenizer:
    """Builds a word-level tokenizer whose vocabulary is every word in the given texts.

    Args:
        words_or_captions: Words or whole captions; they are lowercased and split on
            whitespace and punctuation like the text the tokenizer will encode.

    Returns:
        The tokenizer; it adds "[BOS]" and "[EOS]" around every encoded text.
    """
    splitter = _empty_tokenizer({token: i for i, token in enumerate(SPECIAL_TOKENS)})
    words = set()
    for text in words_or_captions:
        normalized = splitter.normalizer.normalize_str(text)
        words.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
    words.difference_update(SPECIAL_TOKENS)
    vocabulary = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}
    return _empty_tokenizer(vocabulary)


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Encodes texts as ``[BOS] words... [EOS] [PAD]...`` token ids.

    Args:
        tokenizer: A tokenizer from ``build_word_tokenizer`` or ``load_tokenizer``.
        texts: The texts; "" encodes as the null condition ``[BOS] [EOS] [PAD]...``.
        max_length: Number of ids per text; longer texts are truncated, keeping "[EOS]".

    Returns:
        int32 (len(texts), max_length) token ids.

    Raises:
        ValueError: If ``max_length`` cannot hold "[BOS]" and "[EOS]".
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (for [BOS] and [EOS]), got {max_length}.")
    tokens = np.full((len(texts), max_length), PAD_ID, dtype=np.int32)
    for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
        ids = encoding.ids
        if len(ids) > max_length:
            ids = [*ids[: max_length - 1], EOS_ID]
        tokens[row, : len(ids)] = ids
    return tokens


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str | os.PathLike) -> None:
    """Writes the tokenizer as a JSON file (on a disk or in a bucket)."""
    storage.as_path(path).write_text(tokenizer.to_str(), encoding="utf-8")


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Reads a tokenizer JSON file written by ``save_tokenizer``.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: If the file is not a tokenizer JSON (a pickle, say), naming it.
    """
    file = storage.as_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer file {os.fspath(path)!r} not found: point the tokenizer path of the "
            "config at a tokenizer.json written by save_tokenizer."
        )
    try:
        return tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as error:  # `tokenizers` raises plain Exceptions for unreadable files
        raise ValueError(
            f"tokenizer file {os.fspath(path)!r} is not a tokenizer JSON written by "
            f"save_tokenizer: {error}"
        ) from error
