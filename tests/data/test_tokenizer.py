import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_word_tokenizer,
    encode,
    load_tokenizer,
    save_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(shapes.caption_vocabulary())


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")] == [0, 1, 2, 3]
    assert tokenizer.get_vocab_size() == 4 + len(shapes.caption_vocabulary())


def test_captions_round_trip(tokenizer):
    source = shapes.ShapesSource("validation")
    captions = [source[index]["caption"] for index in range(20)]
    tokens = encode(tokenizer, captions, max_length=12)
    assert tokens.dtype == np.int32 and tokens.shape == (20, 12)
    for caption, ids in zip(captions, tokens, strict=True):
        length = len(caption.split()) + 2
        assert ids[0] == BOS_ID and ids[length - 1] == EOS_ID
        assert (ids[length:] == PAD_ID).all() and UNK_ID not in ids
        assert tokenizer.decode(ids.tolist()) == caption


def test_empty_caption_is_the_null_condition(tokenizer):
    np.testing.assert_array_equal(encode(tokenizer, [""], 5)[0], [BOS_ID, EOS_ID, 0, 0, 0])


def test_text_is_lowercased_split_on_punctuation_and_truncated_keeping_eos(tokenizer):
    tokens = encode(tokenizer, ["A RED, circle!", "a red circle at the top left"], max_length=5)
    red, circle = tokenizer.token_to_id("red"), tokenizer.token_to_id("circle")
    a = tokenizer.token_to_id("a")
    np.testing.assert_array_equal(tokens[0], [BOS_ID, a, red, UNK_ID, EOS_ID])
    np.testing.assert_array_equal(tokens[1], [BOS_ID, a, red, circle, EOS_ID])
    with pytest.raises(ValueError, match="max_length"):
        encode(tokenizer, ["a"], max_length=1)


def test_build_accepts_whole_captions():
    tokenizer = build_word_tokenizer(["A purple Hexagon.", "a purple star"])
    assert set(tokenizer.get_vocab()) == {
        "[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "purple", "hexagon", ".", "star",
    }  # fmt: skip


def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    texts = ["a blue square on the left", ""]
    np.testing.assert_array_equal(encode(loaded, texts, 9), encode(tokenizer, texts, 9))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
