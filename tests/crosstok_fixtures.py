"""Random pairs of small vocabularies and batches of one text in both, for the cross-tokenizer tests.

Import it from a test module (``from crosstok_fixtures import random_pair_batch``). Each vocabulary
holds the letters ``a``-``d`` and a random choice of their 2- and 3-letter strings, in a shuffled
id order; the texts are random letters, each side's tokens a random segmentation of the text into
its own entries (any entry that matches, not only the longest), and the groups come from
:func:`~lightning_distill.crosstok.align_offsets` on the tokens' character offsets. So groups of
one token on one side and several on the other are common, and so is a whole group spelled by one
entry of the side that split it (the case the merge must treat as the group: "ab" vs "a" + "b").
:func:`slow_tokenizer` gives a tokenizer without character offsets, which the alignment refuses.
"""

from __future__ import annotations

import itertools
import random

import torch

from lightning_distill.crosstok import SharedVocab, align_offsets

LETTERS = "abcd"
PIECES = ["".join(p) for n in (2, 3) for p in itertools.product(LETTERS, repeat=n)]


def vocab_pair(seed: int, student_pieces: int = 20, teacher_pieces: int = 32) -> tuple[list[str], list[str]]:
    """Two vocabularies (a string per id): the letters and a random choice of longer pieces each."""
    rng = random.Random(seed)
    student = list(LETTERS) + rng.sample(PIECES, student_pieces)
    teacher = list(LETTERS) + rng.sample(PIECES, teacher_pieces)
    rng.shuffle(student)
    rng.shuffle(teacher)
    return student, teacher


def shared_of(student: list[str], teacher: list[str]) -> SharedVocab:
    """The shared-vocabulary map of two string vocabularies, with their spellings (bytes per id)."""
    t_index = {s: i for i, s in enumerate(teacher)}
    pairs = sorted((i, t_index[s]) for i, s in enumerate(student) if s in t_index)
    return SharedVocab(torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]), len(student),
                       len(teacher), tuple(s.encode() for s in student), tuple(t.encode() for t in teacher))


def segment(text: str, vocab: list[str], rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    """A random tokenization of ``text`` into entries of ``vocab``: ``(ids, character offsets)``."""
    index = {s: i for i, s in enumerate(vocab)}
    ids, offsets, at = [], [], 0
    while at < len(text):
        fits = [n for n in (1, 2, 3) if text[at:at + n] in index and at + n <= len(text)]
        n = rng.choice(fits)
        ids.append(index[text[at:at + n]])
        offsets.append((at, at + n))
        at += n
    return ids, offsets


def random_pair_batch(seed: int, samples: int = 3, chars: tuple[int, int] = (14, 30), zero_teacher: bool = True):
    """``(batch, labels, vocab, student_logits, teacher_logits)``: random texts of ``chars`` letters
    in both tokenizations of :func:`vocab_pair`, padded (groups ``-1``), labels ``-100`` on group 0
    and padding, and random logits (with ``zero_teacher``, some of the teacher's entries at
    probability 0, as in a cache's padding: infinite for reverse KL, as for ``LogitKD``)."""
    rng = random.Random(seed)
    student, teacher = vocab_pair(seed)
    vocab = shared_of(student, teacher)
    rows = []
    for _ in range(samples):
        text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*chars)))
        s_ids, s_off = segment(text, student, rng)
        t_ids, t_off = segment(text, teacher, rng)
        al = align_offsets(s_off, t_off, len(text))
        rows.append((s_ids, t_ids, al.student_groups, al.teacher_groups))
    ts, tt = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    s_ids_all = torch.zeros(samples, ts, dtype=torch.long)
    t_ids_all = torch.zeros(samples, tt, dtype=torch.long)
    s_groups = torch.full((samples, ts), -1)
    t_groups = torch.full((samples, tt), -1)
    for b, (s_ids, t_ids, sg, tg) in enumerate(rows):
        s_ids_all[b, :len(s_ids)] = torch.tensor(s_ids)
        t_ids_all[b, :len(t_ids)] = torch.tensor(t_ids)
        s_groups[b, :len(sg)] = torch.tensor(sg)
        t_groups[b, :len(tg)] = torch.tensor(tg)
    labels = torch.cat([s_ids_all[:, 1:], torch.full((samples, 1), -100)], 1)
    labels = labels.masked_fill(torch.cat([s_groups[:, 1:], torch.full((samples, 1), -1)], 1) <= 0, -100)
    batch = {"input_ids": s_ids_all, "teacher_input_ids": t_ids_all, "student_groups": s_groups,
             "teacher_groups": t_groups, "labels": labels}
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(samples, ts, len(student), generator=g) * 2
    teacher_logits = torch.randn(samples, tt, len(teacher), generator=g) * 2
    if zero_teacher:
        teacher_logits[0, :, -3:] = float("-inf")
    return batch, labels, vocab, student_logits, teacher_logits


def slow_tokenizer():
    """A Python (slow) tokenizer of the 128 ASCII characters: it gives no character offsets, which the
    alignment needs (the refusals of a slow tokenizer are tested with it)."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self._vocab = {chr(i): i for i in range(128)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return 128

        def get_vocab(self):
            return dict(self._vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

    return CharTokenizer()
