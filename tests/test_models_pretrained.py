"""Pretrained models: load_pretrained options, students cut from the teacher, teacher identity
across save/load (the cache is reused), and the exported student loading back and generating."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.cache import CacheMismatchError, cache_fingerprint, check_fingerprint
from lightning_distill.callbacks import TeacherCache
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import (
    causal_lm_from_config,
    describe_model,
    load_pretrained,
    random_init_like,
    select_layers,
    student_from_teacher,
)

VOCAB, SEQ = 64, 8


def tiny(model_type: str = "llama", layers: int = 4, seed: int = 1, **over) -> torch.nn.Module:
    if model_type == "gpt2":
        cfg = dict(n_embd=16, n_layer=layers, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    else:
        cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=32)
    return causal_lm_from_config(model_type, vocab_size=VOCAB, seed=seed, **{**cfg, **over}).eval()


def ids(n: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))


class Blocks(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.ids[i], "sample_id": i, "slice": "a"}


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Blocks(), batch_size=4)


def fit(student, teacher, callbacks=(), steps: int = 2) -> DistillationModule:
    module = DistillationModule(student, teacher, {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=Data())
    return module


# ----------------------------------------------------------------------------- load_pretrained
def test_load_pretrained_dtype_and_attention(tmp_path):
    tiny().save_pretrained(tmp_path / "t")
    model = load_pretrained(tmp_path / "t", dtype="bf16", attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in load_pretrained(str(tmp_path / "t")).parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_pretrained(tmp_path / "t", dtype="float8")


def test_load_pretrained_names_a_missing_local_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no model folder at .*no-such-model"):
        load_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="no model folder at './nope'"):
        load_pretrained("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="trust_remote_code must be true or false"):
        load_pretrained(tmp_path / "empty", trust_remote_code="yes")


def test_remote_code_is_not_run_by_default(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "ld_custom_test", "architectures": ["Custom"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.Custom"}}))
    code = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n" \
           "class CustomConfig(PretrainedConfig):\n    model_type = 'ld_custom_test'\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained(folder, local_files_only=True)
    assert not marker.exists()


def test_bf16_teacher_and_fp32_student_train(tmp_path):
    tiny().save_pretrained(tmp_path / "t")
    teacher = load_pretrained(tmp_path / "t", dtype="bfloat16")
    student = tiny(layers=1, seed=0).train()
    before = [p.detach().clone() for p in student.parameters()]
    module = fit(student, teacher)
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    assert module.teacher_identity["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- from_teacher
def test_select_layers():
    assert select_layers("every_other", 5) == [0, 2, 4]
    assert select_layers("first_k", 6, k=2) == [0, 1]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers([0, 5, 11], 12) == [0, 5, 11]
    with pytest.raises(ValueError, match="needs k between 1 and the teacher's 6"):
        select_layers("first_k", 6)
    with pytest.raises(ValueError, match=r"layers \[12\] do not exist: the teacher has layers 0..11"):
        select_layers([0, 12], 12)
    with pytest.raises(ValueError, match="strictly increasing"):
        select_layers([3, 1], 12)
    with pytest.raises(ValueError, match="'half' is not a layer choice"):
        select_layers("half", 12)
    with pytest.raises(ValueError, match="non-empty list of ints"):
        select_layers([], 12)


@pytest.mark.parametrize("model_type, prefix", [("llama", "model.layers"), ("qwen2", "model.layers"),
                                                ("gpt2", "transformer.h")])
def test_student_with_all_layers_computes_the_teachers_logits(model_type, prefix):
    teacher = tiny(model_type)
    student = student_from_teacher(teacher, layers="all").eval()
    with torch.no_grad():
        torch.testing.assert_close(student(ids()).logits, teacher(ids()).logits)
    assert student is not teacher and not any(
        a.data_ptr() == b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layers, k, kept", [("every_other", None, [0, 2]), ("first_k", 3, [0, 1, 2]),
                                             ([1, 3], None, [1, 3])])
def test_kept_layers_are_copies_of_the_teachers(model_type, layers, k, kept):
    teacher = tiny(model_type)
    student = student_from_teacher(teacher, layers=layers, k=k)
    prefix = "transformer.h" if model_type == "gpt2" else "model.layers"
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert len(student.get_submodule(prefix)) == len(kept)
    for key, value in s_state.items():
        if key.startswith(prefix + "."):
            _, rest = key[len(prefix) + 1:].split(".", 1)
            source = f"{prefix}.{kept[int(key[len(prefix) + 1:].split('.')[0])]}.{rest}"
        else:  # embeddings, final norm, head
            source = key
        assert torch.equal(value, t_state[source]), key
    derived = student.config.derived_from_teacher
    assert derived["layers"] == kept and derived["teacher_layers"] == 4
    assert describe_model(student)["derived_from_teacher"]["layers"] == kept


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("selection", ["first", "norm"])
def test_narrow_mlp_keeps_rows_and_columns_of_the_chosen_neurons(model_type, selection):
    teacher = tiny(model_type)
    student = student_from_teacher(teacher, layers=[0, 3], intermediate_size=8, mlp_selection=selection)
    if model_type == "llama":
        up, gate, down = (teacher.model.layers[3].mlp.up_proj.weight, teacher.model.layers[3].mlp.gate_proj.weight,
                          teacher.model.layers[3].mlp.down_proj.weight)
        score = up.pow(2).sum(1) + gate.pow(2).sum(1) + down.pow(2).sum(0)
        s_mlp = student.model.layers[1].mlp
        assert s_mlp.up_proj.weight.shape == (8, 16) and s_mlp.down_proj.weight.shape == (16, 8)
    else:
        up, down = teacher.transformer.h[3].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_proj.weight  # Conv1D
        score = up.pow(2).sum(0) + teacher.transformer.h[3].mlp.c_fc.bias.pow(2) + down.pow(2).sum(1)
        s_mlp = student.transformer.h[1].mlp
        assert s_mlp.c_fc.weight.shape == (16, 8) and s_mlp.c_proj.weight.shape == (8, 16)
    keep = torch.arange(8) if selection == "first" else torch.topk(score, 8).indices.sort().values
    if selection == "norm":
        assert not torch.equal(keep, torch.arange(8))  # the test tells the two selections apart
    if model_type == "llama":
        assert torch.equal(s_mlp.up_proj.weight, up[keep]) and torch.equal(s_mlp.down_proj.weight, down[:, keep])
    else:
        assert torch.equal(s_mlp.c_fc.weight, up[:, keep]) and torch.equal(s_mlp.c_proj.weight, down[keep])
    assert student.config.derived_from_teacher["intermediate_size"] == 8
    assert student(ids()).logits.shape == (2, SEQ, VOCAB)


def test_from_teacher_student_is_fp32_from_a_bf16_teacher_and_its_baseline_is_random():
    teacher = tiny().to(torch.bfloat16)
    student = student_from_teacher(teacher, layers="every_other")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight.float())
    fresh = random_init_like(student, seed=0)
    assert type(fresh) is type(student) and fresh.config.num_hidden_layers == 2
    assert not torch.equal(fresh.model.embed_tokens.weight, student.model.embed_tokens.weight)


def test_from_teacher_errors():
    teacher = tiny()
    with pytest.raises(ValueError, match="needs a teacher"):
        student_from_teacher(None)
    with pytest.raises(TypeError, match="Hugging Face PreTrainedModel teacher, got Linear"):
        student_from_teacher(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"intermediate_size must be an int in \[1, 32\], got 64. \(At most the teacher's 32.\)"):
        student_from_teacher(teacher, intermediate_size=64)
    with pytest.raises(ValueError, match="mlp_selection='random' is not one of"):
        student_from_teacher(teacher, mlp_selection="random")
    with pytest.raises(ValueError, match=r"layers \[4\] do not exist"):
        student_from_teacher(teacher, layers=[0, 4])

    class Wrapped(type(teacher)):  # an HF model without model.layers / transformer.h
        pass

    odd = Wrapped(teacher.config)
    odd.model.decoder_blocks = odd.model.layers
    del odd.model.layers
    with pytest.raises(ValueError, match="does not know where Wrapped keeps its layers"):
        student_from_teacher(odd)


# ----------------------------------------------------------------------------- identity and caches
def test_identity_ignores_where_the_teacher_was_loaded_from(tmp_path):
    teacher = tiny()
    teacher.save_pretrained(tmp_path / "t")
    loaded = load_pretrained(tmp_path / "t")
    a, b = describe_model(teacher), describe_model(loaded)
    assert a["name_or_path"] is None and b["name_or_path"] == str(tmp_path / "t")  # kept, for people
    assert cache_fingerprint(teacher=a, tokenizer=None, data=None, kind="topk", params={}) == \
        cache_fingerprint(teacher=b, tokenizer=None, data=None, kind="topk", params={})
    # Another teacher is refused, and the message lists only what differs, in full.
    other = describe_model(tiny(seed=2))
    with pytest.raises(CacheMismatchError) as err:
        check_fingerprint(cache_fingerprint(teacher=a, tokenizer=None, data=None, kind="topk", params={}),
                          cache_fingerprint(teacher=other, tokenizer=None, data=None, kind="topk", params={}),
                          where="/c")
    message = str(err.value)
    assert f'cache has {{"weights_sha256": "{a["weights_sha256"]}"}}' in message
    assert f'this run has {{"weights_sha256": "{other["weights_sha256"]}"}}' in message
    assert "name_or_path" not in message and "num_parameters" not in message
    # A bf16 copy of the same weights computes something else.
    half = describe_model(tiny().to(torch.bfloat16))
    assert half["dtype"] == "bfloat16" and half["config_sha256"] == a["config_sha256"]
    assert half["weights_sha256"] != a["weights_sha256"]


def test_identity_of_unhashed_weights_falls_back_to_name_and_revision():
    ident = {"class": "T", "weights_sha256": None, "name_or_path": "org/big", "revision": "abc"}
    fp = cache_fingerprint(teacher=ident, tokenizer=None, data=None, kind="topk", params={})
    assert fp["teacher"]["name_or_path"] == "org/big" and fp["teacher"]["revision"] == "abc"


def test_cache_is_reused_when_the_teacher_is_loaded_back_from_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "root"))
    teacher = tiny(layers=2)
    first = TeacherCache(kind="topk", k=4, splits=["train"], progress=False)  # the default dirpath
    fit(tiny(layers=1, seed=0).train(), teacher, [first])
    assert first.built == {"train": 16}
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = load_pretrained(tmp_path / "teacher")
    second = TeacherCache(kind="topk", k=4, splits=["train"], progress=False)
    fit(tiny(layers=1, seed=0).train(), loaded, [second])
    assert second.built == {"train": 0}
    assert [p.name for p in (tmp_path / "root" / "teacher_targets").iterdir()] == \
        [Path(first.storage.url).name]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_cut_student_is_exported_with_its_tokenizer_and_generates(tmp_path, monkeypatch):
    """student=from_teacher through the CLI: trained, baseline of the same cut architecture, exported
    with the tokenizer it was trained with; loads back with the Auto classes and generates."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_distill.cli import CONFIG_DIR, _instantiate, run

    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[
            "experiment=tiny", "student=from_teacher", "teacher.num_hidden_layers=4", "student.layers=[0,3]",
            "student.intermediate_size=64", "baseline=true", "logger=none", f"output_dir={tmp_path / 'run'}"])
    report = run(cfg)
    assert set(report["baseline"]) == {"prose", "code"}
    folder = Path(report["student_dir"])
    card = json.loads((folder / "distillation_card.json").read_text())
    assert card["student"]["derived_from_teacher"]["layers"] == [0, 3]
    record = json.loads((folder / "distillation.json").read_text())
    assert record["student"]["derived_from_teacher"]["teacher_layers"] == 4
    assert "layers [0, 3] of 4, MLP 128 -> 64" in (folder / "distillation_card.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 64
    assert model.config.derived_from_teacher["layers"] == [0, 3]
    assert len(tok) == model.config.vocab_size == 320
    data = _instantiate(cfg.data)
    data.prepare_data()
    assert tok.get_vocab() == data.tokenizer.get_vocab()  # the tokenizer it was trained with
    prompt = tok("def f(x):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    assert isinstance(tok.decode(out[0]), str)


def test_mismatch_lists_only_differing_fields_in_full():
    params = {f"p{i}": i for i in range(40)}
    long_value = "x" * 300
    stored = cache_fingerprint(teacher={"class": "T", "weights_sha256": "aa"}, tokenizer=None, data=None,
                               kind="topk", params={**params, "hidden_layers": long_value})
    current = cache_fingerprint(teacher={"class": "T", "weights_sha256": "aa"}, tokenizer=None, data=None,
                                kind="topk", params={**params, "hidden_layers": long_value + "y"})
    with pytest.raises(CacheMismatchError) as err:
        check_fingerprint(stored, current, where="/c")
    line = next(ln for ln in str(err.value).splitlines() if ln.startswith("  - params:"))
    assert line == (f'  - params: cache has {{"hidden_layers": "{long_value}"}}, '
                    f'this run has {{"hidden_layers": "{long_value}y"}}')
