"""Output adapters: how to call a model on a batch and read logits from what it returns.

One answer for every model kind: Hugging Face models (``ModelOutput.logits``), plain
``nn.Module`` s returning a tensor, tuples or dicts, and anything else through a
user callable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "RESERVED_BATCH_KEYS",
    "call_model",
    "check_positions",
    "decoder_input_ids_from_labels",
    "is_causal_lm",
    "is_classifier",
    "is_hf_model",
    "is_seq2seq",
    "logits_from_output",
    "max_positions",
    "output_vocab_size",
    "unwrap_model",
    "wrapper_prefix",
    "vocab_mismatch_message",
]

#: Batch keys that describe the sample rather than feed the model.
RESERVED_BATCH_KEYS = frozenset({"labels", "slice", "sample_id", "teacher_targets"})

LogitsFn = Callable[[Any], Tensor]


def _inner(model: nn.Module, peft: bool = True) -> nn.Module | None:
    """The module one wrapper layer stands for, or ``None`` when ``model`` is no known wrapper."""
    compiled = model.__dict__.get("_modules", {}).get("_orig_mod")  # torch.compile's OptimizedModule
    if isinstance(compiled, nn.Module):
        return compiled
    if type(model).__name__ in _PARALLEL_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        return model.module  # DistributedDataParallel, DataParallel, FullyShardedDataParallel
    get_base_model = getattr(model, "get_base_model", None) if peft else None  # peft's PeftModel
    if callable(get_base_model):
        base = get_base_model()
        if isinstance(base, nn.Module) and base is not model:
            return base
    return None


_PARALLEL_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"})


def unwrap_model(model: nn.Module, *, peft: bool = True) -> nn.Module:
    """The model behind its wrappers: ``torch.compile`` (``_orig_mod``), DDP/FSDP/DataParallel
    (``.module``) and peft (``get_base_model()``), any number of layers deep.

    Whatever decides *what* a model is (its family, its output width, its identity, its
    ``forward`` signature) looks at this; the wrapper is what runs.

    Args:
        model: the model, wrapped or not.
        peft: also look through peft wrappers (``False``: stop at one, e.g. to save the adapter
            with peft's own ``save_pretrained``).
    """
    for _ in range(16):
        inner = _inner(model, peft)
        if inner is None:
            break
        model = inner
    return model


def wrapper_prefix(model: nn.Module) -> str:
    """The state-dict prefix the wrappers add in front of the unwrapped model's keys
    (``"_orig_mod."`` for a compiled model, ``""`` for a bare one)."""
    base = unwrap_model(model)
    if base is model:
        return ""
    name = next((n for n, m in model.named_modules(remove_duplicate=False) if m is base), "")
    return f"{name}." if name else ""


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` (behind any wrapper) is a transformers ``PreTrainedModel``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(unwrap_model(model), PreTrainedModel)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM (logits at t score token t + 1)."""
    if not is_hf_model(model):
        return False
    name = type(unwrap_model(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_seq2seq(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face encoder-decoder (T5, BART, ...): its logits sit at the
    decoder's positions and its decoder inputs are the labels shifted right."""
    if not is_hf_model(model):
        return False
    return bool(getattr(unwrap_model(model).config, "is_encoder_decoder", False))


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face classifier (``*ForSequenceClassification``,
    ``*ForTokenClassification``, ...): its outputs are ``config.num_labels`` classes."""
    return is_hf_model(model) and type(unwrap_model(model)).__name__.endswith("Classification")


def decoder_input_ids_from_labels(model: nn.Module, labels: Tensor) -> Tensor:
    """The decoder inputs an encoder-decoder derives from ``labels``, by its own shift.

    The same as transformers does inside ``forward(labels=...)`` (``prepare_decoder_input_ids_from_labels``
    or T5's ``_shift_right``: the decoder start token first, ``-100`` replaced by the pad id), without
    handing it the labels, so it computes no loss of its own.

    Raises:
        ValueError: the model has no such shift (pass ``decoder_input_ids`` in the batch).
    """
    base = unwrap_model(model)
    shift = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if callable(shift):
        return shift(labels=labels)
    shift = getattr(base, "_shift_right", None)
    if callable(shift):
        return shift(labels)
    raise ValueError(f"{type(base).__name__} cannot build its decoder inputs from labels; put "
                     "'decoder_input_ids' into the batch.")


def output_vocab_size(model: nn.Module) -> int | None:
    """The width of the model's logits when it can be read without a forward pass.

    A classifier's width is its number of labels (``config.num_labels``), not its token
    vocabulary; a language model's is the rows of its output head (else ``config.vocab_size``).
    ``None`` for anything else (multiple choice, question answering, plain modules): the width
    is then read from the first batch's logits.
    """
    if not is_hf_model(model):
        return None
    base = unwrap_model(model)
    if is_classifier(base):
        labels = getattr(base.config, "num_labels", None)
        return int(labels) if labels else None
    head = base.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    if not (is_causal_lm(base) or is_seq2seq(base) or type(base).__name__.endswith("ForMaskedLM")):
        return None  # its outputs are not over the token vocabulary
    size = getattr(base.config, "vocab_size", None)
    return int(size) if size else None


def max_positions(model: nn.Module) -> int | None:
    """The longest input a Hugging Face model declares it takes (``config.max_position_embeddings``,
    GPT-2's ``n_positions``), or ``None`` (plain modules, relative positions as in T5)."""
    if not is_hf_model(model):
        return None
    config = unwrap_model(model).config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_data_positions(student: nn.Module | None, teacher: nn.Module | None, datamodule: Any) -> None:
    """Refuse a data module whose sequences are longer than a model takes (``check_positions``), before any
    forward: ``seq_len`` against both models, or, when the teacher reads its own tokens
    (``teacher_seq_len``, two tokenizers), ``seq_len`` against the student and ``teacher_seq_len`` against
    the teacher. Nothing when the data module has no integer ``seq_len``.

    Raises:
        ValueError: a length past a model's maximum (see :func:`check_positions`).
    """
    seq_len = getattr(datamodule, "seq_len", None)
    t_len = getattr(datamodule, "teacher_seq_len", None)
    if not isinstance(seq_len, int):
        return
    if isinstance(t_len, int) and t_len != seq_len:
        check_positions({"student": student}, seq_len, f"data seq_len={seq_len}")
        check_positions({"teacher": teacher}, t_len, f"data teacher_seq_len={t_len}", setting="data.teacher_seq_len")
    else:
        check_positions({"student": student, "teacher": teacher}, seq_len, f"data seq_len={seq_len}")


def check_positions(models: Mapping[str, nn.Module | None], length: int, what: str,
                    setting: str = "data.seq_len") -> None:
    """Refuse sequences longer than a model takes, before any forward.

    Args:
        models: ``{"student": model, "teacher": model or None}``.
        length: the sequence length in question.
        what: where it comes from, for the message (``"data seq_len=64"``).
        setting: the setting the message tells to lower (``data.teacher_seq_len`` for a teacher that
            reads its own tokens).

    Raises:
        ValueError: ``length`` exceeds a model's maximum, naming the model, both numbers and the fix.
    """
    for name, model in models.items():
        limit = max_positions(model) if model is not None else None
        if limit is not None and length > limit:
            raise ValueError(
                f"{what} is longer than the {name} takes ({limit} positions, config.max_position_embeddings); "
                f"longer inputs would index past its position table or run where it was never trained. "
                f"Lower the sequence length to {limit} ({setting}={limit}) or use a {name} with a longer context."
            )


def _forward_parameters(model: nn.Module) -> tuple[frozenset[str], bool, bool, bool]:
    """(named inputs, takes ``**kwargs``, is a Hugging Face model, is an encoder-decoder), read
    once per model from the unwrapped model (a compiled model's own ``forward`` takes only
    ``*args, **kwargs``)."""
    cached = model.__dict__.get("_ld_forward_params")
    if cached is None:
        params = inspect.signature(unwrap_model(model).forward).parameters.values()
        named = frozenset(
            p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        cached = (named, var_kw, is_hf_model(model), is_seq2seq(model))
        model.__dict__["_ld_forward_params"] = cached
    return cached


def call_model(model: nn.Module, inputs: Any, **extra: Any) -> Any:
    """Call ``model`` on ``inputs``: a mapping of named inputs, a tensor, or a tuple of them.

    For a mapping, only the keys that ``model.forward`` names are passed (a forward that takes
    nothing but ``**kwargs`` gets every non-reserved key), so batches may carry extra keys
    such as ``slice`` or ``sample_id``. Hugging Face models are called with ``use_cache=False``
    (no key/value cache is built during training) and ``return_dict=True``. An encoder-decoder
    (T5, BART) without ``decoder_input_ids`` in the batch gets them from ``labels`` by its own
    shift (:func:`decoder_input_ids_from_labels`); the labels themselves are never passed, so no
    model computes a loss that would be thrown away. ``extra`` keyword arguments (e.g.
    ``output_hidden_states=True``) are always passed. Wrapped models (``torch.compile``, DDP,
    peft) are called as they are, with the inputs their unwrapped model names.

    Raises:
        ValueError: no batch key is an input of the model, or an encoder-decoder batch has
            neither ``labels`` nor ``decoder_input_ids``.
    """
    if isinstance(inputs, Mapping):
        named, var_kw, hf, seq2seq = _forward_parameters(model)
        if named - {"self"}:
            kwargs = {k: v for k, v in inputs.items() if k in named and k not in RESERVED_BATCH_KEYS}
        elif var_kw:
            kwargs = {k: v for k, v in inputs.items() if k not in RESERVED_BATCH_KEYS}
        else:
            kwargs = {}
        if not kwargs:
            raise ValueError(
                f"none of the batch keys {sorted(inputs)} is an input of {type(model).__name__}.forward "
                f"(it takes {sorted(named) or 'only positional arguments'}); rename the keys or pass "
                "(inputs, target) tuples."
            )
        if seq2seq and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            labels = inputs.get("labels")
            if not isinstance(labels, Tensor):
                raise ValueError(
                    f"{type(unwrap_model(model)).__name__} is an encoder-decoder: its batches need 'labels' (the "
                    "target tokens; the decoder inputs are built from them) or 'decoder_input_ids'; got keys "
                    f"{sorted(inputs)}."
                )
            kwargs["decoder_input_ids"] = decoder_input_ids_from_labels(model, labels)
        if hf:
            if "use_cache" in named or var_kw:
                kwargs.setdefault("use_cache", False)
            if "return_dict" in named or var_kw:
                kwargs.setdefault("return_dict", True)
        return model(**kwargs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **extra)
    return model(inputs, **extra)


def logits_from_output(output: Any, fn: LogitsFn | None = None, *, who: str = "model", inputs: Any = None) -> Tensor:
    """Read logits from a model's output.

    Args:
        output: what the model returned.
        fn: optional user callable ``output -> logits`` for anything else (for example a
            model that returns log-probabilities flattened to ``(N, V)``).
        who: ``"student"`` or ``"teacher"``, for error messages.
        inputs: the model's inputs, passed as ``fn(output, inputs)`` to a callable that sets
            ``reads_inputs = True`` (e.g. :class:`~lightning_distill.models.pooling.Pooling`,
            which needs the attention mask).

    Raises:
        TypeError: when no logits can be found; the message says what came back.
    """
    if fn is not None:
        logits = fn(output, inputs) if getattr(fn, "reads_inputs", False) else fn(output)
    elif isinstance(output, Tensor):
        logits = output
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(
            f"cannot read logits from the {who}'s output of type {type(output).__name__}; return a "
            f"tensor or an object with .logits, or pass {who}_logits_fn=lambda out: ... to "
            "DistillationModule."
        )
    if not isinstance(logits, Tensor):
        raise TypeError(f"the {who}'s logits must be a torch.Tensor, got {type(logits).__name__}.")
    return logits


def vocab_mismatch_message(student_vocab: int, teacher_vocab: int) -> str:
    """The one message for a student and teacher whose output vocabularies differ, with the fixes."""
    return (
        f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ. If one tokenizer "
        f"extends the other (padded embedding rows, as Qwen2.5's 151936 vs 152064), pass "
        f"vocab_mismatch='slice' to compare over the first {min(student_vocab, teacher_vocab)} entries; if the "
        "tokenizers differ, the logit losses cannot compare them: use the cross-tokenizer loss (loss=cross_tokenizer, "
        "or CrossTokenizerKD / ULDLoss in Python) with batches that carry both tokenizations (data=cross_tokenizer, "
        "CrossTokenizerDataModule(teacher_tokenizer=...); your files: data=files data.teacher_tokenizer=<the "
        "teacher's tokenizer>, TextDataModule(teacher_tokenizer=...)); see docs/cross_tokenizer.md."
    )
