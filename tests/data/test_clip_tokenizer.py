"""The CLIP tokenizer gives transformers' `CLIPTokenizer` ids, from the same local files."""

import json

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, normalizers, pre_tokenizers, trainers

from ldm_jax.data import tokenizer as word_tokenizer
from ldm_jax.data.clip_tokenizer import ClipTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CORPUS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a painting of a cat sitting on a red chair, oil on canvas",
    "the quick brown fox jumps over the lazy dog",
    "it's a beautiful day in the neighbourhood; they're playing outside",
    "high resolution image synthesis with latent diffusion models",
    "two dogs and three cats in a garden with flowers and trees",
] * 3
TEXTS = [
    "a photo of a cat",
    "A PHOTOGRAPH of The Moon!!",
    "   extra   spaces\tand\nnew lines   ",
    "digits 12345 and 3.14, punctuation: (yes) [no] {maybe}?! ... --",
    "it's they're we've I'm you'll he'd",
    "café naïve façade Ünïcödé 東京 🙂",
    "",
    f"{EOS} between {BOS} special tokens",
    " ".join(["horse riding astronaut"] * 40),
]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small vocabulary in CLIP's layout: bytes, bytes + "</w>", merges, then specials."""
    trainee = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainee.normalizer = normalizers.Lowercase()
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainee.train_from_iterator(CORPUS, trainer)
    merges = [
        tuple(pair) if isinstance(pair, list) else tuple(pair.split(" "))
        for pair in json.loads(trainee.to_str())["model"]["merges"]
    ]
    byte_pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [
        *byte_pieces,
        *(piece + "</w>" for piece in byte_pieces),
        *("".join(pair) for pair in merges),
        BOS,
        EOS,
    ]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}, merges


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tokenizer directory with vocab.json and merges.txt only, as CLIP's tokenizer/."""
    vocab, merges = clip_vocab_and_merges()
    assert len(merges) > 100  # enough that multi-piece words occur
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    return directory


def reference_ids(directory, texts, max_length):
    reference = transformers.CLIPTokenizer.from_pretrained(directory)
    encoded = reference(texts, padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(encoded["input_ids"])


@pytest.mark.parametrize("max_length", [77, 8])
def test_ids_are_transformers_clip_tokenizer_ids(clip_files, max_length):
    ours = ClipTokenizer.from_directory(clip_files, max_length=max_length)
    ids = ours(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(ids, reference_ids(clip_files, TEXTS, max_length))
    vocab = json.loads((clip_files / "vocab.json").read_text("utf-8"))
    assert ours.pad_token_id == ours.eos_token_id == vocab[EOS]
    assert (ids[:, 0] == vocab[BOS]).all()
    # The longest text is truncated, its end token kept last.
    assert ids[-1, -1] == vocab[EOS] and (ids[-1, 1:-1] != vocab[EOS]).all()


def test_pad_token_comes_from_the_directorys_special_token_files(clip_files, tmp_path):
    """Stable Diffusion 2's tokenizer pads with "!" (given as an AddedToken dict)."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_files / name).read_bytes())
    pad = {"content": "!", "lstrip": False, "normalized": False, "rstrip": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    ours = ClipTokenizer.from_directory(tmp_path)
    ids = ours(TEXTS)
    assert ours.pad_token_id == json.loads((clip_files / "vocab.json").read_text("utf-8"))["!"]
    assert ids[0, -1] == ours.pad_token_id
    np.testing.assert_array_equal(ids, reference_ids(tmp_path, TEXTS, 77))


def test_underlying_tokenizer_serialises_with_truncation_and_padding(clip_files):
    """Data pipelines rebuild it from JSON and encode with `data.tokenizer.encode`."""
    ours = ClipTokenizer.from_directory(clip_files, max_length=16)
    rebuilt = tokenizers.Tokenizer.from_str(ours.tokenizer.to_str())
    np.testing.assert_array_equal(word_tokenizer.encode(rebuilt, TEXTS, 16), ours(TEXTS))


def test_missing_file_is_named(clip_files, tmp_path):
    (tmp_path / "vocab.json").write_bytes((clip_files / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        ClipTokenizer.from_directory(tmp_path)


def test_a_single_string_is_refused():
    tokenizer = ClipTokenizer({BOS: 0, EOS: 1}, [], max_length=4)
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenizer("a photo")
