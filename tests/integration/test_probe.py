"""The gate's load-and-generate probe (training_checks.probe_checkpoint) refuses a checkpoint that answers with
nothing: a model whose first generated token is EOS loads and "generates", yet its answer is the empty string.

The broken checkpoint is the tiny model with its output row for EOS pointed at the probe prompt's last hidden
state, so greedy decoding ends the answer at once (what the demo SFT final did with lr 2e-3 on 4 rows).
Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/test_probe.py -q
"""
from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from pipeline import models
from pipeline import training_checks as tc
from pipeline.variants import Variants


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build_tiny(tmp_path_factory.getbasetemp() / "medllm-cache" / "tiny-seed0")


def _probe_ids(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": tc.PROBE_PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _answers_with(tiny, folder, token_id: int):
    """A copy of the tiny model (untied output layer) whose greedy first token on the probe prompt is token_id."""
    import torch
    shutil.copytree(tiny, folder)
    model, tok = models.load_model(folder, dict(tc.CPU_PLAN)), models.load_tokenizer(folder)
    with torch.no_grad():
        out = model(input_ids=_probe_ids(tok), output_hidden_states=True)
        h, top = out.hidden_states[-1][0, -1], float(out.logits[0, -1].max())
        model.config.tie_word_embeddings = False
        weight = model.lm_head.weight.detach().clone()
        weight[token_id] = (top + 50.0) * h / h.dot(h)     # its logit: top + 50, the others unchanged
        model.lm_head.weight = torch.nn.Parameter(weight)
        assert int(model(input_ids=_probe_ids(tok)).logits[0, -1].argmax()) == token_id
    model.save_pretrained(folder)
    return tok


def test_a_checkpoint_whose_answer_is_only_eos_fails_the_probe(tiny, tmp_path):
    tok = _answers_with(tiny, tmp_path / "eos_first", models.load_tokenizer(tiny).eos_token_id)
    with Variants(None, dict(tc.CPU_PLAN)) as vs:
        ok, detail = tc.probe_checkpoint(vs, str(tmp_path / "eos_first"), tmp_path / "eos_first")
    assert ok is False, detail
    assert tok.eos_token in detail and "no visible text" in detail


def test_the_unbroken_model_passes_the_probe_with_visible_text(tiny):
    with Variants(None, dict(tc.CPU_PLAN)) as vs:
        ok, text = tc.probe_checkpoint(vs, str(tiny), tiny)
    tok = models.load_tokenizer(tiny)
    assert ok is True, text
    visible = tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()
    assert visible
