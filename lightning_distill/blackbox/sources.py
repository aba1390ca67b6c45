"""Teacher sources for black-box distillation: anything that turns prompts into completions.

A source is any object with the two methods of :class:`TeacherSource`. Two are built in:

* :class:`LocalHFTeacher`: a Hugging Face causal LM held in this process (batched ``generate``,
  left padding, the tokenizer's chat template when it has one, ``n`` seeded samples per prompt).
* :class:`FunctionTeacher`: wraps any callable from prompts to completions (a server client, a
  lookup table, a test double), so other sources need no subclass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from lightning_distill.validation import check_bool, check_int, check_number

__all__ = ["Completion", "FunctionTeacher", "LocalHFTeacher", "TeacherSource", "check_prompts"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class Completion:
    """One answer of a teacher to one prompt.

    Attributes:
        text: the completion, without the prompt and without special tokens.
        finish_reason: ``"stop"`` (the teacher ended it) or ``"length"`` (cut at the token limit).
        prompt_tokens: tokens the prompt took (after the chat template), or ``None`` if unknown.
        completion_tokens: tokens generated (the end token included), or ``None`` if unknown.
    """

    text: str
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Completion.text must be a str, got {type(self.text).__name__}.")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Completion.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}."
            )
        check_int("Completion.prompt_tokens", self.prompt_tokens, low=0, allow_none=True)
        check_int("Completion.completion_tokens", self.completion_tokens, low=0, allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class TeacherSource(Protocol):
    """What the record writer needs from a teacher.

    ``generate(prompts, n=n, seed=seed)`` returns one list per prompt, in order, each holding
    ``n`` :class:`Completion` s (sample ``j`` of every prompt is the ``j``-th entry). The same
    prompts, ``n`` and ``seed`` should give the same completions where the source can promise it.

    ``identity()`` returns plain JSON values that say which teacher this is (model name, weight
    fingerprint or revision, server URL) and, under ``"generation"``, its sampling settings. It
    must never contain credentials: it is written into every record.
    """

    def generate(
        self, prompts: list[str], *, n: int = 1, seed: int = 0
    ) -> list[list[Completion]]: ...

    def identity(self) -> dict[str, Any]: ...


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` as a list of strings.

    Raises:
        TypeError: not a list/tuple of strings (a single string is refused: wrap it in a list).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of str, got {type(prompts).__name__}; wrap one prompt as [prompt]."
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}.")
    return list(prompts)


def _derived_seed(seed: int, *parts: Any) -> int:
    blob = "\x1f".join(str(p) for p in (seed, *parts)).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") % (2**63)


class LocalHFTeacher:
    """A Hugging Face causal LM in this process as a :class:`TeacherSource`.

    Prompts are run in batches of ``batch_size`` with left padding. When the tokenizer has a chat
    template, each prompt becomes one user message with the generation prompt added; otherwise the
    prompt text is tokenized as it is. Sample ``j`` of a batch is drawn under a seed derived from
    ``seed``, ``j`` and the batch's prompts, so the same prompts, batch size and seed give the same
    completions on the same hardware and library versions.

    Args:
        model: a causal LM with ``generate`` (e.g. ``LlamaForCausalLM``); put it on its device first.
        tokenizer: its tokenizer; a missing pad token falls back to the end token.
        max_new_tokens: the most tokens generated per completion (``finish_reason="length"`` there).
        temperature: sampling temperature (> 0); used when ``do_sample``.
        top_p: nucleus sampling mass in (0, 1]; used when ``do_sample``.
        do_sample: sample (``True``) or decode greedily (``False``; all ``n`` samples then agree).
        batch_size: prompts per ``generate`` call.
        seed: the default seed of :meth:`generate`.
        progress: show a tqdm progress bar.

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of range, or a tokenizer with
            neither a pad nor an end token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model must have a generate method (a Hugging Face causal LM), got {type(model).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.top_p = check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)
        self.do_sample = check_bool("do_sample", do_sample)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.seed = check_int("seed", seed)
        self.progress = check_bool("progress", progress)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError(
                "tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token first."
            )
        self._pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._eos_id = tokenizer.eos_token_id

    def settings(self) -> dict[str, Any]:
        """The sampling settings, as plain values."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "do_sample": self.do_sample,
            "top_k": 0 if self.do_sample else None,
            "batch_size": self.batch_size,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    def identity(self) -> dict[str, Any]:
        """Source kind, model name, :func:`~lightning_distill.models.identity.describe_model`, settings."""
        from lightning_distill.models.identity import describe_model

        described = describe_model(self.model)
        return {
            "source": "local_hf",
            "model_name": described.get("name_or_path") or type(self.model).__name__,
            "model": described,
            "tokenizer": getattr(self.tokenizer, "name_or_path", None) or None,
            "generation": self.settings(),
        }

    def _prompt_text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def generate(
        self, prompts: list[str], *, n: int = 1, seed: int | None = None
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt (see the class docstring for the seeding).

        Raises:
            TypeError, ValueError: ``prompts`` not a list of str, ``n`` < 1.
        """
        import torch

        prompts = check_prompts(prompts)
        n = check_int("n", n, low=1)
        seed = self.seed if seed is None else check_int("seed", seed)
        out: list[list[Completion]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts) * n, desc="Teacher generating", unit="sample")
        was_training = self.model.training
        self.model.eval()
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                enc = self.tokenizer(
                    [self._prompt_text(p) for p in batch],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                enc = {
                    k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
                }
                prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
                width = enc["input_ids"].shape[1]
                for j in range(n):
                    kwargs: dict[str, Any] = {"do_sample": self.do_sample}
                    if (
                        self.do_sample
                    ):  # top_k=0: the model's default top-k does not cut the nucleus
                        kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
                    # the caller's random state is left as it was
                    cuda = [device] if device.type == "cuda" else []
                    with torch.random.fork_rng(devices=cuda), torch.no_grad():
                        torch.manual_seed(_derived_seed(seed, j, *batch))
                        ids = self.model.generate(
                            **enc,
                            max_new_tokens=self.max_new_tokens,
                            pad_token_id=self._pad_id,
                            eos_token_id=self._eos_id,
                            **kwargs,
                        )
                    for i, row in enumerate(ids[:, width:].tolist()):
                        stop = self._eos_id is not None and self._eos_id in row
                        used = row[: row.index(self._eos_id) + 1] if stop else row
                        text = self.tokenizer.decode(used, skip_special_tokens=True)
                        out[start + i].append(
                            Completion(
                                text, "stop" if stop else "length", int(prompt_lens[i]), len(used)
                            )
                        )
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            self.tokenizer.padding_side = side
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return out


class FunctionTeacher:
    """Any callable ``fn(prompts, n=, seed=)`` as a :class:`TeacherSource`.

    ``fn`` returns one list per prompt of ``n`` items, each a :class:`Completion`, a plain string
    (finish reason ``"stop"``, token counts unknown) or a dict of ``Completion`` fields.

    Args:
        fn: the callable.
        name: the teacher's name in the records (default: the callable's qualified name).
        identity: more plain values for :meth:`identity` (e.g. a server URL without credentials).

    Raises:
        TypeError: ``fn`` not callable, ``name`` not a str, ``identity`` not a dict.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        identity: dict[str, Any] | None = None,
    ):
        if not callable(fn):
            raise TypeError(
                f"fn must be callable (prompts, n=, seed=) -> completions, got {type(fn).__name__}."
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}.")
        if identity is not None and not isinstance(identity, dict):
            raise TypeError(f"identity must be a dict or None, got {type(identity).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self._identity = dict(identity or {})

    def identity(self) -> dict[str, Any]:
        return {"source": "function", "model_name": self.name, **self._identity}

    def generate(self, prompts: list[str], *, n: int = 1, seed: int = 0) -> list[list[Completion]]:
        """Call ``fn`` and check its answer: one list of ``n`` completions per prompt.

        Raises:
            ValueError: ``fn`` returned the wrong number of lists or of completions.
            TypeError: an item that is not a Completion, str or dict.
        """
        prompts = check_prompts(prompts)
        n = check_int("n", n, low=1)
        result = list(self.fn(prompts, n=n, seed=seed))
        if len(result) != len(prompts):
            raise ValueError(
                f"{self.name} returned {len(result)} lists for {len(prompts)} prompts; return one per prompt."
            )
        out = []
        for i, samples in enumerate(result):
            samples = list(samples)
            if len(samples) != n:
                raise ValueError(
                    f"{self.name} returned {len(samples)} completions for prompt {i}, expected n={n}."
                )
            out.append([_as_completion(s) for s in samples])
        return out


def _as_completion(item: Any) -> Completion:
    if isinstance(item, Completion):
        return item
    if isinstance(item, str):
        return Completion(item)
    if isinstance(item, dict):
        return Completion(**item)
    raise TypeError(f"a completion must be a Completion, str or dict, got {type(item).__name__}.")
