"""CLIP's byte-level BPE tokenizer, built with `tokenizers` from vocab.json + merges.txt.

The pipeline is transformers' `CLIPTokenizer`: NFC, runs of whitespace to one space and
lower-casing; CLIP's pre-tokenization regex (contractions, letter runs, single digits,
punctuation runs); byte-level BPE whose word-final pieces end in "</w>". A text encodes as
`<|startoftext|> pieces... <|endoftext|>`, truncated to `max_length` with the end token
kept last, then padded with the directory's pad token (Stable Diffusion 1 pads with
"<|endoftext|>", Stable Diffusion 2 with "!").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers
from etils import epath
from tokenizers import Regex, models, normalizers, pre_tokenizers, processors

from ldm_jax import storage

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# Read in this order; a later file overrides an earlier one, as in transformers.
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
FAST_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, FAST_TOKENIZER_FILE, *SPECIAL_TOKEN_FILES)

END_OF_WORD_SUFFIX = "</w>"
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
PRE_TOKENIZER_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_ADDED_TOKEN_OPTIONS = ("single_word", "lstrip", "rstrip", "normalized")

SpecialToken = str | tokenizers.AddedToken


class ClipTokenizer:
    """Texts to `(B, max_length)` int32 CLIP token ids.

    Attributes:
      max_length: ids per text (77 for every Stable Diffusion text encoder).
      bos_token_id, eos_token_id, pad_token_id: ids of the start, end and pad tokens.
      vocab_size: size of the vocabulary, special tokens included.
      tokenizer: the underlying `tokenizers.Tokenizer`, truncation and padding to
        `max_length` included, so its `encode_batch` (and a copy rebuilt from its
        `to_str()`) gives the same ids as this object.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        special_tokens: Mapping[str, SpecialToken] | None = None,
    ):
        """Builds the tokenizer.

        Args:
          vocab: `{piece: id}`, CLIP's byte-level pieces with "</w>" word ends.
          merges: BPE merges, highest priority first.
          max_length: ids per text, at least 2 (the start and end tokens).
          special_tokens: `bos_token`, `eos_token`, `unk_token`, `pad_token` (strings or
            `tokenizers.AddedToken`s); those not given are CLIP's.

        Raises:
          ValueError: `max_length < 2`, or a special token is not in `vocab`.
        """
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (for the start and end tokens); got {max_length}."
            )
        special = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        contents = {role: str(token) for role, token in special.items()}
        missing = {role: content for role, content in contents.items() if content not in vocab}
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary.")
        tokenizer = tokenizers.Tokenizer(
            models.BPE(
                vocab=dict(vocab),
                merges=list(merges),
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD_SUFFIX,
                fuse_unk=False,
                unk_token=contents["unk_token"],
            )
        )
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Special tokens in a text stay whole, as transformers registers all four.
        tokenizer.add_special_tokens([_added_token(token) for token in special.values()])
        bos, eos = contents["bos_token"], contents["eos_token"]
        self.bos_token_id, self.eos_token_id = vocab[bos], vocab[eos]
        self.pad_token_id = vocab[contents["pad_token"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            special_tokens=[(bos, self.bos_token_id), (eos, self.eos_token_id)],
        )
        # Truncation leaves room for the start and end tokens, so the end token stays last.
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(
            length=max_length, pad_id=self.pad_token_id, pad_token=contents["pad_token"]
        )
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size()
        self.tokenizer = tokenizer

    @classmethod
    def from_directory(cls, path: str | os.PathLike, max_length: int = 77) -> ClipTokenizer:
        """Reads a transformers tokenizer directory (e.g. Stable Diffusion's `tokenizer/`), on a
        disk or in a bucket.

        Uses vocab.json and merges.txt (or, without them, the BPE vocabulary and merges in
        the tokenizer.json that transformers 5 saves instead), and the special tokens of
        tokenizer_config.json and special_tokens_map.json when present.

        Raises:
          FileNotFoundError: neither vocab.json + merges.txt nor tokenizer.json is there.
          ValueError: a file is not the JSON or text transformers writes (a pickle, say),
            naming the directory.
        """
        directory = os.fspath(path)
        folder = storage.as_path(directory)
        vocab_path, merges_path = (folder / VOCAB_FILE, folder / MERGES_FILE)
        fast_path = folder / FAST_TOKENIZER_FILE
        has_bpe_files = vocab_path.is_file() and merges_path.is_file()
        if not has_bpe_files and not fast_path.is_file():
            raise FileNotFoundError(
                f"no CLIP tokenizer in {directory}: it needs {VOCAB_FILE} and {MERGES_FILE} "
                f"(or {FAST_TOKENIZER_FILE})."
            )
        try:
            if has_bpe_files:
                # `tokenizers` opens the files by name in Rust: a bucket's are copied first.
                vocab, merges = models.BPE.read_file(
                    storage.local_copy(vocab_path), storage.local_copy(merges_path)
                )
            else:
                vocab, merges = _read_fast_tokenizer_bpe(fast_path)
            special_tokens = _read_special_tokens(folder)
        except Exception as error:  # `tokenizers` raises plain Exceptions for unreadable files
            raise ValueError(
                f"cannot read the CLIP tokenizer in {directory}: {error}. Its files must be "
                f"the UTF-8 JSON and text files transformers writes ({', '.join(TOKENIZER_FILES)})."
            ) from error
        return cls(vocab, merges, max_length=max_length, special_tokens=special_tokens)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes texts; "" encodes as `<|startoftext|> <|endoftext|> pad...`.

        Returns:
          int32 `(len(texts), max_length)` token ids.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list.")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.zeros((len(encodings), self.max_length), np.int32)
        for row, encoding in enumerate(encodings):
            ids[row] = encoding.ids
        return ids


def _read_fast_tokenizer_bpe(path: epath.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of a `tokenizers` JSON file."""
    model = json.loads(path.read_text())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path.name}: a CLIP tokenizer is BPE, this one is {model.get('type')!r}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _added_token(token: SpecialToken) -> tokenizers.AddedToken:
    if isinstance(token, tokenizers.AddedToken):
        return token
    return tokenizers.AddedToken(token, special=True, normalized=False)


def _read_special_tokens(folder: epath.Path) -> dict[str, SpecialToken]:
    """Special tokens of the folder's JSON files; a token is a string or a dict."""
    special: dict[str, SpecialToken] = {}
    for name in SPECIAL_TOKEN_FILES:
        path = folder / name
        if not path.is_file():
            continue
        entries = json.loads(path.read_text())
        for role in DEFAULT_SPECIAL_TOKENS:
            value = entries.get(role)
            if isinstance(value, str):
                special[role] = value
            elif isinstance(value, dict) and "content" in value:
                options = {key: value[key] for key in _ADDED_TOKEN_OPTIONS if key in value}
                special[role] = tokenizers.AddedToken(value["content"], special=True, **options)
    return special
