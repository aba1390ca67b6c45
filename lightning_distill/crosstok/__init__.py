"""Cross-tokenizer support: align two tokenizations of one text, and find the shared vocabulary.

* :mod:`~lightning_distill.crosstok.align`: :func:`align_offsets` / :func:`align_text` group the
  tokens of both tokenizations into spans that end on a common character boundary;
* :mod:`~lightning_distill.crosstok.vocab`: :func:`shared_vocab` pairs the entries whose token
  strings stand for the same bytes.

The losses are in :mod:`lightning_distill.losses.cross_tokenizer`, the batches come from
:class:`~lightning_distill.data.CrossTokenizerDataModule`; see ``docs/cross_tokenizer.md``.
"""

from lightning_distill.crosstok.align import Alignment, align_offsets, align_text, clean_ends
from lightning_distill.crosstok.vocab import SharedVocab, shared_vocab, token_bytes

__all__ = ["Alignment", "SharedVocab", "align_offsets", "align_text", "clean_ends", "shared_vocab", "token_bytes"]
