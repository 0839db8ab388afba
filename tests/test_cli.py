"""The CLI end to end, and one clear line with exit code 2 for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt.cli.main import main
from llmopt.loading.resolve import known_model_gguf


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_generate_json(capsys, default_model_dir: str) -> None:
    rc, out, _ = run_cli(capsys, "generate", "--model", default_model_dir, "--prompt",
                         "The capital of France is", "--max-new-tokens", "12", "--temperature", "0",
                         "--json")
    assert rc == 0
    obj = json.loads(out)
    assert "Paris" in obj["text"]
    assert len(obj["token_ids"]) <= 12 and obj["finish_reason"] in ("stop", "length")
    assert obj["stats"]["prompt_tokens"] == 5 and obj["stats"]["new_tokens"] == len(obj["token_ids"])


def test_generate_streams_then_stats(capsys, default_model_dir: str) -> None:
    rc, out, err = run_cli(capsys, "generate", "--model", default_model_dir, "--prompt",
                           "What is 2+2?", "--chat", "--system", "Answer briefly.",
                           "--max-new-tokens", "16", "--temperature", "0")
    assert rc == 0
    assert out.strip()
    assert "tok/s" in err and "time to first token" in err


def test_console_script_default_model() -> None:
    """The README's demo command, through the installed console script."""
    exe = shutil.which("llmopt")
    if exe is None:
        pytest.skip("llmopt console script not installed")
    proc = subprocess.run([exe, "generate", "--prompt", "The capital of France is",
                           "--max-new-tokens", "8", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.01"], "top-p"),
    (["--top-k", "-3"], "top-k"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "/no/such/model"], "not found"),
])
def test_bad_options(capsys, args: list[str], needle: str) -> None:
    rc, _, err = run_cli(capsys, "generate", "--prompt", "hi", *args)
    assert_one_line_error(rc, err, needle)


@pytest.mark.parametrize("args, needle", [
    (["--draft", "ngram", "--batch-size", "2"], "batch size 1"),
    (["--draft", "ngram", "--prompt-file", "/no/such/file"], "cannot read --prompt-file"),
    (["--draft", "ngram", "--prompt-file", __file__], "tokenizer"),  # a preset has none
    (["--draft", "ngram", "--chat"], "--chat needs --prompt-file"),
    (["--draft", "ngram", "--tp", "2"], "--tp does not apply"),
    (["--draft", "nope:3"], "'nope:3' not found"),  # a draft model that is not there
    (["--prompt-file", __file__], "need --draft"),
])
def test_bench_draft_bad_options(capsys, args: list[str], needle: str) -> None:
    rc, _, err = run_cli(capsys, "bench", "--model", "preset:tiny", "--device", "cpu", "--new-tokens", "4", *args)
    assert_one_line_error(rc, err, needle)


def test_cuda_absent(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    rc, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(rc, err, "CUDA is not available")


def test_unknown_option_is_one_line(capsys) -> None:
    rc, _, err = run_cli(capsys, "generate", "--no-such-flag")
    assert_one_line_error(rc, err, "unrecognized arguments")


def test_unsupported_architecture(capsys, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "vocab_size": 10}))
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(rc, err, "supported: LlamaForCausalLM")


def test_truncated_safetensors(capsys, tmp_path: Path, default_model_dir: str) -> None:
    src = Path(default_model_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    with open(src / "model.safetensors", "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(3_000_000))
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(rc, err, "truncated")


def test_corrupt_safetensors_header(capsys, tmp_path: Path, default_model_dir: str) -> None:
    shutil.copy(Path(default_model_dir) / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    rc, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(rc, err, "corrupt")


@pytest.mark.parametrize("keep_bytes", [100, 2_000_000, 90_000_000])
def test_truncated_or_corrupt_gguf(capsys, tmp_path: Path, keep_bytes: int) -> None:
    with open(known_model_gguf("smollm2-135m"), "rb") as f:
        data = f.read(keep_bytes)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data if keep_bytes > 100 else b"GGUF" + bytes(range(96)))
    rc, _, err = run_cli(capsys, "generate", "--model", str(bad), "--prompt", "hi")
    assert_one_line_error(rc, err, "GGUF")


def test_prompt_longer_than_context(capsys, default_model_dir: str) -> None:
    rc, _, err = run_cli(capsys, "generate", "--model", default_model_dir, "--prompt",
                         "word " * 9000, "--max-new-tokens", "4")
    assert_one_line_error(rc, err, "longer than the model's context")


def test_debug_shows_traceback() -> None:
    proc = subprocess.run([sys.executable, "-c", "from llmopt.cli.main import main; main()",
                           "generate", "--prompt", "hi", "--temperature", "-1", "--debug"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("name", ["LLMOPT_WO_KERNEL", "LLMOPT_GEMV_ONE_ROW", "LLMOPT_INT_DECODE",
                                  "LLMOPT_NF4_DECODE", "LLMOPT_KERNEL_PDL", "LLMOPT_GEMV_PREFETCH",
                                  "LLMOPT_WO_BATCH_COPY", "LLMOPT_GEMV_STAGES"])
def test_bad_weight_kernel_choice_is_one_line(name: str) -> None:
    """The decode-kernel settings are read once at import, on any machine: a bad value is one
    clear line and exit 2 (not an error inside a compiled forward on the GPU)."""
    import os

    proc = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "bench", "--model", "preset:tiny",
                           "--quant", "int8", "--new-tokens", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, name: "bogus"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert name in lines[0] and "bogus" in lines[0]


@pytest.mark.parametrize("stages, expect", [(None, {"packed": 0, "rowmajor": 3}), ("5", {"packed": 5, "rowmajor": 5})])
def test_bench_json_records_the_resolved_gemv_stages(tmp_path, stages: str | None, expect: dict) -> None:
    """A quantised bench run's JSON holds the one-row kernels' pipeline stages as resolved
    (LLMOPT_GEMV_STAGES=auto means 3 for int8/fp8 and none for int4/nf4), next to the setting."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "LLMOPT_GEMV_STAGES"}
    if stages is not None:
        env["LLMOPT_GEMV_STAGES"] = stages
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "bench", "--model", "preset:tiny", "--quant",
                           "int8", "--new-tokens", "2", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["gemv_stages"] == expect and rec["wo_kernel"] == "auto"
    assert rec["env"].get("LLMOPT_GEMV_STAGES") == stages


@pytest.mark.parametrize(
    "name", ["LLMOPT_PDL", "LLMOPT_AUTOTUNE_POINTWISE", "LLMOPT_COORDINATE_DESCENT", "LLMOPT_TP_TUNING"]
)
def test_bad_compile_setting_is_one_line(name: str) -> None:
    """The generated-kernel settings are checked when a compile starts, on any device (LLMOPT_PDL
    is otherwise read only for GPU compiles): a bad value is one line and exit 2."""
    import os

    proc = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "bench", "--model", "preset:tiny",
                           "--compile", "--new-tokens", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, name: "bogus"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert name in lines[0] and "bogus" in lines[0]


def test_bench_table_says_which_kernels_are_pdl_launches() -> None:
    """A compiled GPU run's table names the programmatic-dependent-launch settings it ran with
    (inductor's kernels, llmopt's own); a run without them (CPU, eager) has no such row."""
    from llmopt.bench.latency import BenchResult, format_table

    def result(extra: dict) -> BenchResult:
        return BenchResult(
            model="preset:llama-2-7b", random_weights=True, device="NVIDIA H200", dtype="bfloat16",
            attention="triton", compile=True, compile_mode="regional", compile_prefill=False,
            fuse_projections=True, quant="int8", config={"batch_size": 1, "prompt_len": 5, "new_tokens": 200},
            runs=[], decode_tokens_per_s=300.0, total_tokens_per_s=300.0, ttft_s=0.04,
            prefill_tokens_per_s=100.0, weight_bytes=6_700_000_000, kv_bytes_per_step=1e6,
            achieved_gb_per_s=2000.0, copy_gb_per_s=None, roofline_tokens_per_s=None,
            roofline_fraction=None, memory={}, load_s=1.0, first_run_s=2.0, compile_s=None,
            start_to_first_token_s=3.0, start_to_first_run_done_s=4.0, versions={}, extra=extra)

    table = format_table(result({"pdl": {"inductor": True, "llmopt": False}}))
    row = next(line for line in table.splitlines() if line.startswith("PDL launches"))
    assert row.split(None, 2)[2] == "inductor's kernels on, llmopt's kernels off"
    assert "PDL" not in format_table(result({}))


@pytest.mark.parametrize("name", ["LLMOPT_DENSE_ONE_ROW", "LLMOPT_DENSE_GEMV"])
def test_bad_dense_gemv_setting_is_one_line(name: str) -> None:
    """LLMOPT_DENSE_ONE_ROW (the kernel --dense-gemv's modules give a single row) and
    LLMOPT_DENSE_GEMV (what a generator swaps when not told) are checked when the swap is
    imported: a bad value is one line and exit 2."""
    import os

    proc = subprocess.run([sys.executable, "-m", "llmopt.cli.main", "bench", "--model", "preset:tiny",
                           "--new-tokens", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, name: "bogus"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert name in lines[0] and "bogus" in lines[0]


def test_bench_dense_gemv_out_records_what_it_swapped(tmp_path: Path, capsys) -> None:
    """`bench --dense-gemv out` swaps each layer's o_proj and down_proj and says so in its JSON;
    a bare --dense-gemv still means all; an unknown choice is one line and exit 2."""
    from llmopt.loading.presets import preset_config

    layers = preset_config("tiny").num_layers
    swapped = {}
    for choice in (["out"], []):
        out = tmp_path / f"b{len(choice)}.json"
        assert main(["bench", "--model", "preset:tiny", "--dtype", "bfloat16", "--dense-gemv", *choice,
                     "--new-tokens", "2", "--prompt-len", "3", "--json", str(out)]) == 0
        rec = json.loads(out.read_text())
        swapped[rec["dense_gemv"]] = rec["dense_gemv_modules"]
    assert swapped["out"] == 2 * layers and swapped["all"] > 2 * layers
    capsys.readouterr()
    assert main(["bench", "--model", "preset:tiny", "--dense-gemv", "qkv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qkv" in err[0]
