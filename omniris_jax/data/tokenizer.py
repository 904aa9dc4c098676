"""Turns a referring expression into the fixed-length token ids and mask that the BERT text encoder reads.

The input pipeline runs this inside grain worker processes, so `Tokenizer` pickles as nothing but its settings
(the vocabulary path) and builds the Hugging Face tokenizer lazily on first use in each process.

Which HF class, and how it is built, matters: in transformers 5.x `BertTokenizer` is the `tokenizers`-backed
WordPiece tokenizer, and `BertTokenizer(vocab_file=path)` (like the old `BertTokenizerFast(vocab_file=...)`)
silently ignores the file and tokenises against a five-token default vocabulary, mapping every word to [UNK].
The vocabulary must be passed as `vocab=path`. `Tokenizer` does that and then checks that the loaded vocabulary
really is the file's, so this failure cannot come back unnoticed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

PathLike = str | os.PathLike


def _default_vocab_path() -> pathlib.Path:
  """The uncased vocabulary of the pretrained all-MiniLM-L6-v2 text encoder (the default model)."""
  from omniris_jax.models.bert import minilm_path  # pylint: disable=g-import-not-at-top  (keeps imports light)
  return minilm_path() / "vocab.txt"


class Tokenizer:
  """BERT WordPiece tokenizer from a `vocab.txt`, producing (ids, attention_mask) of a fixed length.

  Picklable: only `vocab_path` and `do_lower_case` travel; the HF tokenizer is re-created on first use after
  unpickling (it is cheap: a few milliseconds).

  Attributes:
    vocab_path: the `vocab.txt`, one WordPiece token per line, the line number being its id.
    do_lower_case: lower-case and strip accents first (True for uncased vocabularies such as MiniLM's).
    keep_sep: a text longer than the length keeps [SEP] as its last token (True), or its ids are cut as they
      are, which drops [SEP] (False: what the release's loaders do).
  """

  def __init__(self, vocab_path: PathLike | None = None, *, do_lower_case: bool = True, keep_sep: bool = True):
    vocab_path = pathlib.Path(vocab_path) if vocab_path is not None else _default_vocab_path()
    if vocab_path.is_dir():
      vocab_path = vocab_path / "vocab.txt"
    if not vocab_path.is_file():
      raise FileNotFoundError(f"Tokenizer: vocabulary {str(vocab_path)!r} does not exist (pass a vocab.txt or "
                              "the folder of an HF BERT checkpoint that holds one)")
    self.vocab_path = vocab_path
    self.do_lower_case = do_lower_case
    self.keep_sep = keep_sep
    self._hf_tokenizer = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_hf_tokenizer"] = None  # Rebuilt lazily in the receiving process.
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_path={str(self.vocab_path)!r}, do_lower_case={self.do_lower_case}, "
            f"keep_sep={self.keep_sep})")

  @property
  def hf_tokenizer(self):
    """The transformers tokenizer, built on first use in this process and checked against the vocabulary file."""
    if self._hf_tokenizer is None:
      from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top  (heavy; only when used)

      tokenizer = BertTokenizer(vocab=str(self.vocab_path), do_lower_case=self.do_lower_case)
      with open(self.vocab_path, encoding="utf-8") as file:
        file_tokens = [line.rstrip("\n") for line in file]
      for special in (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.unk_token):
        if special not in file_tokens:
          raise ValueError(f"Tokenizer: {str(self.vocab_path)!r} lacks the special token {special!r}")
        if tokenizer.convert_tokens_to_ids(special) != file_tokens.index(special):
          raise RuntimeError(f"Tokenizer: transformers did not load {str(self.vocab_path)!r} ({special!r} got id "
                             f"{tokenizer.convert_tokens_to_ids(special)}, the file says "
                             f"{file_tokens.index(special)}); every token would become [UNK]")
      self._hf_tokenizer = tokenizer
    return self._hf_tokenizer

  @property
  def pad_id(self) -> int:
    """Id of [PAD] (0 in every BERT vocabulary); padded positions carry it with mask 0."""
    return self.hf_tokenizer.pad_token_id

  @property
  def unk_id(self) -> int:
    """Id of [UNK], which words outside the vocabulary become."""
    return self.hf_tokenizer.unk_token_id

  @property
  def cls_id(self) -> int:
    """Id of [CLS], always the first token."""
    return self.hf_tokenizer.cls_token_id

  @property
  def sep_id(self) -> int:
    """Id of [SEP], always the last real token (kept when truncating)."""
    return self.hf_tokenizer.sep_token_id

  def tokens(self, text: str) -> list[str]:
    """The WordPiece tokens of `text` without [CLS]/[SEP] (for inspection and tests)."""
    return self.hf_tokenizer.tokenize(text)

  def encode(self, text: str, max_length: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises one referring expression to exactly `max_length` positions.

    Long texts are cut so that [CLS] stays first and [SEP] last (with `keep_sep=False`: cut after `max_length`
    ids, [SEP] dropped); short ones are padded with [PAD] and mask 0.

    Args:
      text: a non-empty referring expression. When a sample has no text prompt, the pipeline does not call this.
      max_length: the fixed output length (the paper uses 20); at least 3 (room for one word).

    Returns:
      (ids, attention_mask), both int32 of shape (max_length,); mask is 1 on real tokens, [CLS] and [SEP].

    Raises:
      TypeError: `text` is not a string.
      ValueError: `text` is empty or whitespace-only (or has no tokens), or `max_length` is too small.
    """
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}: {text!r}")
    if max_length < 3:
      raise ValueError(f"Tokenizer.encode: {max_length=} must be at least 3 ([CLS], one token, [SEP])")
    if not text.strip():
      raise ValueError(f"Tokenizer.encode: text={text!r} is empty; a text prompt needs at least one word (for a "
                       "sample without a text prompt, do not call encode)")
    if self.keep_sep:
      encoded = self.hf_tokenizer(text, max_length=max_length, truncation=True, padding="max_length",
                                  return_attention_mask=True, return_token_type_ids=False)
    else:  # the release: encode everything, keep the first max_length ids, pad with 0
      full = self.hf_tokenizer(text, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
      cut = list(full[:max_length])
      encoded = {"input_ids": cut + [self.pad_id] * (max_length - len(cut)),
                 "attention_mask": [1] * len(cut) + [0] * (max_length - len(cut))}
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    mask = np.asarray(encoded["attention_mask"], dtype=np.int32)
    if ids.shape != (max_length,):  # Guards the HF call's contract, which changed between major versions.
      raise RuntimeError(f"Tokenizer.encode: transformers returned {ids.shape=}, expected ({max_length},)")
    if mask.sum() <= 2:
      raise ValueError(f"Tokenizer.encode: text={text!r} has no tokens once normalised (control characters only?)")
    return ids, mask
