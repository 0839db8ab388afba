"""GGUF -> directory round trip: identical weights and tokenizer, and transformers can read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmopt.cli.main import main
from llmopt.loading.loader import load_model
from llmopt.loading.resolve import known_model_gguf


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from llmopt.errors import UserError

    try:
        return known_model_gguf("smollm2-135m")
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "smollm2"
    assert main(["convert", str(gguf_path), "--out", str(out)]) == 0
    return out


def test_round_trip_identical(gguf_path: Path, converted: Path) -> None:
    direct = load_model(str(gguf_path), device="cpu", progress=False)
    back = load_model(str(converted), device="cpu", progress=False)
    assert direct.config == back.config
    sd_a, sd_b = direct.model.state_dict(), back.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    text = "Round trip: 2024 😀 naïve\n<|im_start|>user"
    assert direct.tokenizer.encode(text) == back.tokenizer.encode(text)
    assert direct.tokenizer.chat_template == back.tokenizer.chat_template
    assert direct.tokenizer.eos_token_ids == back.tokenizer.eos_token_ids


def test_transformers_reads_converted_dir(converted: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    ours = load_model(str(converted), device="cpu", progress=False)
    text = "Pride and prejudice"
    ids = ours.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids
    with torch.no_grad():
        diff = (hf(torch.tensor([ids])).logits - ours.model(torch.tensor([ids]))).abs().max().item()
    assert diff <= 1e-4
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]


def test_convert_refuses_non_empty_out(capsys, gguf_path: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    rc = main(["convert", str(gguf_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err
    assert (tmp_path / "keep.txt").read_text() == "user data"
