"""Data: the offline demo corpus (below), and :class:`TextDataModule` for your own text.

:class:`TextDataModule` (``text.py``, ``docs/data.md``) reads JSONL/Parquet/CSV/text files or a
Hugging Face dataset and serves the same batches as the demo's data module.

Layout: ``corpus.py`` / ``tokenizer.py`` / ``datamodule.py`` (the demo), ``sources.py`` /
``encode.py`` / ``store.py`` / ``text.py`` (your text), and what both data modules share:
``base.py`` (settings checks, fingerprints, train filters, loaders), ``loaders.py`` (the
resumable train loader), ``blocks.py`` (datasets, packing, collation) and ``splits.py`` (split
assignment, sample ids).

Offline data for the demo: a two-slice corpus, a tokenizer trained on it, token blocks.

Nothing here touches the network. Every Python installation carries the text the demo needs:

``prose``
    English reference prose: the 79 language topics ``help()`` shows, from
    ``pydoc_data.topics.topics`` (about 466 KB on CPython 3.11).
``code``
    The standard library's own ``.py`` files (``sysconfig.get_paths()["stdlib"]``), minus test
    suites, site-packages, generated tables and the modules distributions split out or patch;
    a deterministic subset of about 500 KB, so that the two slices weigh about the same.

:func:`demo_corpus` returns them as :class:`Document` objects with stable ids
(``"prose/formatstrings"``, ``"code/json/decoder.py"``). :func:`train_bpe_tokenizer` trains a
byte-level BPE with exactly ``vocab_size`` tokens on the corpus (``<|endoftext|>`` is id 0 and
doubles as eos/bos/unk/pad). :class:`SlicedTextDataModule` splits *documents* into
train/val/test by a hash of their id, concatenates each split's documents per slice with
``<|endoftext|>`` between them and cuts ``seq_len`` blocks, each tagged with its slice, so
metrics can be reported per slice. ``train_slices=["prose"]`` trains on prose only while val and
test keep every slice, which exposes what distillation on one slice fails to transfer.

Caching: everything lives under :func:`cache_root` (``$LIGHTNING_DISTILL_CACHE``, else
``$XDG_CACHE_HOME/lightning-distill``, else ``~/.cache/lightning-distill``); the data module uses
``<root>/data/tokenizer-<key>/tokenizer.json``, where the key hashes the corpus texts, the
vocabulary size and the tokenizer format version, so a changed corpus or vocabulary never reads
a stale file. Delete the folder at any time. Token blocks are *not* cached: on two busy cores,
building the corpus takes about 0.05 s and tokenizing all of it 0.2-0.7 s, too little to be
worth a second cache. Measured for the default demo (vocab 2048, ``seq_len=128``): a cold
``prepare_data()`` + ``setup()``, which trains the tokenizer, takes 0.5-1.8 s; a warm one
0.3-1.0 s, the spread being other load on the cores (plus about 4 s to import Lightning and
transformers).
"""

from __future__ import annotations

from lightning_distill.paths import cache_root

from .base import SliceCount
from .blocks import TokenBlockDataset
from .corpus import Document, corpus_fingerprint, demo_corpus
from .cross import CrossTokenizerDataModule
from .datamodule import SlicedTextDataModule
from .sentences import SentenceDataModule, sentence_pools
from .splits import assign_splits
from .text import TextDataModule
from .tokenizer import EOS_TOKEN, tokenizer_fingerprint, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "CrossTokenizerDataModule",
    "Document",
    "SentenceDataModule",
    "SliceCount",
    "SlicedTextDataModule",
    "TextDataModule",
    "TokenBlockDataset",
    "assign_splits",
    "cache_root",
    "corpus_fingerprint",
    "demo_corpus",
    "sentence_pools",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
