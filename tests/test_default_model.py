"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

from llmopt.loading.loader import load_model
from llmopt.loading.resolve import known_model_gguf
from llmopt.sampling import SamplingParams

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ours(default_model_dir: str):
    return load_model(default_model_dir, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def hf_pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = known_model_gguf("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def test_tokenizer_matches_transformers(ours, hf_pair) -> None:
    _, tok = hf_pair
    text = "Hello world! In 2024, 12345 apples cost $3.50 — café, naïve, 😀.\n\n  Indented\tline"
    assert ours.tokenizer.encode(text) == tok(text)["input_ids"]
    assert ours.tokenizer.decode(tok(text)["input_ids"]) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)


def test_next_token_logits_match(ours, hf_pair) -> None:
    hf, _ = hf_pair
    ids = torch.tensor([ours.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
        got = ours.model(ids)[0, -1]
    assert (got - ref).abs().max().item() <= 1e-3


def test_greedy_32_tokens_match(ours, hf_pair) -> None:
    hf, _ = hf_pair
    from llmopt.engine.generate import Generator

    prompt_ids = ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    gen = Generator(ours.model, ours.tokenizer, torch.device("cpu"))
    out = gen.generate([prompt_ids], SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert "Paris" in out.text


def test_chat_template_matches_transformers(ours, hf_pair) -> None:
    _, tok = hf_pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ref = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.tokenizer.apply_chat_template(messages) == ref
    user_only = [{"role": "user", "content": "Hi"}]
    assert ours.tokenizer.apply_chat_template(user_only) == tok.apply_chat_template(
        user_only, tokenize=False, add_generation_prompt=True)
