"""The bad-input catalogue (docs/errors.md): each row's bad input gets exactly the error the table shows.

Three kinds of rows, each a parametrised test whose id is the row's id in the table:

* Python rows call the library and match the exception class and message.
* Command-line rows compose the overrides and call ``cli.run`` in this process (one process for all
  of them, a few seconds in total); the error must be one the command prints as its message with
  exit status 2 (``_user_error``), and no training step may have run. One of them also runs as a
  real subprocess, with the unknown-key row that Hydra itself rejects.
* Teacher-cache rows build one tiny cache and open it with something changed.

``test_the_table_lists_every_row`` keeps docs/errors.md and these rows in step.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.blackbox import OpenAITeacher, TeacherRequestError
from lightning_distill.cache import CacheCorruptedError, CacheMismatchError
from lightning_distill.callbacks import TeacherCache
from lightning_distill.checkpoint import CheckpointError
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config, freeze, load_pretrained
from lightning_distill.paths import NotWritableError

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "errors.md"
VOCAB, SEQ = 64, 12
TINY = ["experiment=tiny", "baseline=false", "export=false"]


def lm(seed: int = 0, vocab: int = VOCAB, positions: int = 32) -> nn.Module:
    return causal_lm_from_config(
        "llama",
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        seed=seed,
    )


def gpt2(seed: int) -> nn.Module:
    """GPT-2 learns a table of 8 positions: a longer input indexes past it."""
    return causal_lm_from_config(
        "gpt2", vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8, seed=seed
    )


class Net(nn.Module):
    """A plain classifier of 4 features into 3 classes; ``nan_rows`` makes those batch rows NaN."""

    def __init__(self, nan_rows: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.nan_rows = nan_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        if self.nan_rows:
            out = out.clone()
            out[list(self.nan_rows)] = float("nan")
        return out


def kd_task() -> dict:
    return {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)}


def plain_module(**teacher_kwargs) -> DistillationModule:
    return DistillationModule(Net(), freeze(Net(**teacher_kwargs)), kd_task())


def lm_module(positions: int = 32) -> DistillationModule:
    return DistillationModule(
        lm(0, positions=positions), freeze(lm(1, positions=positions)), kd_task()
    )


def _step(module: DistillationModule, batch) -> None:
    module._shared_step(batch, "train")


FEATURES = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _truncated_checkpoint(tmp_path: Path) -> Path:
    """A real checkpoint file cut in half (as a copy or a write cut off would leave it)."""
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"student.w": torch.zeros(64, 64)}, "epoch": 0}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class _Payload:
    """Unpickling this creates ``marker``: the side effect a malicious file would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(tmp_path / "MARKER")}, path)
    return path


def _pickled_model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    lm().config.save_pretrained(folder)
    torch.save(
        {"model.embed_tokens.weight": _Payload(tmp_path / "MARKER")}, folder / "pytorch_model.bin"
    )
    return folder


def _load_checkpoint(path: Path) -> None:
    DistillationModule.load_from_checkpoint(path, student=lm(0), teacher=freeze(lm(1)))


def _empty_file(tmp_path: Path) -> None:
    from lightning_distill.data import TextDataModule

    (tmp_path / "empty.jsonl").write_text("")
    data = TextDataModule(
        files=str(tmp_path / "empty.jsonl"),
        tokenizer=None,
        cache_dir=str(tmp_path / "data"),
        progress=False,
    )
    data.prepare_data()


def _two_tokenizer_data(tmp_path: Path, **kwargs) -> None:
    """TextDataModule with a teacher_tokenizer on a one-row file, built (``setup``) if the arguments pass."""
    from lightning_distill.data import TextDataModule, train_bpe_tokenizer

    (tmp_path / "a.jsonl").write_text('{"text": "hello world, hello there"}\n' * 3)
    args = {
        "files": str(tmp_path / "a.jsonl"),
        "tokenizer": train_bpe_tokenizer(["hello world"] * 4, 260),
        "cache_dir": str(tmp_path / "data"),
        "progress": False,
        **kwargs,
    }
    TextDataModule(**args).setup()


def _slow_tokenizer() -> object:
    """A Python (slow) tokenizer: no character offsets."""
    from crosstok_fixtures import slow_tokenizer

    return slow_tokenizer()


def _unwritable_cache(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    cache = TeacherCache(
        str(tmp_path / "a_file" / "cache"), kind="topk", k=2, splits=["train"], progress=False
    )
    cache.prepare(lm_module(), loaders={"train": DataLoader(Blocks(), batch_size=4)})


def _nan_teacher_fit(tmp_path: Path) -> None:
    """A real fit whose teacher returns NaN for the second sample of the first batch."""
    rows = [
        {"x": FEATURES[i % 2], "labels": torch.tensor(i % 3), "sample_id": 100 + i}
        for i in range(4)
    ]
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(plain_module(nan_rows=(1,)), DataLoader(rows, batch_size=2))


def _closed_port_teacher() -> OpenAITeacher:
    """A teacher whose base_url names a loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return OpenAITeacher(f"http://127.0.0.1:{port}/v1", "teacher", max_retries=0, progress=False)


# (id, call(tmp_path), exception class, message regex): Python rows.
PYTHON_ROWS = [
    (
        "temperature-not-positive",
        lambda _: LogitKD(temperature=0.0),
        ValueError,
        r"^temperature must be a finite number > 0, got 0\.0\.$",
    ),
    (
        "beta-outside-0-1",
        lambda _: LogitKD("generalized_jsd", beta=1.0),
        ValueError,
        r"^beta must be a finite number in \(0, 1\), got 1\.0\. generalized_jsd vanishes at beta=1; use reverse_kl",
    ),
    (
        "alpha-outside-0-1",
        lambda _: LogitKD("skew_forward_kl", alpha=1.0),
        ValueError,
        r"^alpha must be a finite number in \[0, 1\), got 1\.0\. alpha=0 is the plain KL",
    ),
    (
        "beta-for-a-divergence-without-it",
        lambda _: LogitKD("forward_kl", beta=0.5),
        ValueError,
        r"^beta=0\.5 was given, but divergence='forward_kl' takes neither beta nor alpha\.$",
    ),
    (
        "negative-weight",
        lambda _: TaskLoss(weight=-1.0),
        ValueError,
        r"^weight must be a finite number >= 0, got -1\.0\.$",
    ),
    (
        "all-weights-zero",
        lambda _: DistillationModule(
            Net(), freeze(Net()), {"kd": LogitKD(weight=0.0), "task": TaskLoss(weight=0.0)}
        ),
        ValueError,
        r"^every loss term has weight 0 \(kd, task\); give at least one a weight > 0\.$",
    ),
    (
        "unknown-divergence",
        lambda _: LogitKD("kl"),
        ValueError,
        r"^unknown divergence 'kl'; choose one of \['forward_kl', 'generalized_jsd', 'logit_mse', 'reverse_kl', "
        r"'skew_forward_kl', 'skew_reverse_kl', 'tvd'\]\.$",
    ),
    (
        "loss-term-not-a-LossTerm",
        lambda _: DistillationModule(Net(), freeze(Net()), {"kd": "forward_kl"}),
        TypeError,
        r"^loss term 'kd' is a str, not a LossTerm; wrap it in a LossTerm subclass",
    ),
    (
        "same-teacher-and-student",
        lambda _: (lambda m: DistillationModule(m, m))(Net()),
        ValueError,
        r"^teacher and student are the same object; pass a separate \(copied\) teacher\.$",
    ),
    (
        "vocabulary-mismatch-python",
        lambda _: _step(
            DistillationModule(lm(0), freeze(lm(1, vocab=80)), kd_task()), {"input_ids": IDS}
        ),
        ValueError,
        r"^student vocabulary \(64\) and teacher vocabulary \(80\) differ\. If one tokenizer extends the other .* "
        r"pass vocab_mismatch='slice' .*; if the tokenizers differ, the logit losses cannot compare them",
    ),
    (
        "labels-missing",
        lambda _: _step(plain_module(), {"x": FEATURES}),
        ValueError,
        r"^the train batch has no labels, but the loss terms \['task'\] read them; put 'labels' in each batch",
    ),
    (
        "labels-wrong-shape",
        lambda _: _step(plain_module(), (FEATURES, torch.zeros(3, dtype=torch.long))),
        ValueError,
        r"^labels of shape \(3,\) do not match the student's logits \(2, 3\) \(one label per position expected\)",
    ),
    (
        "labels-not-integers",
        lambda _: _step(plain_module(), (FEATURES, torch.zeros(2))),
        TypeError,
        r"^labels must hold integer class ids, got dtype torch\.float32\.$",
    ),
    (
        "label-outside-the-vocabulary",
        lambda _: _step(lm_module(), {"input_ids": IDS, "labels": IDS + VOCAB}),
        ValueError,
        r"^label id \d+ is outside the student's 64 output classes; the tokenizer and the student's "
        r"vocab_size must match \(or mark the position with -100\)\.$",
    ),
    (
        "batch-longer-than-the-model",
        lambda _: _step(lm_module(positions=8), {"input_ids": IDS}),
        ValueError,
        r"^the first train batch's input_ids \(length 12\) is longer than the student takes \(8 positions, "
        r"config\.max_position_embeddings\); .* Lower the sequence length to 8",
    ),
    (
        "batch-longer-than-gpt2-positions",
        lambda _: _step(
            DistillationModule(gpt2(0), freeze(gpt2(1)), kd_task()), {"input_ids": IDS % 32}
        ),
        ValueError,
        r"^the first train batch's input_ids \(length 12\) is longer than the student takes \(8 positions, "
        r"config\.max_position_embeddings\); longer inputs would index past its position table",
    ),
    (
        "empty-data-file",
        _empty_file,
        ValueError,
        r"^files='.*empty\.jsonl' holds no documents; point data\.files / data\.dataset at data with text in it\.$",
    ),
    (
        "teacher-tokenizer-not-fast",
        lambda tmp: _two_tokenizer_data(tmp, teacher_tokenizer=_slow_tokenizer()),
        TypeError,
        r"^teacher_tokenizer \(CharTokenizer\) gives no character offsets \(not a fast tokenizer\); "
        r"cross-tokenizer alignment needs a fast Hugging Face tokenizer: load it with "
        r"AutoTokenizer\.from_pretrained\(\.\.\., use_fast=True\), or save a tokenizer\.json for it\.$",
    ),
    (
        "teacher-tokenizer-not-found",
        lambda tmp: _two_tokenizer_data(tmp, teacher_tokenizer="/no/such/tokenizer"),
        ValueError,
        r"^data\.teacher_tokenizer='/no/such/tokenizer' cannot be loaded \(.*\)\. Pass the teacher's "
        r"tokenizer folder or hub id \(usually the teacher's path, data\.teacher_tokenizer=\$\{teacher\.path\}\); "
        r"data\.trust_remote_code=true only for tokenizer code you have read\.$",
    ),
    (
        "teacher-tokenizer-instruction-data",
        lambda tmp: _two_tokenizer_data(
            tmp, teacher_tokenizer="/any", prompt_field="prompt", response_field="response"
        ),
        ValueError,
        r"^teacher_tokenizer \(two tokenizations\) works on plain text only, not on prompt/response pairs",
    ),
    (
        "missing-model-folder",
        lambda _: load_pretrained("/no/such/teacher"),
        FileNotFoundError,
        r"^no model folder at '/no/such/teacher' \(resolved to /no/such/teacher\); pass a folder written by "
        r"save_pretrained \(with config\.json\) or a hub id",
    ),
    (
        "model-folder-without-config",
        lambda p: load_pretrained(str(p)),
        FileNotFoundError,
        r"is a folder without config\.json; point to the folder that save_pretrained wrote\.$",
    ),
    (
        "pickled-model-weights",
        lambda p: load_pretrained(str(_pickled_model_folder(p))),
        ValueError,
        r"^the weights at '.*model' are a pickle holding Python objects besides tensors, so they were not loaded "
        r"\(unpickling them could run code\)\. Use safetensors weights",
    ),
    (
        "corrupt-checkpoint",
        lambda p: _load_checkpoint(_truncated_checkpoint(p)),
        CheckpointError,
        r"cut\.ckpt is damaged or truncated and cannot be read as a checkpoint \(OSError: \[Errno 22\] Invalid "
        r"argument\); it may have been cut off while being written or copied\. Use another checkpoint",
    ),
    (
        "pickled-checkpoint",
        lambda p: _load_checkpoint(_pickled_checkpoint(p)),
        CheckpointError,
        r"evil\.ckpt is not a checkpoint this library wrote, or it is damaged: it holds Python objects other than "
        r"tensors and plain values, which the safe loader refuses to run\.",
    ),
    (
        "unwritable-cache-folder",
        _unwritable_cache,
        NotWritableError,
        r"^TeacherCache\(dirpath\)='.*a_file/cache' is not writable \(Not a directory\); the cache writes its lock "
        r"and targets there; fix the folder's permissions or pass another dirpath",
    ),
    (
        "server-refuses-connections",
        lambda _: _closed_port_teacher().generate(["hello"]),
        TeacherRequestError,
        r"^http://127\.0\.0\.1:\d+/v1 \(chat endpoint, model 'teacher'\) failed 1 time\(s\) \(max_retries=0\); "
        r"last: connection failed \(ConnectError: .*Connection refused\)\. Check that the server is running and "
        r"that base_url \(host, port, the /v1 suffix\) reaches it from this machine\.$",
    ),
    (
        "api-key-variable-not-set",
        lambda _: OpenAITeacher("http://127.0.0.1:8000/v1", "teacher", api_key_env="LD_CATALOGUE_UNSET_KEY"),
        ValueError,
        r"^api_key_env='LD_CATALOGUE_UNSET_KEY' names an environment variable that is not set; set it "
        r"\(export LD_CATALOGUE_UNSET_KEY=\.\.\.\) before running, or use api_key_env=None for a server without a key\.$",
    ),
    (
        "teacher-nan-or-inf",
        _nan_teacher_fit,
        ValueError,
        r"^the teacher's logits contain NaN or \+inf \(or a row of only -inf\) at global step 0, for sample id\(s\) "
        r"\[101\]; training stopped before the student's weights turn NaN\.",
    ),
    (
        "cache-topk-for-a-cross-tokenizer-run",
        lambda tmp: _cross_topk_cache(tmp),
        ValueError,
        r"^TeacherCache\(kind='topk'\) keeps a few of the teacher's ids per position, but the loss terms \['kd'\] "
        r"compare the teacher's whole distribution over its own tokens \(the shared entries and the sorted rest for "
        r"ULD\); use kind='dense' \(Hydra: callbacks=teacher_cache_dense\)\. Nothing was built\.$",
    ),
]


def _cross_topk_cache(tmp: Path) -> None:
    """A top-k cache for a cross-tokenizer term: refused before the folder exists."""
    from lightning_distill.cache import CacheBuilder
    from lightning_distill.losses import CrossTokenizerKD

    module = DistillationModule(lm(0), freeze(lm(1, vocab=80)), {"kd": CrossTokenizerKD()})
    try:
        CacheBuilder(str(tmp / "cache"), kind="topk").build(module, {})
    finally:
        assert not (tmp / "cache").exists()


@pytest.mark.parametrize(
    "call, error, message", [pytest.param(*row[1:], id=row[0]) for row in PYTHON_ROWS]
)
def test_python_row(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)
    assert not (tmp_path / "MARKER").exists()  # nothing in a refused file ran


# ----------------------------------------------------------------------------- command line
# (id, overrides ({tmp}: a folder holding a_file, an empty file, and cut.ckpt, a truncated checkpoint),
#  the printed message "Type: message" as a regex).
CLI_ROWS = [
    (
        "cli-embedding-loss-without-pooling",
        ["loss=embedding"],
        r"^ValueError: the loss terms \['embedding', 'rkd_distance'\] compare one embedding per sample, but no "
        r"pooling is set; add pooling=mean \(or pooling=cls\) to pool the encoders' token states \(docs/relation\.md\)\.$",
    ),
    (
        "cli-pooling-with-a-logit-loss",
        ["pooling=mean"],
        r"^ValueError: pooling=mean makes one embedding per sample, but the loss terms \['kd', 'task'\] read logits; "
        r"use an embedding loss \(loss=embedding, loss=rkd or loss=similarity_preserving\), or drop the pooling "
        r"\(pooling=null\)\.$",
    ),
    (
        "cli-embedding-loss-with-a-causal-lm",
        ["loss=rkd", "pooling=mean"],
        r"^ValueError: the teacher is a causal language model \(lightning_distill\.models\.causal_lm_from_config\), "
        r"whose output has logits but no token states to pool for embedding distillation; use an encoder without a "
        r"head: teacher=hf_encoder_pretrained teacher\.path=<model folder> \(transformers' AutoModel\), or "
        r"teacher=hf_encoder to build one from a config\.$",
    ),
    (
        "cli-embedding-loss-without-coverage",
        ["teacher=hf_encoder", "student=hf_encoder", "loss=rkd", "pooling=mean", "callbacks=none"],
        r"^ValueError: the loss terms \['rkd_distance', 'rkd_angle'\] train an embedding model, which the command "
        r"scores per slice by similarity agreement through the CoverageSlices callback, and these callbacks have "
        r"none; use callbacks=coverage_similarity \(or keep callbacks\.coverage\)\.$",
    ),
    (
        "cli-temperature-not-positive",
        ["loss.kd.temperature=0"],
        r"^ValueError: temperature must be a finite number > 0, got 0\.0\. \(config: loss\.kd\)$",
    ),
    (
        "cli-beta-outside-0-1",
        ["loss=gkd", "loss.kd.beta=1.5"],
        r"^ValueError: beta must be a finite number in \(0, 1\), got 1\.5\. .* \(config: loss\.kd\)$",
    ),
    (
        "cli-negative-weight",
        ["loss.kd.weight=-1"],
        r"^ValueError: weight must be a finite number >= 0, got -1\.0\. \(config: loss\.kd\)$",
    ),
    (
        "cli-all-weights-zero",
        ["loss.kd.weight=0", "loss.task.weight=0"],
        r"^ValueError: every loss term has weight 0 \(kd, task\); give at least one a weight > 0\.$",
    ),
    (
        "cli-unknown-divergence",
        ["loss.kd.divergence=kl"],
        r"^ValueError: unknown divergence 'kl'; choose one of \['forward_kl', .*'tvd'\]\. \(config: loss\.kd\)$",
    ),
    (
        "cli-vocabulary-mismatch",
        ["student.vocab_size=300"],
        r"^ValueError: student vocabulary \(300\) and teacher vocabulary \(320\) differ\. .*vocab_mismatch='slice'",
    ),
    (
        "cli-unknown-vocab-mismatch-policy",
        ["module.vocab_mismatch=pad"],
        r"^ValueError: vocab_mismatch must be one of \('error', 'slice'\), got 'pad'\.$",
    ),
    (
        "cli-unknown-train-slice",
        ["data.train_slices=[poetry]"],
        r"^ValueError: Unknown train_slices \['poetry'\]; this data has slices \['prose', 'code'\]\. Use names "
        r"from that list \(e\.g\. train_slices=\[prose\]\)\.$",
    ),
    (
        "cli-slice-key-no-batch-has",
        ["callbacks=coverage", "callbacks.coverage.slice_key=domain"],
        r"^ValueError: the validation batches have no slice names: no 'domain' key \(they have \['attention_mask', "
        r"'input_ids', 'labels', 'sample_id', 'slice'\]\), no slice_fn and no dataloader_names; set slice_key to the "
        r"key that names each sample's slice, or configure one of the others\. \(Checked before training\.\)$",
    ),
    (
        "cli-no-training-samples",
        ["data.max_train_samples=0"],
        r"^ValueError: max_train_samples must be >= 1, got 0\. \(config: data\)$",
    ),
    (
        "cli-sequence-longer-than-the-model",
        ["data.seq_len=64", "student.max_position_embeddings=32"],
        r"^ValueError: data seq_len=64 is longer than the student takes \(32 positions, "
        r"config\.max_position_embeddings\); .* Lower the sequence length to 32 \(data\.seq_len=32\)",
    ),
    (
        "cli-missing-model-folder",
        ["teacher=hf_pretrained", "teacher.path=/no/such/teacher"],
        r"^FileNotFoundError: no model folder at '/no/such/teacher' .* \(config: teacher\)$",
    ),
    (
        "cli-unknown-dtype",
        ["teacher.dtype=float8"],
        r"^ValueError: unknown dtype 'float8'; use one of \['bf16', 'bfloat16', 'float16', 'float32', 'fp16', "
        r"'fp32'\]\. \(config: teacher\)$",
    ),
    (
        "cli-missing-checkpoint",
        ["ckpt_path={tmp}/nope.ckpt"],
        r"^FileNotFoundError: ckpt_path='.*nope\.ckpt': no such file\. Pass an existing \.ckpt file",
    ),
    (
        "cli-corrupt-checkpoint",
        ["ckpt_path={tmp}/cut.ckpt"],
        r"^CheckpointError: .*cut\.ckpt is damaged or truncated and cannot be read as a checkpoint",
    ),
    (
        "cli-unwritable-cache-root",
        ["env:LIGHTNING_DISTILL_CACHE={tmp}/a_file/cache"],
        r"^NotWritableError: LIGHTNING_DISTILL_CACHE='.*a_file/cache' is not writable \(Not a directory\); set "
        r"LIGHTNING_DISTILL_CACHE=<a folder you can write> \(tokenizers, tokenized data and teacher targets are "
        r"kept there\), or fix its permissions\.$",
    ),
    (
        "cli-sequence-longer-than-the-model-cache-only",
        [
            "callbacks=teacher_cache_topk",
            "+build_cache_only=true",
            "data.seq_len=64",
            "teacher.max_position_embeddings=32",
        ],
        r"^ValueError: data seq_len=64 is longer than the teacher takes \(32 positions, "
        r"config\.max_position_embeddings\); .* Lower the sequence length to 32 \(data\.seq_len=32\)",
    ),
    (
        "cli-teacher-none-with-kd",
        ["teacher=none"],
        r"^ValueError: teacher=none but the loss terms \['kd'\] need a teacher; use loss=task_only\.$",
    ),
    (
        "cli-build-cache-only-without-cache",
        ["+build_cache_only=true"],
        r"^ValueError: build_cache_only=true needs a TeacherCache callback; add one, e\.g\. "
        r"callbacks=teacher_cache_sampled",
    ),
    (
        "cli-deepspeed-missing",  # (where deepspeed is installed, the engine runs instead: not this row)
        ["trainer=deepspeed_zero3"],
        r"^MissingPackageError: trainer\.strategy='lightning\.pytorch\.strategies\.DeepSpeedStrategy' needs the "
        r"'deepspeed' package, which is not installed; run `pip install deepspeed` \(on a CUDA machine\), or pick "
        r"another engine \(trainer=fsdp, trainer=ddp\)\.$",
    ),
    (
        "cli-unwritable-output-dir",
        ["output_dir={tmp}/a_file/run"],
        r"^NotWritableError: output_dir='.*a_file/run' is not writable \(Not a directory\); pass "
        r"output_dir=<a folder you can write>, or fix its permissions\.$",
    ),
]


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue_cli")
    (root / "a_file").write_text("")
    _truncated_checkpoint(root)
    return root


@pytest.mark.parametrize(
    "overrides, message", [pytest.param(*row[1:], id=row[0]) for row in CLI_ROWS]
)
def test_command_line_row(cli_root, monkeypatch, overrides, message):
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _user_error, _user_message, run

    monkeypatch.setenv(
        "LIGHTNING_DISTILL_CACHE", str(cli_root / "cache")
    )  # the tiny tokenizer, built once
    run_dir = cli_root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [o.format(tmp=cli_root) for o in overrides]
    for setting in [
        o for o in overrides if o.startswith("env:")
    ]:  # an environment variable, not an override
        monkeypatch.setenv(*setting[4:].split("=", 1))
    overrides = [o for o in overrides if not o.startswith("env:")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[*TINY, f"output_dir={run_dir}", *overrides])
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is part of the message checked below
        run(cfg)
    shown = _user_message(info.value)
    assert _user_error(info.value), (
        f"{type(info.value).__name__} would be a traceback, not exit 2: {shown}"
    )
    assert re.search(message, shown, flags=re.S), shown
    logged = "".join(p.read_text() for p in run_dir.rglob("metrics.csv"))
    assert "train/loss" not in logged, "a training step ran before the error"


def _subprocess(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")
    }
    env.update(
        LIGHTNING_DISTILL_CACHE=str(tmp_path / "cache"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_distill",
            *TINY,
            *overrides,
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_override_key_is_hydras_message():
    """Row cli-unknown-override-key: Hydra rejects the key while composing, before the command runs."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from lightning_distill.cli import CONFIG_DIR

    with (
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as info,
    ):
        compose("distill", overrides=[*TINY, "loss.kd.temprature=2"])
    shown = f"{info.value}\n{info.value.__cause__}"
    assert (
        "Could not override 'loss.kd.temprature'.\nTo append to your config use +loss.kd.temprature=2\n"
        "Key 'temprature' is not in struct"
    ) in shown, shown


@pytest.mark.slow
def test_the_command_prints_the_message_and_exits_2_or_hydras_1(tmp_path):
    """The same rows through the real command: exit 2 for the library's errors, 1 for Hydra's; no traceback."""
    result = _subprocess(tmp_path, "loss.kd.temperature=0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert (
        "Error: ValueError: temperature must be a finite number > 0, got 0.0. (config: loss.kd)\n"
        "(set LIGHTNING_DISTILL_DEBUG=1 for the traceback)"
    ) in result.stderr
    result = _subprocess(tmp_path, "loss.kd.temprature=2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert (
        "Could not override 'loss.kd.temprature'.\nTo append to your config use +loss.kd.temprature=2\n"
        "Key 'temprature' is not in struct"
    ) in result.stderr


# ----------------------------------------------------------------------------- teacher cache
class Blocks(Dataset):
    def __init__(self, n: int = 8, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.ids[i],
            "sample_id": 1000 + i,
        }


class Data(L.LightningDataModule):
    def __init__(self, tokenizer, fingerprint: str, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer, self.data_fingerprint, self.blocks = (
            tokenizer,
            fingerprint,
            Blocks(seed=seed),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks, batch_size=4)


@functools.cache
def _tokenizer(n_texts: int):
    from lightning_distill.data import train_bpe_tokenizer

    texts = [
        "def f(x):\n    return x + 1\n" * 20,
        "The quick brown fox jumps over the lazy dog. " * 20,
    ]
    return train_bpe_tokenizer(texts[:n_texts], 280, None)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalogue_cache") / "cache"
    _open_cache(folder)
    return folder


def _open_cache(
    folder: Path,
    *,
    teacher_seed: int = 1,
    tokenizer: int = 2,
    data: str = "blocks-v1",
    seed: int = 0,
) -> TeacherCache:
    cache = TeacherCache(str(folder), kind="topk", k=2, splits=["train"], progress=False)
    module = DistillationModule(lm(0), freeze(lm(teacher_seed)), kd_task())
    cache.prepare(module, Data(_tokenizer(tokenizer), data, seed=seed))
    return cache


def _old_format(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "cache.json").read_text())
    manifest["fingerprint"]["format"] = 1
    (copy / "cache.json").write_text(json.dumps(manifest))
    return copy


def _changed_tokens(folder: Path) -> None:
    cache = _open_cache(folder)
    ids = Blocks().ids[:2].clone()
    ids[1, 3] = (ids[1, 3] + 1) % VOCAB
    cache.readers["train"].read(torch.tensor([1000, 1001]), (2, SEQ), "cpu", input_ids=ids)


def _pickled_shard(folder: Path, tmp_path: Path) -> None:
    """A pickle put where a shard goes, with the index's checksum updated to match (as an attacker would)."""
    from lightning_distill.cache.storage import sha256_bytes

    copy = tmp_path / "evil"
    shutil.copytree(folder, copy)
    index_path = copy / "train" / "index.json"
    index = json.loads(index_path.read_text())
    shard = copy / "train" / "shards" / index["shards"][0]["file"]
    shard.write_bytes(pickle.dumps(_Payload(tmp_path / "MARKER")))
    index["shards"][0]["sha256"] = sha256_bytes(shard.read_bytes())
    index_path.write_text(json.dumps(index))
    cache = _open_cache(copy)
    cache.readers["train"].read(torch.tensor([1000]), (1, SEQ), "cpu")


CACHE_ROWS = [
    (
        "cache-of-another-teacher",
        lambda f, p: _open_cache(f, teacher_seed=7),
        CacheMismatchError,
        r"^the teacher cache at .* was built for something else, so it is not used:\n  - teacher: cache has "
        r"\{.*\"weights_sha256\": .*\}, this run has \{.*\}\nRebuild it: delete that folder, point "
        r"TeacherCache\(dirpath=\.\.\.\) at a new one, or pass on_mismatch='rebuild'",
    ),
    (
        "cache-of-another-tokenizer",
        lambda f, p: _open_cache(f, tokenizer=1),
        CacheMismatchError,
        r"was built for something else, so it is not used:\n  - tokenizer: cache has \"[0-9a-f]+\", this run has "
        r"\"[0-9a-f]+\"\nRebuild it",
    ),
    (
        "cache-of-other-data",
        lambda f, p: _open_cache(f, data="blocks-v2"),
        CacheMismatchError,
        r"was built for something else, so it is not used:\n  - data: cache has \"blocks-v1\", this run has "
        r"\"blocks-v2\"\nRebuild it",
    ),
    (
        "cache-of-another-format-version",
        lambda f, p: _open_cache(_old_format(f, p)),
        CacheMismatchError,
        r"was built for something else, so it is not used:\n  - format: cache has 1, this run has \d+\nRebuild it",
    ),
    (
        "cache-data-changed-under-the-same-ids",
        lambda f, p: _changed_tokens(f),
        CacheMismatchError,
        r"^sample ids \[1001\] \(train\) now hold other tokens than when the teacher cache at .* was built: the data "
        r"changed under the same ids\. Rebuild the cache",
    ),
    (
        "pickled-cache-shard",
        _pickled_shard,
        CacheCorruptedError,
        r"^cache shard .*\.safetensors cannot be read \(.*\)\. Delete that file \(and nothing else\): the next run "
        r"with this cache rebuilds just its samples\.$",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", [pytest.param(*row[1:], id=row[0]) for row in CACHE_ROWS]
)
def test_teacher_cache_row(built_cache, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(built_cache, tmp_path)
    assert not (tmp_path / "MARKER").exists()


# ----------------------------------------------------------------------------- the table
ROW_IDS = (
    [row[0] for row in PYTHON_ROWS]
    + [row[0] for row in CLI_ROWS]
    + ["cli-unknown-override-key"]
    + [row[0] for row in CACHE_ROWS]
)


def test_the_table_lists_every_row():
    """docs/errors.md names each row by its id (`row-id`), once, and no id that has no test here."""
    documented = re.findall(r"^\| `([A-Za-z0-9-]+)` \|", DOC.read_text(), flags=re.M)
    assert sorted(documented) == sorted(set(documented)), "a row id appears twice in docs/errors.md"
    assert set(documented) == set(ROW_IDS), (
        set(ROW_IDS) - set(documented),
        set(documented) - set(ROW_IDS),
    )
    assert len(ROW_IDS) >= 20
