"""Embedding distillation from the command line (docs/relation.md): the `pooling` config group, the
encoder configs, the checks before any work, the similarity report and the exported student's pooling."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_distill.callbacks import CoverageSlices
from lightning_distill.cli import (
    CONFIG_DIR,
    _build_losses,
    _build_module,
    _instantiate,
    _make_trainer,
)
from lightning_distill.embedding_cli import (
    check_embedding_models,
    embedding_settings,
    pooling_record,
)
from lightning_distill.export import card_markdown
from lightning_distill.losses import EmbeddingKD
from lightning_distill.models import Pooling, causal_lm_from_config, encoder_from_config, freeze

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=32,
)


def _compose(*overrides: str, out: str = "/tmp/ld-compose"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[*overrides, f"output_dir={out}"])


def test_the_pooling_group_is_off_by_default_and_builds_the_modules_output_function():
    assert _compose().get("pooling") is None
    cfg = _compose(
        "teacher=hf_encoder",
        "student=hf_encoder",
        "loss=embedding",
        "pooling=cls",
        "data.vocab_size=40",
        "data.seq_len=32",
    )
    losses = _build_losses(cfg.loss)
    pooling = embedding_settings(cfg, losses)
    assert isinstance(pooling, Pooling) and pooling.mode == "cls"
    assert cfg.callbacks.coverage.metric == "similarity"  # switched from the default perplexity
    module = _build_module(
        cfg, _instantiate(cfg.student), freeze(_instantiate(cfg.teacher)), losses, pooling=pooling
    )
    assert (
        module.student_logits_fn is pooling
        and module.teacher_logits_fn is pooling
        and module.embedding_output
    )
    emb = module.losses["embedding"]
    assert (emb.student_dim, emb.teacher_dim) == (32, 64) and emb.projector_layer.weight.shape == (
        64,
        32,
    )
    assert pooling_record(module)["mode"] == "cls"
    coverage = [
        c
        for c in _make_trainer(cfg, Path("/tmp/ld-compose")).callbacks
        if isinstance(c, CoverageSlices)
    ]
    assert [c.metric for c in coverage] == ["similarity"]


def test_coverage_similarity_and_the_encoder_pretrained_configs_compose():
    cfg = _compose(
        "callbacks=coverage_similarity",
        "teacher=hf_encoder_pretrained",
        "teacher.path=/x",
        "student=hf_encoder_pretrained",
        "student.path=/y",
        "loss=rkd",
        "pooling=mean",
    )
    assert (
        cfg.callbacks.coverage.metric == "similarity"
        and cfg.callbacks.coverage.min_retention == 0.5
    )
    assert (
        cfg.teacher._target_
        == cfg.student._target_
        == "lightning_distill.models.load_pretrained_encoder"
    )
    assert (cfg.student.path, cfg.student.trust_remote_code) == ("/y", False)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_embedding_kd_reads_a_missing_width_from_its_model():
    student, teacher = (
        encoder_from_config("bert", **SMALL),
        encoder_from_config("bert", **{**SMALL, "hidden_size": 24}),
    )
    term = EmbeddingKD(
        student_dim=16
    )  # the teacher's width (pretrained: not in the config) from its model
    term.bind(student, teacher)
    assert (term.student_dim, term.teacher_dim) == (
        16,
        24,
    ) and term.projector_layer.weight.shape == (24, 16)
    both = EmbeddingKD()
    both.bind(student, teacher)
    assert (
        both.config()["teacher_dim"] == 24
    )  # recorded, so load_from_checkpoint rebuilds the projector
    same = EmbeddingKD()
    same.bind(student, encoder_from_config("bert", **SMALL))
    assert same.projector_layer is None


def test_a_language_model_head_is_refused_in_an_embedding_run():
    with pytest.raises(
        ValueError,
        match=r"teacher is a causal language model \(LlamaForCausalLM\).*teacher=hf_encoder_pretrained",
    ):
        check_embedding_models(
            encoder_from_config("bert", **SMALL),
            causal_lm_from_config("llama", **{**SMALL, "num_key_value_heads": 2}),
        )
    check_embedding_models(
        encoder_from_config("bert", **SMALL), encoder_from_config("bert", **SMALL)
    )


def test_the_card_says_how_to_embed_with_the_student():
    card = {
        "losses": {},
        "pooling": {"type": "Pooling", "mode": "mean", "normalize": True},
        "coverage": {"metric": "similarity", "gaps": []},
        "data": {
            "slices": [
                {
                    "slice": "prose",
                    "train_samples": 7,
                    "pairs": 45,
                    "retention": 0.8123,
                    "gap": False,
                }
            ]
        },
    }
    text = card_markdown(card)
    assert "- embeddings: `Pooling(mode='mean', normalize=True)`" in text
    assert "| prose | 7 | 45 | 0.812 |  |" in text


# ----------------------------------------------------------------------------- end to end
def _encoder_and_sentences(root: Path) -> tuple[Path, Path]:
    """A tiny BERT teacher with its word-level tokenizer, and a JSONL file of sentences in two slices."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = {
        "prose": "the a cat dog sat ran on under mat house quick brown fox jumps over lazy".split(),
        "code": "def return if else for in range print x y z self import class".split(),
    }
    rows = [
        {"text": " ".join(rng.choice(words[s]) for _ in range(rng.randint(4, 10))), "source": s}
        for s in ("prose", "code")
        for _ in range(100)
    ]
    data = root / "sentences.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [r["text"] for r in rows],
        trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    teacher = encoder_from_config(
        "bert", **{**SMALL, "vocab_size": len(fast), "hidden_size": 24}, seed=3
    )
    teacher.save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    return root / "teacher", data


def _overrides(teacher: Path, data: Path, out: Path) -> list[str]:
    return [
        "teacher=hf_encoder_pretrained",
        f"teacher.path={teacher}",
        "student=hf_encoder",
        "student.hidden_size=16",
        "student.intermediate_size=32",
        "pooling=mean",
        "data=files",
        f"data.files={data}",
        "data.slice_field=source",
        "data.packing=false",
        "data.seq_len=16",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "data.batch_size=16",
        "trainer=smoke",
        "trainer.max_steps=4",
        "logger=none",
        f"output_dir={out}",
    ]


@pytest.mark.slow
def test_the_command_distils_a_saved_encoder_on_jsonl_sentences(tmp_path):
    """lightning-distill on a user's saved BERT teacher and JSONL sentences with a slice field: per-slice
    similarity agreement, no language-model baseline, the student exported with its pooling."""
    from transformers import AutoModel, AutoTokenizer

    teacher, data = _encoder_and_sentences(tmp_path)
    env = {
        **os.environ,
        "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_distill",
            "loss=embedding",
            "loss.embedding.projector_export=save",
            *_overrides(teacher, data, out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (
        "baseline skipped" in result.stdout and "similarity agreement (Spearman)" in result.stdout
    )
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["metric"] == "similarity"
    rows = {r["slice"]: r for r in coverage["slices"]}
    assert set(rows) == {"prose", "code"}
    assert all(-1.0 <= r["retention"] <= 1.0 and r["pairs"] > 0 for r in rows.values())
    report = json.loads((out / "report.json").read_text())
    assert "skipped" in report["baseline"] and set(report["slices"]) == {"prose", "code"}
    student_dir = out / "student"
    record = json.loads((student_dir / "distillation.json").read_text())
    assert record["pooling"]["mode"] == "mean" and record["config"]["pooling"]["mode"] == "mean"
    assert record["extras"]["embedding_projector"]["shapes"]["weight"] == [24, 16]
    assert (
        "Pooling(mode='mean', normalize=False)"
        in (student_dir / "distillation_card.md").read_text()
    )
    # The user embeds with the exported files alone, as the card says.
    model, tok = (
        AutoModel.from_pretrained(student_dir).eval(),
        AutoTokenizer.from_pretrained(student_dir),
    )
    batch = tok(
        ["the cat sat on the mat", "def f ( x ) : return x"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        embeddings = Pooling(record["pooling"]["mode"])(model(**batch), batch)
    assert embeddings.shape == (2, 16) and torch.isfinite(embeddings).all()


@pytest.mark.slow
def test_rkd_from_the_command_line_with_a_saved_student_in_process(tmp_path, monkeypatch):
    """loss=rkd with both encoders from folders (student=hf_encoder_pretrained), as docs/relation.md shows."""
    from lightning_distill.cli import run

    teacher, data = _encoder_and_sentences(tmp_path)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    encoder_from_config(
        "bert", **{**SMALL, "vocab_size": vocab, "hidden_size": 8}, seed=5
    ).save_pretrained(tmp_path / "student")
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    overrides = [
        o for o in _overrides(teacher, data, tmp_path / "run") if not o.startswith("student")
    ]
    cfg = _compose("loss=rkd", *overrides, "student=hf_encoder_pretrained", f"student.path={tmp_path / 'student'}",
                   out=str(tmp_path / "run"))  # fmt: skip
    report = run(cfg)
    assert report["coverage"]["metric"] == "similarity"
    assert {r["slice"] for r in report["coverage"]["slices"]} == {"prose", "code"}
    assert "similarity agreement (Spearman)" in (tmp_path / "run" / "report.md").read_text()
    record = json.loads((Path(report["student_dir"]) / "distillation.json").read_text())
    assert record["pooling"]["mode"] == "mean" and record["student"]["class"].endswith("BertModel")


TINY_DEMO = ["experiment=demo_embedding", "data.max_per_slice=80", "data.code_bytes=20000", "data.vocab_size=300",
             "data.seq_len=32", "data.batch_size=16", "data.val_fraction=0.2", "data.test_fraction=0.2",
             "teacher.steps=3", "teacher.batch_size=16", "teacher.model.hidden_size=16",
             "teacher.model.intermediate_size=32", "teacher.model.num_hidden_layers=1",
             "teacher.model.num_attention_heads=2", "student.hidden_size=8", "student.intermediate_size=16",
             "student.num_hidden_layers=1", "trainer=smoke", "trainer.max_steps=4", "logger=none"]  # fmt: skip


def test_the_embedding_demo_composes_to_encoders_sentences_and_similarity():
    cfg = _compose("experiment=demo_embedding")
    assert cfg.data._target_ == "lightning_distill.data.SentenceDataModule"
    assert cfg.teacher._target_ == "lightning_distill.demo_embedding.demo_encoder_teacher"
    assert cfg.student._target_ == "lightning_distill.models.encoder_from_config"
    assert cfg.pooling.mode == "mean" and cfg.teacher.pooling == "mean"
    assert cfg.callbacks.coverage.metric == "similarity" and not cfg.baseline
    assert set(cfg.loss) == {"embedding", "rkd_distance", "sp"}
    assert (cfg.loss.embedding.student_dim, cfg.loss.embedding.teacher_dim) == (32, 64)
    assert _compose("experiment=demo_embedding", "pooling=cls").teacher.pooling == "cls"


def test_sentences_are_cut_from_the_demo_corpus_one_sample_each(tmp_path):
    from lightning_distill.data import SentenceDataModule, sentence_pools

    pools = sentence_pools(code_bytes=20_000)
    assert pools["prose"] and all(40 <= len(s) <= 240 for s in pools["prose"])
    assert all(25 <= len(s) <= 120 and s == s.strip() for s in pools["code"])
    data = SentenceDataModule(
        vocab_size=300,
        seq_len=32,
        max_per_slice=40,
        code_bytes=20_000,
        batch_size=8,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=str(tmp_path),
        progress=False,
    )
    data.prepare_data()
    data.setup("fit")
    assert data.slices == ["code", "prose"] and len(data.tokenizer) == 300
    total = sum(
        c.samples for split in ("train", "val", "test") for c in data.slice_counts(split).values()
    )
    assert total == 80  # 40 items per slice, one sample each
    batch = next(iter(data.train_dataloader()))
    assert (
        batch["input_ids"].shape[0] == 8
        and batch["attention_mask"].shape == batch["input_ids"].shape
    )
    texts = {
        r["text"]
        for r in map(json.loads, next(tmp_path.glob("sentences-*.jsonl")).read_text().splitlines())
    }
    first = data.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert any(
        t.startswith(first) for t in texts
    )  # one sentence from its start (cut at seq_len), nothing packed


@pytest.mark.slow
def test_the_embedding_demo_runs_from_the_command_line(tmp_path, monkeypatch):
    """experiment=demo_embedding, tiny: the contrastive teacher is trained once and cached, the student
    distilled, the report per slice by similarity agreement, the pooling in the exported card."""
    from lightning_distill.cli import run

    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    report = run(_compose(*TINY_DEMO, out=str(tmp_path / "run")))
    teachers = list((tmp_path / "cache" / "teachers").glob("*/config.json"))
    assert (
        len(teachers) == 1
        and json.loads((teachers[0].parent / "training.json").read_text())["training"]["objective"]
        == "contrastive"
    )
    rows = {r["slice"]: r for r in report["coverage"]["slices"]}
    assert set(rows) == {"code", "prose"} and all(r["pairs"] > 0 for r in rows.values())
    assert "baseline" not in report  # baseline=false in the experiment
    card = (Path(report["student_dir"]) / "distillation_card.md").read_text()
    assert "Pooling(mode='mean', normalize=False)" in card and "similarity agreement" in card
    again = run(
        _compose(*TINY_DEMO, out=str(tmp_path / "run2"))
    )  # the cached teacher, not a new one

    def teacher_of(r):
        return json.loads((Path(r["student_dir"]) / "distillation.json").read_text())["teacher"][
            "weights_sha256"
        ]

    assert teacher_of(again) == teacher_of(report)
    # The run is seeded before its loss terms are built (the projector's initial weights): a second
    # run in the same process gives the same student and the same numbers.
    again_rows = {r["slice"]: r for r in again["coverage"]["slices"]}
    assert {s: r["retention"] for s, r in again_rows.items()} == {s: r["retention"] for s, r in rows.items()}
    assert len(list((tmp_path / "cache" / "teachers").glob("*/config.json"))) == 1
