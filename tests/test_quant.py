"""Quantisation on CPU: primitives, schemes on tiny models, GPTQ/AWQ mechanics, checkpoints
(including the Hugging Face GPTQ/AWQ layouts, decoded here independently) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.loading.loader import load_model, random_model, save_checkpoint
from llmopt.loading.presets import preset_config
from llmopt.quant import primitives as P
from llmopt.quant import quantize_
from llmopt.quant.linear import FP8Linear, Int4Linear, Int8Linear, NF4Linear

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# The NF4 levels as published with QLoRA / bitsandbytes.
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def tiny(seed: int = 1, **changes: object) -> torch.nn.Module:
    cfg = preset_config("tiny").replace(**changes) if changes else preset_config("tiny")
    return random_model(cfg, CPU, torch.float32, seed=seed)


# -- primitives ----------------------------------------------------------------------------------
def test_nf4_codebook_matches_published_levels() -> None:
    torch.testing.assert_close(P.nf4_codebook(), torch.tensor(NF4_PUBLISHED), rtol=0, atol=2e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_is_a_little_endian_bit_stream(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 3), generator=g)
    packed = P.pack_bits(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 3)
    # independent decode: column c is the bit stream sum(v[i] << bits*i) cut into 32-bit words
    for c in range(3):
        stream = sum(int(v[i, c]) << (bits * i) for i in range(64))
        words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(packed.shape[0])]
        assert [int(x) & 0xFFFFFFFF for x in packed[:, c]] == words
    assert torch.equal(P.unpack_bits(packed, bits).long(), v)


def test_awq_packing_order() -> None:
    v = torch.randint(0, 16, (5, 16), generator=torch.Generator().manual_seed(0))
    packed = P.pack_awq(v)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for r in range(5):
        for c in range(2):
            word = sum(int(v[r, 8 * c + order[i]]) << (4 * i) for i in range(8))
            assert int(packed[r, c]) & 0xFFFFFFFF == word
    assert torch.equal(P.unpack_awq(packed).long(), v)


def test_int8_and_group_rounding_errors_are_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=g)  # 200 = 3 x 64 + 8: ragged last group
    q = P.quantize_int8_per_channel(w)
    err = (P.dequantize_int8(q.qweight, q.scales) - w).abs()
    assert bool((err <= q.scales[:, None] / 2 + 1e-6).all())
    p = P.group_minmax_params(w, 4, 64)
    assert p.scales.shape == (48, 4)
    codes = P.quantize_groupwise(w, p, 4, 64)
    deq = P.dequantize_groupwise(codes, p.scales, p.zeros, 64)
    bound = P.expand_groups(p.scales, 64, 200) / 2 + 1e-6
    assert bool(((deq - w).abs() <= bound).all())
    assert int(codes.max()) <= 15


def test_nf4_and_double_quant() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    q = P.quantize_nf4(w, 64)
    deq = P.dequantize_nf4(q.codes, q.absmax, 64)
    book = P.nf4_codebook()
    # nearest level: no other level is closer to the normalised weight
    x = w / P.expand_groups(q.absmax, 64, 256)
    chosen = (book[q.codes.long()] - x).abs()
    best = (book[None, None, :] - x[..., None]).abs().amin(-1)
    torch.testing.assert_close(chosen, best)
    assert (deq - w).abs().max() < 0.2 * w.abs().max()
    dq = P.double_quantize(q.absmax, 16)
    back = P.double_dequantize(dq, 16)
    assert dq.codes.dtype == torch.int8
    assert (back - q.absmax).abs().max() < 0.01 * q.absmax.max()


def test_fp8_matches_torch_e4m3_rounding() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = P.quantize_fp8_per_channel(w)
    expect = (w / q.scales[:, None]).to(torch.float8_e4m3fn).float() * q.scales[:, None]
    torch.testing.assert_close(P.dequantize_fp8(q.qweight, q.scales), expect)


# -- schemes on a tiny model -----------------------------------------------------------------------
@pytest.mark.parametrize("spec,cls,tol", [
    ("int8", Int8Linear, 0.02), ("int8-g32", Int8Linear, 0.02), ("int4-g32", Int4Linear, 0.25), ("nf4", NF4Linear, 0.25),
    ("nf4:double_quant=true", NF4Linear, 0.25), ("fp8", FP8Linear, 0.08),
])
def test_rtn_schemes_swap_and_stay_close(spec: str, cls: type, tol: float) -> None:
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = tiny()(ids)
    m = quantize_(tiny(), spec)
    assert isinstance(m.model.layers[0].mlp.down_proj, cls)
    assert isinstance(m.lm_head, torch.nn.Linear)  # skipped by default
    rel = ((m(ids) - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol
    # the module's own dequantised weight reproduces its forward exactly
    lin = m.model.layers[0].self_attn.q_proj
    x = torch.randn(3, lin.in_features)
    torch.testing.assert_close(lin(x), x @ lin.dequantize().float().t(), rtol=1e-5, atol=1e-5)


def test_unknown_method_lists_known_ones() -> None:
    from llmopt.errors import UserError

    with pytest.raises(UserError, match="known: int8, int4, nf4, fp8, gptq, awq"):
        quantize_(tiny(), "int5")


def test_gptq_identity_hessian_is_rtn_and_real_hessian_beats_rtn() -> None:
    from llmopt.quant.gptq import GPTQConfig, gptq_quantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    cfg = GPTQConfig(group_size=32)
    res = gptq_quantize_weight(w, torch.eye(128), cfg)
    p = P.group_minmax_params(w, 4, 32)
    assert torch.equal(res.codes, P.quantize_groupwise(w, p, 4, 32))
    # correlated activations: GPTQ's error feedback must lower the output error
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    rtn = P.dequantize_groupwise(P.quantize_groupwise(w, p, 4, 32), p.scales, p.zeros, 32)
    for c in (cfg, GPTQConfig(group_size=32, act_order=True), GPTQConfig(group_size=32, sym=True)):
        r = gptq_quantize_weight(w, h, c)
        m = Int4Linear.from_codes(r.codes, r.scales, r.zeros, 32, None, torch.float32, 4, r.perm)
        err_gptq = (x @ m.dequantize().t() - x @ w.t()).pow(2).mean()
        err_rtn = (x @ rtn.t() - x @ w.t()).pow(2).mean()
        assert err_gptq < 0.7 * err_rtn, (c, err_gptq, err_rtn)


def test_gptq_8bit_is_int8_per_channel_identity_hessian_is_rtn_and_real_hessian_beats_it() -> None:
    from llmopt.errors import UserError
    from llmopt.quant.gptq import GPTQConfig, gptq_module, gptq_quantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    cfg = GPTQConfig(bits=8)
    assert (cfg.group_size, cfg.act_order, cfg.sym) == (0, True, True)  # resolved defaults
    rtn = P.quantize_int8_per_channel(w)
    res = gptq_quantize_weight(w, torch.eye(128), GPTQConfig(bits=8, act_order=False))
    assert torch.equal(res.codes, rtn.qweight) and res.perm is None
    torch.testing.assert_close(res.scales[:, 0], rtn.scales)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    x[:, 5] *= 20  # one loud input channel, so act-order's order differs from model order
    h = 2 * x.t() @ x / x.shape[0]
    err_rtn = (x @ P.dequantize_int8(rtn.qweight, rtn.scales).t() - x @ w.t()).pow(2).mean()
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    for c in (GPTQConfig(bits=8, act_order=False), cfg):
        r = gptq_quantize_weight(w, h, c)
        m = gptq_module(r, lin, c)
        assert isinstance(m, Int8Linear) and m.group_size == 0 and r.perm is None
        assert int(m.qweight.abs().max()) <= 127
        err = (x @ m.dequantize().t() - x @ w.t()).pow(2).mean()
        assert err < 0.5 * err_rtn, (c, err, err_rtn)
        torch.testing.assert_close(m(x[:4]), x[:4] @ m.dequantize().t(), rtol=1e-5, atol=1e-5)
    for bad in (dict(bits=8, group_size=128), dict(bits=8, sym=False), dict(bits=5)):
        with pytest.raises(UserError):
            GPTQConfig(**bad)  # type: ignore[arg-type]


def test_awq_search_never_loses_to_rtn_and_folding_is_exact() -> None:
    from llmopt.quant.awq import _fold, fake_quant, search_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 8, 64)  # outlier channels
    w = torch.randn(32, 64, generator=g)
    s = search_scale(x, [w], 32, 10)
    loss = (x @ (fake_quant(w * s, 32) / s).t() - x @ w.t()).pow(2).mean()
    loss_rtn = (x @ fake_quant(w, 32).t() - x @ w.t()).pow(2).mean()
    assert loss <= loss_rtn
    m = tiny()
    layer = m.model.layers[0]
    h = torch.randn(1, 5, 64, generator=g)
    before = layer.mlp(h)
    _fold(layer.mlp.up_proj, torch.rand(128, generator=g) + 0.5, [layer.mlp.down_proj])
    torch.testing.assert_close(layer.mlp(h), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["gptq-g32", "gptq-w3-g32", "gptq-w8", "awq-g32"])
def test_calibrated_methods_run_layer_by_layer(spec: str) -> None:
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = tiny()(ids)
    m = quantize_(tiny(), spec, calibration=calib)
    lin = m.model.layers[1].mlp.down_proj
    if "w8" in spec:
        assert isinstance(lin, Int8Linear) and lin.group_size == 0
    else:
        assert isinstance(lin, Int4Linear) and lin.bits == (3 if "w3" in spec else 4)
    rel = ((m(ids) - ref).norm() / ref.norm()).item()
    assert 0 < rel < {"w3": 0.7, "w8": 0.05}.get(spec.split("-")[1], 0.4)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["int8", "int8-g32", "int4-g32", "nf4:double_quant=true", "fp8", "gptq-g32",
                                  "gptq:group_size=32,act_order=true", "gptq-w3-g32", "gptq-w8",
                                  "gptq-w8:act_order=false", "awq-g32"])
def test_checkpoint_round_trip(spec: str, tmp_path: Path) -> None:
    from llmopt.quant.api import parse_quant_spec
    from llmopt.quant.checkpoint import save_quantized

    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    m = quantize_(tiny(), spec, calibration=calib)
    out = tmp_path / "q"
    save_quantized(m, None, parse_quant_spec(spec), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary left behind
    lm = load_model(str(out), device="cpu")
    assert lm.quant == spec.split("-")[0].split(":")[0]
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    hf = spec.startswith(("gptq", "awq"))  # the HF layouts store scales in fp16
    tol = 2e-3 if hf else 0
    torch.testing.assert_close(lm.model(ids), m(ids), rtol=tol, atol=tol)


def _np_unpack_rows(qweight: np.ndarray, bits: int) -> np.ndarray:
    """Independent GPTQ qweight decoder: 32 rows per `bits` int32 words, bit stream order."""
    words = qweight.astype(np.uint32).astype(np.uint64)
    out = []
    for c in range(0, words.shape[0], bits):
        stream = np.zeros(words.shape[1], dtype=object)
        for j in range(bits):
            stream = stream + (words[c + j].astype(object) << (32 * j))
        for i in range(32):
            out.append([(int(s) >> (bits * i)) & (2**bits - 1) for s in stream])
    return np.array(out)


def _np_unawq(a: np.ndarray) -> np.ndarray:
    """Independent AWQ decoder: nibble i of each int32 is output channel [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    a = a.astype(np.uint32)
    o = np.zeros((a.shape[0], a.shape[1] * 8), dtype=np.int64)
    for i in range(8):
        o[:, order[i]::8] = (a >> (4 * i)) & 0xF
    return o


def test_gptq_and_awq_files_follow_the_hf_layouts(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from llmopt.quant.api import parse_quant_spec
    from llmopt.quant.checkpoint import save_quantized

    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    for spec, bits in (("gptq-g32", 4), ("gptq-w3-g32", 3), ("gptq-w8", 8), ("awq-g32", 4)):
        m = quantize_(tiny(), spec, calibration=calib)
        out = tmp_path / spec
        save_quantized(m, None, parse_quant_spec(spec), out)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        t = load_file(str(out / "model.safetensors"))
        name = "model.layers.0.mlp.down_proj"
        k, n = 128, 64
        gs = 32 if bits < 8 else k  # 8 bits: one group per output channel, group_size -1
        scales = t[f"{name}.scales"].astype(np.float32)  # [G, N]
        assert t[f"{name}.scales"].dtype == np.float16 and scales.shape == (k // gs, n)
        if spec.startswith("gptq"):
            assert qc["quant_method"] == "gptq" and qc["bits"] == bits
            assert qc["group_size"] == (32 if bits < 8 else -1) and qc["sym"] == (bits == 8)
            assert t[f"{name}.qweight"].shape == (k * bits // 32, n)
            codes = _np_unpack_rows(t[f"{name}.qweight"], bits)  # [K, N]
            zeros = (_np_unpack_rows(t[f"{name}.qzeros"].T.copy(), bits).T + 1) & (2**bits - 1)
            g_idx = t[f"{name}.g_idx"]
            assert (g_idx == np.arange(k) // gs).all()
        else:
            assert qc["quant_method"] == "awq" and qc["version"] == "gemm"
            assert t[f"{name}.qweight"].shape == (k, n // 8)
            codes, zeros = _np_unawq(t[f"{name}.qweight"]), _np_unawq(t[f"{name}.qzeros"])
            g_idx = np.arange(k) // 32
        w = (codes - zeros[g_idx]) * scales[g_idx]  # [K, N]
        mod = m.model.layers[0].mlp.down_proj
        np.testing.assert_allclose(w.T, mod.dequantize().numpy(), rtol=2e-3, atol=2e-3)


# -- CLI and bad input ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: str) -> Path:
    """A tiny random model with the default model's tokenizer (so text calibration works)."""
    from llmopt.loading.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tinytok") / "m"
    cfg = preset_config("tiny").replace(vocab_size=49152)
    save_checkpoint(random_model(cfg, CPU, torch.float32, 0), Tokenizer.from_dir(Path(default_model_dir)), d)
    return d


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmopt.cli.main import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_quantize_cli_writes_a_loadable_checkpoint(tiny_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gptq"
    rc, so, _ = _cli(["quantize", "--model", str(tiny_dir), "--method", "gptq", "--group-size", "32",
                      "--calib-tokens", "256", "--calib-seq-len", "64", "--out", str(out),
                      "--json", str(tmp_path / "q.json")], capsys)
    assert rc == 0 and "gptq" in so
    rec = json.loads((tmp_path / "q.json").read_text())
    assert rec["method"] == "gptq" and rec["calibration_shape"] == [4, 64] and rec["quantize_s"] > 0
    assert rec["safetensors_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert (out / "tokenizer.json").exists()
    lm = load_model(str(out), device="cpu")
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, Int4Linear)
    # on-the-fly quantisation of the same float model through load_model(quant=...)
    lm2 = load_model(str(tiny_dir), device="cpu", quant="int4-g32")
    assert lm2.quant == "int4-g32" and isinstance(lm2.model.model.layers[0].mlp.up_proj, Int4Linear)


@pytest.mark.parametrize("extra,msg", [
    (["--method", "int5"], "unknown quantisation method 'int5'; known: int8"),
    (["--method", "int4", "--group-size", "100"], "group size must be a power of two"),
    (["--method", "int4", "--group-size", "256"], "group size 256 is larger than layer"),
    (["--method", "int8", "--bits", "3"], "--bits does not apply to method 'int8'"),
    (["--method", "gptq", "--bits", "8", "--group-size", "32"], "8-bit gptq has one scale per output channel"),
    (["--method", "gptq", "--calib", "EMPTY"], "is empty"),
    (["--method", "awq", "--calib", "SHORT"], "has 5 tokens; 8192 are needed"),
])
def test_quantize_bad_input_is_one_line_exit_2(extra: list[str], msg: str, tiny_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Just a few words.")
    extra = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "short.txt") if a == "SHORT"
             else a for a in extra]
    out = tmp_path / "out"
    rc, _, err = _cli(["quantize", "--model", str(tiny_dir), *extra, "--out", str(out)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and msg in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_checkpoint_with_missing_tensor_is_one_line_exit_2(tiny_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    for method, drop in (("int4", "model.layers.1.mlp.up_proj.zeros"), ("awq", "model.layers.0.self_attn.k_proj.qzeros")):
        out = tmp_path / method
        calib = ["--calib-tokens", "128", "--calib-seq-len", "64"] if method == "awq" else []
        rc, _, _ = _cli(["quantize", "--model", str(tiny_dir), "--method", method, "--group-size", "32",
                         *calib, "--out", str(out)], capsys)
        assert rc == 0
        sd = load_file(str(out / "model.safetensors"))
        del sd[drop]
        save_file(sd, str(out / "model.safetensors"))
        rc, _, err = _cli(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "1"], capsys)
        assert rc == 2 and err.count("\n") == 1 and drop in err, err


def test_8bit_gptq_cli_and_asymmetric_8bit_checkpoint(tiny_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--bits 8`` writes int8-format layers (act-order on by default, off with
    --no-act-order); an 8-bit GPTQ checkpoint with other zero points than 128 (asymmetric, which
    Int8Linear cannot hold) is refused in one line."""
    from safetensors.torch import load_file, save_file

    outs = {}
    for flag in ("--act-order", "--no-act-order"):
        out = outs[flag] = tmp_path / flag.strip("-")
        rc, _, _ = _cli(["quantize", "--model", str(tiny_dir), "--method", "gptq", "--bits", "8", flag,
                         "--calib-tokens", "256", "--calib-seq-len", "64", "--out", str(out)], capsys)
        assert rc == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (8, -1, True, flag == "--act-order")
        lm = load_model(str(out), device="cpu")
        assert isinstance(lm.model.model.layers[0].mlp.down_proj, Int8Linear)
        assert lm.quant_config is not None and lm.quant_config["act_order"] == (flag == "--act-order")
    name = "model.layers.0.mlp.up_proj.qzeros"
    sd = load_file(str(outs["--act-order"] / "model.safetensors"))
    sd[name] = P.pack_bits(torch.full((sd[name].shape[1] * 4, 1), 100), 8).t().contiguous()
    save_file(sd, str(outs["--act-order"] / "model.safetensors"))
    rc, _, err = _cli(["generate", "--model", str(outs["--act-order"]), "--prompt", "hi", "--max-new-tokens", "1"],
                      capsys)
    assert rc == 2 and err.count("\n") == 1 and "zero point 128" in err, err


@pytest.mark.parametrize("spec", ["int8", "int8-g32", "int4-g32", "nf4"])
def test_quantised_model_compiles_and_decodes_like_eager(spec: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantised modules trace with fullgraph torch.compile (the --compile path) and the
    compiled decode gives the eager tokens."""
    from llmopt.engine.generate import Generator
    from llmopt.sampling import SamplingParams

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    model = random_model(preset_config("tiny"), CPU, torch.float32, seed=5)
    model.lm_head.weight.mul_(40.0)  # greedy choices far from ties
    quantize_(model, spec)
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    eager = Generator(model, None, CPU).generate(prompts, params)
    compiled = Generator(model, None, CPU, compile=True, max_seq_len=64).generate(prompts, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


def test_int4_bf16_regional_compile_on_cpu_decodes_like_eager(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 in bfloat16 through ``--compile-mode regional`` on CPU: the layer graph lowers torch's
    CPU int4 matmul (its scales kept in the compute dtype, so nothing is cast inside the graph;
    a cast there failed inductor's lowering) and decodes the eager tokens."""
    from tests.helpers import sharp_int4_tiny

    from llmopt.engine.generate import Generator
    from llmopt.sampling import SamplingParams

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    model = sharp_int4_tiny(CPU, torch.bfloat16, "int4-g32")
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    eager = Generator(model, None, CPU).generate([[5, 6, 7, 8]], params)
    gen = Generator(model, None, CPU, compile=True, compile_mode="regional", max_seq_len=64)
    assert gen.generate([[5, 6, 7, 8]], params)[0].token_ids == eager[0].token_ids
