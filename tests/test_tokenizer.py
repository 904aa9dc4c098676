"""Tests of the text tokenizer: fixed-length ids with [CLS]/[SEP] kept, real vocabulary, safe to ship to workers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from omniris_jax.data.tokenizer import Tokenizer
from omniris_jax.models.bert import minilm_path

LONG_TEXT = ("the tall man in the dark blue jacket standing on the left side of the picture next to the red car "
             "holding an umbrella")
SENTENCES = [
    "The man in the red shirt, left of the dog!",
    "giraffe on the far right",
    "Woman holding a blue umbrella near the café.",
    "second elephant from left",
    LONG_TEXT,
]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer()


def test_keeps_cls_and_sep_when_truncating_to_20(tokenizer):
  ids, mask = tokenizer.encode(LONG_TEXT, max_length=20)
  assert ids.shape == mask.shape == (20,)
  assert ids.dtype == mask.dtype == np.int32
  assert ids[0] == tokenizer.cls_id == 101
  assert ids[-1] == tokenizer.sep_id == 102
  assert mask.tolist() == [1] * 20
  word_piece_ids = tokenizer.hf_tokenizer.convert_tokens_to_ids(tokenizer.tokens(LONG_TEXT))
  assert ids[1:-1].tolist() == word_piece_ids[:18]


def test_release_cut_keeps_the_first_20_ids_and_drops_sep(tokenizer):
  """keep_sep=False: the release's loaders cut `encode(text, add_special_tokens=True)` at 20 ids."""
  release = Tokenizer(keep_sep=False)
  full = tokenizer.hf_tokenizer(LONG_TEXT)["input_ids"]
  ids, mask = release.encode(LONG_TEXT, 20)
  assert len(full) > 20 and ids.tolist() == full[:20] and ids[-1] != release.sep_id and mask.all()
  short_ids, short_mask = release.encode("giraffe on the far right", 20)
  np.testing.assert_array_equal(short_ids, tokenizer.encode("giraffe on the far right", 20)[0])
  assert short_ids[short_mask.sum() - 1] == release.sep_id and (short_ids[short_mask == 0] == 0).all()


def test_pads_short_text_with_pad_zero_and_mask_zero(tokenizer):
  ids, mask = tokenizer.encode("the dog", max_length=20)
  assert ids[:4].tolist() == [101, 1996, 3899, 102]
  assert ids[4:].tolist() == [0] * 16 and tokenizer.pad_id == 0
  assert mask.tolist() == [1] * 4 + [0] * 16


def test_no_unk_for_ordinary_english_words(tokenizer):
  words = ("the man woman child dog cat horse elephant giraffe zebra car bus train umbrella shirt jacket red blue "
           "green white black left right middle front behind near holding sitting standing wearing second third "
           "largest smallest two people all of them").split()
  for text in [" ".join(words)] + SENTENCES:
    ids, _ = tokenizer.encode(text, max_length=64)
    assert tokenizer.unk_id not in ids.tolist(), (text, tokenizer.tokens(text))


def test_ids_equal_transformers_tokenizers(tokenizer):
  from transformers import BertTokenizer
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

  # Two independent references: the tokenizer.json of the checkpoint and the pure-Python WordPiece.
  references = [BertTokenizer.from_pretrained(str(minilm_path())),
                BertTokenizerLegacy(vocab_file=str(minilm_path() / "vocab.txt"))]
  for text in SENTENCES:
    ids, mask = tokenizer.encode(text, max_length=20)
    for reference in references:
      expected = reference(text, max_length=20, truncation=True, padding="max_length")
      assert ids.tolist() == expected["input_ids"], (type(reference).__name__, text)
      assert mask.tolist() == expected["attention_mask"], (type(reference).__name__, text)


def test_rejects_empty_text_and_non_strings(tokenizer):
  for text in ["", "   ", "\n\t "]:
    with pytest.raises(ValueError, match="empty"):
      tokenizer.encode(text)
  with pytest.raises(TypeError, match="must be a str"):
    tokenizer.encode(None)
  with pytest.raises(ValueError, match="max_length"):
    tokenizer.encode("a dog", max_length=2)


def test_pickles_without_the_hf_tokenizer_and_encodes_the_same(tokenizer):
  expected = tokenizer.encode(SENTENCES[0])
  assert tokenizer._hf_tokenizer is not None  # Built by the call above; must not travel.
  payload = pickle.dumps(tokenizer)
  assert len(payload) < 1000, len(payload)
  restored = pickle.loads(payload)
  assert restored._hf_tokenizer is None
  for got, want in zip(restored.encode(SENTENCES[0]), expected):
    np.testing.assert_array_equal(got, want)


def test_unpickles_and_encodes_in_a_fresh_process_without_torch(tokenizer):
  # What a grain worker does: receive the pickled transform, build the HF tokenizer there, encode.
  child = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); ids, mask = t.encode('the red car'); "
           "print(ids.tolist(), mask.tolist(), 'torch' in sys.modules, 'tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(tokenizer), capture_output=True,
                          check=True, timeout=120)
  expected_ids, expected_mask = tokenizer.encode("the red car")
  assert result.stdout.decode().split("] ")[-1].split() == ["False", "False"], result.stdout
  assert str(expected_ids.tolist()) in result.stdout.decode()
  assert str(expected_mask.tolist()) in result.stdout.decode()


def test_custom_vocabulary_file_is_really_used(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "dog", "##s"]) + "\n")
  ids, mask = Tokenizer(vocab).encode("The dogs cat", max_length=8)
  assert ids.tolist() == [2, 5, 6, 7, 1, 3, 0, 0]
  assert mask.tolist() == [1] * 6 + [0] * 2


def test_clear_errors_for_bad_vocabularies(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer(tmp_path / "nope.txt")
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "the"]) + "\n")
  with pytest.raises(ValueError, match=r"lacks the special token '\[CLS\]'"):
    Tokenizer(tmp_path).encode("the")
