"""Triton weight-only kernels against the plain-PyTorch references (GPU only), and the CPU
dispatch paths against dequantise-then-matmul in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import run_triton_script, sharp_int4_tiny

from llmopt.quant import primitives as P
from llmopt.quant.kernels import reference as ref

# (N, K, group): a ragged K for g128 (576 = 4.5 x 128), a Llama-2-7B shape, a small one
SHAPES = [(576, 576, 128), (4096, 4096, 128), (1536, 576, 32), (256, 1536, 64)]
BATCHES = [1, 3, 8, 16, 20]


def _formats(w: torch.Tensor, group: int) -> dict[str, tuple]:
    q8 = P.quantize_int8_per_channel(w)
    p = P.group_minmax_params(w, 4, group)
    codes = P.quantize_groupwise(w, p, 4, group)
    nf = P.quantize_nf4(w, min(group, 64))
    f8 = P.quantize_fp8_per_channel(w)
    p8 = P.group_minmax_params(w, 8, group)
    codes8 = P.quantize_groupwise(w, p8, 8, group)
    return {
        "int8": (q8.qweight, q8.scales),
        "int8g": ((codes8.to(torch.int16) - 128).to(torch.int8), p8.scales.t().contiguous(),
                  (p8.zeros - 128).t().contiguous(), group),
        "int4": (P.pack_bits(codes.t().contiguous(), 4), p.scales.t().contiguous(), p.zeros.t().contiguous(), group),
        "nf4": (P.pack_bits(nf.codes.t().contiguous(), 4), nf.absmax.t().contiguous(), min(group, 64)),
        "fp8": (f8.qweight, f8.scales),
    }


def _in_dtype(args: tuple, dtype: torch.dtype) -> tuple:
    """A ``_formats()`` entry with its float tensors (scales, zeros; not fp8 codes) in ``dtype``."""
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.element_size() > 1
                 else a for a in args)


def _dequant(fmt: str, args: tuple, k: int) -> torch.Tensor:
    if fmt == "int8":
        return ref.dequant_int8(args[0], args[1], torch.float64)
    if fmt == "int8g":
        return ref.dequant_int8g(args[0], args[1], args[2], args[3], torch.float64)
    if fmt == "fp8":
        return args[0].double() * args[1].double()[:, None]
    if fmt == "int4":
        return ref.dequant_int4(args[0], args[1], args[2], args[3], k, torch.float64)
    return ref.dequant_nf4(args[0], args[1], args[2], k, torch.float64)


def test_cpu_paths_match_float64_dequant() -> None:
    from llmopt.quant import kernels

    g = torch.Generator().manual_seed(0)
    n, k, group = 96, 576, 128
    w = torch.randn(n, k, generator=g)
    x = torch.randn(3, 5, k, generator=g)
    bias = torch.randn(n, generator=g)
    fns = {"int8": kernels.int8_linear, "int8g": kernels.int8g_linear, "int4": kernels.int4_linear,
           "nf4": kernels.nf4_linear, "fp8": kernels.fp8_linear}
    for fmt, args in _formats(w, group).items():
        y = fns[fmt](x, *args, bias=bias)
        expect = F.linear(x.double(), _dequant(fmt, args, k), bias.double())
        torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k,group", [(64, 576, 64), (96, 576, 128), (32, 128, 32)])
def test_int4_module_cpu_decode_path(n: int, k: int, group: int) -> None:
    """Int4Linear takes torch's CPU int4 GEMV at decode sizes (a ragged K padded to whole
    groups): it must agree with dequantise-then-matmul, the path longer inputs take."""
    from llmopt.quant.int4 import quantize_weight_rtn

    g = torch.Generator().manual_seed(k + group)
    w = torch.randn(n, k, generator=g)
    m = quantize_weight_rtn(w, group, torch.randn(n, generator=g))
    w_deq = m.dequantize().double()
    for rows in (1, 5, 40):
        x = torch.randn(rows, k, generator=g)
        expect = F.linear(x.double(), w_deq, m.bias.double())
        torch.testing.assert_close(m(x).double(), expect, rtol=1e-4, atol=1e-4)
    used = m.__dict__.get("_cpu_pack_cache")
    assert used is not None and used[2] is not None


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int8g", "int4", "nf4", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference(fmt: str, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    from llmopt.quant.kernels import triton_wo

    n, k, group = shape
    g = torch.Generator(device="cuda").manual_seed(n + k + group)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    args = _formats(w, group)[fmt]
    fn = {"int8": triton_wo.int8_matmul, "int8g": triton_wo.int8g_matmul, "int4": triton_wo.int4_matmul,
          "nf4": triton_wo.nf4_matmul, "fp8": triton_wo.fp8_matmul}[fmt]
    dev_args = _in_dtype(args, dtype)
    w_ref = _dequant(fmt, dev_args, k).float()
    for m in BATCHES:
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        y = fn(x, *dev_args)
        assert y.dtype == dtype and y.shape == (m, n)
        expect = x.float() @ w_ref.t()
        tol = 2e-2 * expect.abs().max().item()
        torch.testing.assert_close(y.float(), expect, rtol=2e-2, atol=tol)


def _gemv_args(fmt: str, args: tuple) -> tuple:
    """(w, s, z, lut, FMT, group) for triton_wo.gemv from a _formats() entry."""
    from llmopt.quant.kernels import triton_wo as T

    if fmt in ("int8", "fp8"):
        return args[0], args[1], args[1], args[1], {"int8": T.FMT_INT8, "fp8": T.FMT_FP8}[fmt], 1 << 30
    if fmt == "nf4":
        return args[0], args[1], args[1], T.nf4_codebook().to(args[1].device), T.FMT_NF4, args[2]
    return args[0], args[1], args[2], args[1], {"int4": T.FMT_INT4, "int8g": T.FMT_INT8G}[fmt], args[3]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int8g", "int4", "nf4", "nf4-select", "nf4-prmt", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_kernel_matches_reference(fmt: str, shape: tuple[int, int, int], monkeypatch) -> None:
    """The few-row kernels (LLMOPT_WO_KERNEL=triton-gemv) at 1, 3 and 8 rows, and the one-row
    deferred-sum kernels, against float64 dequantise-matmul; nf4-select: NF4 levels picked by
    selects or by byte permutes (LLMOPT_NF4_DECODE=select, prmt)."""
    from llmopt.quant.kernels import triton_wo

    if fmt.startswith("nf4-"):
        monkeypatch.setattr(triton_wo, "NF4_DECODE", fmt[4:])
        fmt = "nf4"

    n, k, group = shape
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    args = _in_dtype(_formats(w, group)[fmt], torch.bfloat16)
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        expect = x.double() @ _dequant(fmt, args, k).t()
        # one row also through the deferred-sum kernels (LLMOPT_GEMV_ONE_ROW=deferred), both decodes
        ways = [{"one_row": "reduce"}] + ([{"one_row": "deferred", "int_decode": d} for d in triton_wo.DECODES]
                                          if m == 1 else [])
        for kw in ways:
            y = triton_wo.gemv(x, *_gemv_args(fmt, args), **kw)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert ((y.double() - expect).norm() / expect.norm()).item() < 1e-2, (m, kw)
            if kw.get("one_row") == "deferred" and fmt != "int8g":
                # as a programmatic dependent launch (LLMOPT_KERNEL_PDL): the same tile, the same sums
                assert torch.equal(triton_wo.gemv(x, *_gemv_args(fmt, args), **kw, pdl=True), y), kw


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8", "fp8", "dense"])
def test_prefetching_one_row_kernels_match_reference(fmt: str) -> None:
    """LLMOPT_GEMV_PREFETCH=1 (each iteration issues the next tile's loads first) on the GPU:
    the one-row kernels against float64 dequantise-matmul, with K = 4096 + 128 (a share of K
    that does not split evenly), as a plain and as a programmatic dependent launch."""
    from llmopt.quant.kernels import triton_wo

    n, k, group = 1024, 4224, 128
    g = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    if fmt == "dense":
        wd = w.to(torch.bfloat16)
        args, expect = (wd, wd, wd, wd, triton_wo.FMT_DENSE, 1 << 30), x.double() @ wd.double().t()
    else:
        f = _in_dtype(_formats(w, group)[fmt], torch.bfloat16)
        args, expect = _gemv_args(fmt, f), x.double() @ _dequant(fmt, f, k).t()
    for pdl in (False, True):
        y = triton_wo.gemv(x, *args, one_row="deferred", int_decode="magic", pdl=pdl, prefetch=True)
        assert y.shape == (1, n) and y.dtype == torch.bfloat16
        assert ((y.double() - expect).norm() / expect.norm()).item() < 1e-2, pdl


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["int8", "nf4", "fp8"])
def test_pdl_one_row_kernels_in_a_compiled_model_decode_the_same(spec: str, monkeypatch) -> None:
    """LLMOPT_KERNEL_PDL=1: the one-row kernels and the decode attention as PDL launches inside
    the regionally compiled, CUDA-graph-captured step (opaque ops, next to inductor's own PDL
    kernels) give the eager model's greedy tokens, up to near ties (the compiled model's
    projections are fused, so its sums are split otherwise), at the first run and at a replay."""
    from tests.helpers import assert_greedy_up_to_ties

    from llmopt.engine.generate import Generator
    from llmopt.sampling import SamplingParams

    model = sharp_int4_tiny("cuda", torch.bfloat16, spec)
    model.set_attention_backend("triton")
    unfused = copy.deepcopy(model)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    dev = torch.device("cuda")
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "1")
    monkeypatch.setenv("LLMOPT_PDL", "1")
    gen = Generator(model, None, dev, compile=True, compile_mode="regional", max_seq_len=256)
    got = gen.generate([[5, 6, 7, 8]], params)[0].token_ids
    assert_greedy_up_to_ties(unfused, [5, 6, 7, 8], got)
    assert_greedy_up_to_ties(unfused, [5, 6, 7, 8], gen.generate([[5, 6, 7, 8]], params)[0].token_ids)  # replayed


@pytest.mark.gpu
def test_fp8_scaled_mm_close_to_dequant() -> None:
    from llmopt.quant.kernels.fp8_scaled_mm import fp8_scaled_mm

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmul needs compute capability 8.9+")
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(1024, 4096, device="cuda", generator=g) * 0.05
    f8 = P.quantize_fp8_per_channel(w)
    for m in (1, 8, 33):
        x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
        y = fp8_scaled_mm(x, f8.qweight, f8.scales)
        expect = x.float() @ (f8.qweight.float() * f8.scales[:, None]).t()
        # activations are rounded to e4m3 too: ~2^-4 relative per element, averaged over K
        torch.testing.assert_close(y.float(), expect, rtol=0.1, atol=0.05 * expect.abs().max().item())


@pytest.mark.gpu
def test_quantised_model_triton_path_matches_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tiny model in bf16 on the GPU, every scheme: decode-sized inputs go through Triton
    (and fp8 scaled_mm); the same model with dispatch forced onto the plain-PyTorch path is the
    reference."""
    from llmopt.loading.loader import random_model
    from llmopt.loading.presets import preset_config
    from llmopt.quant import kernels, quantize_

    cfg = preset_config("tiny")
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    for spec in ("int8", "int8-g32", "int4-g32", "nf4", "fp8", "fp8:mode=scaled_mm"):
        m = random_model(cfg, torch.device("cuda"), torch.bfloat16, seed=3)
        quantize_(m, spec)
        with monkeypatch.context() as mp:
            mp.setattr(kernels, "_use_triton", lambda x: False)
            expect = {t: m(ids[:, :t]).float() for t in (1, 8)} if "scaled_mm" not in spec else None
        if expect is None:  # scaled_mm is checked against the dequant mode of the same weights
            ref_model = random_model(cfg, torch.device("cuda"), torch.bfloat16, seed=3)
            quantize_(ref_model, "fp8")
            with monkeypatch.context() as mp:
                mp.setattr(kernels, "_use_triton", lambda x: False)
                expect = {t: ref_model(ids[:, :t]).float() for t in (1, 8)}
        for t in (1, 8):
            got = m(ids[:, :t]).float()
            tol = 0.15 if "scaled_mm" in spec else 3e-2
            torch.testing.assert_close(got, expect[t], rtol=tol, atol=tol * expect[t].abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 32), (256, 1536, 128), (11008, 4096, 64)])
def test_int4_tinygemm_path_matches_float64_dequant(monkeypatch: pytest.MonkeyPatch, n: int, k: int, group: int) -> None:
    """LLMOPT_WO_KERNEL=tinygemm: Int4Linear repacked into torch's CUDA int4 layout gives
    dequantise-then-matmul's result at decode sizes (1, 8 rows) and beyond them (40 rows, the
    Triton/cuBLAS path)."""
    from llmopt.quant import kernels
    from llmopt.quant.int4 import quantize_weight_rtn

    monkeypatch.setattr(kernels, "_TINYGEMM", True)
    g = torch.Generator().manual_seed(n + k + group)
    w = torch.randn(n, k, generator=g) * 0.02
    m = quantize_weight_rtn(w, group, torch.randn(n, generator=g)).to(device="cuda", dtype=torch.bfloat16)
    m.prepare_for_device()
    assert m.tg_weight is not None and m.tg_scales_zeros is not None
    assert m.weight_bytes() < n * k  # reads about K*N/2 bytes plus the scales, not the codes twice
    w_deq = m.dequantize().double()
    for rows in (1, 8, 40):
        x = torch.randn(rows, k, generator=g).to("cuda", torch.bfloat16)
        expect = F.linear(x.double(), w_deq, m.bias.double())
        got = m(x).double()
        err = ((got - expect).norm() / expect.norm()).item()
        assert err < 1e-2, (rows, err)


_INTERPRET_SCRIPT = r'''
import sys, functools, torch, triton
from llmopt.quant.kernels import triton_wo as T
from tests.helpers import map_on_every_core
sys.path.insert(0, sys.argv[1])
from test_quant_kernels import _dequant, _formats, _gemv_args

torch.set_num_threads(1)  # no OpenMP team before the fork below
torch.manual_seed(0)
kern = T._wo_matmul_kernel.fn  # under the interpreter the autotuner cannot benchmark: every config by hand
FMTS = {"int8": T.FMT_INT8, "int8g": T.FMT_INT8G, "int4": T.FMT_INT4, "nf4": T.FMT_NF4}


def tiled(x, wt, s, z, lut, n_out, code, grp, kw):
    m, k = x.shape
    out = torch.zeros((m, n_out), dtype=torch.float32)
    grid = (triton.cdiv(n_out, kw["BLOCK_N"]), kw["SPLIT_K"], triton.cdiv(m, T.BLOCK_M))
    kern[grid](x, wt, s, z, lut, out, m, n_out, k, x.stride(0), out.stride(0), FMT=code,
               GROUP=grp, BLOCK_M=T.BLOCK_M, **kw)
    return out


def few_row(x, wt, s, z, extra, n_out, code, grp, packed, block_m, kw):
    m, k = x.shape
    out = torch.zeros((m, n_out), dtype=torch.float32 if packed else torch.float16)
    grid = (triton.cdiv(n_out, kw["BLOCK_N"]), kw["SPLIT_K"]) if packed else (triton.cdiv(n_out, kw["BLOCK_N"]),)
    kern_g = T._packed_gemv_kernel if packed else T._rowmajor_gemv_kernel
    kern_g.fn[grid](x, wt, s, z, *extra, out, m, n_out, k, x.stride(0), FMT=code, GROUP=grp,
                    BLOCK_M=block_m, **kw)
    return out


jobs = []  # (name, launch, expected output): every launch runs in a worker below
for n, k, group in [(64, 256, 32), (96, 576, 128)]:
    w = torch.randn(n, k) * 0.05
    formats = _formats(w, group)
    for fmt, code in FMTS.items():
        args = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in formats[fmt])
        w_ref = _dequant(fmt, args, k)
        wt, s = args[0], args[1]
        z = args[2] if fmt in ("int4", "int8g") else s
        grp = args[-1] if fmt in ("int4", "int8g", "nf4") else 1 << 30
        lut = T.nf4_codebook().half() if fmt == "nf4" else s
        n_out = wt.shape[0] if fmt in ("int8", "int8g") else wt.shape[1]
        for m in (1, 3):
            x = torch.randn(m, k, dtype=torch.float16)
            expect = x.double() @ w_ref.t()
            for cfg in T._configs():
                jobs.append((fmt, functools.partial(tiled, x, wt, s, z, lut, n_out, code, grp, cfg.kwargs), expect))
    # the few-row kernels (LLMOPT_WO_KERNEL=triton-gemv), every config, 1 row and 3 (in a
    # 4-row block, so one row is masked); the packed kernel adds split-K partial sums into
    # float32, the row-major one stores its rows in the activation dtype
    for m in (1, 3):
        x = torch.randn(m, k, dtype=torch.float16)
        block_m = triton.next_power_of_2(m)
        for fmt in FMTS:
            args = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in formats[fmt])
            wt, s, z, lut, code, grp = _gemv_args(fmt, args)
            expect = x.double() @ _dequant(fmt, args, k).t()
            packed = fmt in ("int4", "nf4")
            n_out = wt.shape[1] if packed else wt.shape[0]
            configs = T._packed_gemv_configs() if packed else T._rowmajor_gemv_configs()
            for cfg in T.gemv_configs(configs, block_m):
                # nf4 both ways: levels loaded from the codebook, and picked by selects
                for sel in ((False, True) if fmt == "nf4" else (False,)):
                    kw = dict(cfg.kwargs, **({"NF4_SELECT": sel} if packed else {}))
                    extra = (lut,) if packed else ()
                    name = fmt + ("-select" if sel else "") + "-gemv"
                    jobs.append((name, functools.partial(few_row, x, wt, s, z, extra, n_out, code, grp, packed,
                                                         block_m, kw), expect))
        dense = (torch.randn(n, k) * 0.05).half()
        expect = x.double() @ dense.double().t()
        for cfg in T.gemv_configs(T._rowmajor_gemv_configs(), block_m):
            jobs.append(("dense-gemv", functools.partial(few_row, x, dense, dense, dense, (), n, T.FMT_DENSE,
                                                         1 << 30, False, block_m, cfg.kwargs), expect))


def run(i):  # one kernel launch under the interpreter: its name and relative error
    name, launch, expect = jobs[i]
    return name, ((launch().double() - expect).norm() / expect.norm()).item()


worst = {}
for name, err in map_on_every_core(run, range(len(jobs))):
    worst[name] = max(worst.get(name, 0.0), err)
print(worst)
assert len(worst) >= 10 and all(e < 2e-3 for e in worst.values()), worst
'''


def test_triton_kernel_every_config_under_the_interpreter(tmp_path) -> None:
    """The Triton kernel's arithmetic on CPU through TRITON_INTERPRET=1 (every autotune config,
    batch 1 and 3, a ragged K), for machines with triton but no GPU; skipped without triton."""
    run_triton_script(_INTERPRET_SCRIPT, tmp_path, interpret=True)


_ONE_ROW_SCRIPT = r'''
import sys, torch, triton
from llmopt.quant.kernels import triton_wo as T
from tests.helpers import map_on_every_core
sys.path.insert(0, sys.argv[1])
from test_quant_kernels import _dequant, _formats, _gemv_args, _in_dtype

torch.set_num_threads(1)  # no OpenMP team before the fork below
torch.manual_seed(0)
jobs = []  # (name, kernel arguments, expected row): every one runs in a worker below
for n, k, group in [(96, 576, 32), (64, 1024, 128)]:  # 576: K not a multiple of most tiles
    w = torch.randn(n, k) * 0.05
    w[:, :8] += 1.0  # a large offset in one group: the exponent trick's sums must not lose it
    formats = _formats(w, group)
    x = torch.randn(1, k, dtype=torch.float16)
    for fmt in ("int8", "int4", "nf4", "fp8"):
        if fmt == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            continue
        args = _in_dtype(formats[fmt], torch.float16)
        wt, s, z, lut, code, grp = _gemv_args(fmt, args)
        expect = x.double() @ _dequant(fmt, args, k).t()
        packed = fmt in ("int4", "nf4")
        for dec in T.DECODES.values():
            for sel in ((False, True) if fmt == "nf4" else (False,)):
                for cfg in (T._tile_configs(T.ONE_ROW_TILES["packed"]) if packed else T._tile_configs(T.ONE_ROW_TILES["rowmajor"])):
                    # PREFETCH (LLMOPT_GEMV_PREFETCH) and a pipelined loop (LLMOPT_GEMV_STAGES):
                    # with the exponent trick (the default decode)
                    for pre, st in ((False, 0), (True, 0), (False, 3)) if dec == 1 else ((False, 0),):
                        name = f"{fmt}{'-select' if sel else ''}-dec{dec}{'-prefetch' if pre else ''}{'-st3' if st else ''}"
                        if packed:
                            call = ("packed", (x, wt, s, z, lut.float(), n, k, 15),
                                    dict(FMT=code, GROUP=grp, NF4_DECODE=int(sel), INT_DECODE=dec, PREFETCH=pre,
                                         STAGES=st))
                        else:
                            call = ("rowmajor", (x, wt, s, n, k),
                                    dict(FMT=code, INT_DECODE=dec, PREFETCH=pre, STAGES=st))
                        jobs.append((name, call, cfg.kwargs, expect))
    dense = (torch.randn(n, k) * 0.05).half()
    expect = x.double() @ dense.double().t()
    for cfg in T._tile_configs(T.ONE_ROW_TILES["rowmajor"]):
        for pre in (False, True):
            jobs.append(("dense-prefetch" if pre else "dense",
                         ("rowmajor", (x, dense, dense, n, k), dict(FMT=T.FMT_DENSE, INT_DECODE=0, PREFETCH=pre)),
                         cfg.kwargs, expect))


def run(i):  # one kernel launch under the interpreter: its name and relative error
    name, (kind, a, consts), kw, expect = jobs[i]
    if kind == "packed":
        x, wt, s, z, lut, n, k, nib = a
        out = torch.zeros((n,), dtype=torch.float32)
        T._packed_gemv1[(triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])](x, wt, s, z, lut, out, n, k, nib,
                                                                         **consts, **kw)
    else:
        x, wt, s, n, k = a
        out = torch.empty((n,), dtype=torch.float16)
        T._rowmajor_gemv1[(triton.cdiv(n, kw["BLOCK_N"]),)](x, wt, s, out, n, k, **consts, **kw)
    return name, ((out.double() - expect[0]).norm() / expect.norm()).item()


results = map_on_every_core(run, range(len(jobs)))
worst = {}
for name, err in results:
    worst[name] = max(worst.get(name, 0.0), err)
print(worst)
assert len(worst) >= 15 and all(e < 2e-3 for e in worst.values()), worst
'''


def test_one_row_kernels_every_config_under_the_interpreter(tmp_path) -> None:
    """The deferred-sum one-row kernels (LLMOPT_GEMV_ONE_ROW=deferred) against float64
    dequantise-matmul: every config, both integer decodes (conversion and exponent trick), nf4
    both ways, a ragged K, and a group whose weights sit far from zero; skipped without triton."""
    run_triton_script(_ONE_ROW_SCRIPT, tmp_path, interpret=True)


_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmopt.quant.kernels import triton_wo as T
from tests.helpers import map_on_every_core, ptxas_spills

C = "constexpr"
common = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "FMT": C, "GROUP": C, "BLOCK_M": C,
          "BLOCK_N": C, "BLOCK_K": C}
cases = []
# The few-row kernels (int8-gN's default at one row; the rest only under LLMOPT_WO_KERNEL=triton-gemv):
# every config for int8-gN and, at 8 rows (the most registers), for NF4; the other formats on their
# first config only (a cold compile of every pair took minutes of CI)
for block_m in (1, 8):
    for c, cfg in enumerate(T.gemv_configs(T._packed_gemv_configs(), block_m)):
        for fmt, grp, sel in ((T.FMT_INT4, 32, False), (T.FMT_INT4, 128, False), (T.FMT_NF4, 64, False),
                              *([(T.FMT_NF4, 64, True)] if block_m == 1 else [])):  # selects: one row
            if c and not (block_m == 8 and fmt == T.FMT_NF4):
                continue
            sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "lut_ptr": "*fp32",
                   "out_ptr": "*fp32", **common, "SPLIT_K": C, "NF4_SELECT": C}
            cases.append((T._packed_gemv_kernel, sig, {"FMT": fmt, "GROUP": grp, "BLOCK_M": block_m,
                                                       "NF4_SELECT": sel, **cfg.kwargs}, cfg.num_warps))
    for c, cfg in enumerate(T.gemv_configs(T._rowmajor_gemv_configs(), block_m)):
        for fmt, grp, wt in ((T.FMT_INT8, 1 << 30, "*i8"), (T.FMT_INT8G, 32, "*i8"), (T.FMT_FP8, 1 << 30, "*fp8e4nv"),
                             (T.FMT_DENSE, 1 << 30, "*bf16")):
            if c and fmt != T.FMT_INT8G:
                continue
            sig = {"x_ptr": "*bf16", "w_ptr": wt, "s_ptr": "*bf16", "z_ptr": "*bf16", "out_ptr": "*bf16", **common}
            cases.append((T._rowmajor_gemv_kernel, sig, {"FMT": fmt, "GROUP": grp, "BLOCK_M": block_m, **cfg.kwargs},
                          cfg.num_warps))
# the one-row deferred-sum kernels, both integer decodes (nf4: codebook and selects), compiled as
# a launch on the model shapes specialises them: N, K and the pointers multiples of 16 (without
# that, the widest tiles spill a few bytes)
# (LLMOPT_KERNEL_PDL: the first tile of each format also as a programmatic dependent launch)
# (LLMOPT_GEMV_PREFETCH: every tile also with the next tile's loads issued first, for int4-g128,
# nf4 by byte permutes, int8 and bf16 rows, with the exponent trick)
one = {"N": "i32", "K": "i32", "FMT": C, "BLOCK_N": C, "BLOCK_K": C, "INT_DECODE": C, "PDL": C, "PREFETCH": C}
for i, cfg in enumerate(T._tile_configs(T.ONE_ROW_TILES["packed"])):
    for fmt, grp, nf4 in ((T.FMT_INT4, 32, 0), (T.FMT_INT4, 128, 0), *((T.FMT_NF4, 64, d) for d in T.NF4_DECODES.values())):
        for dec in T.DECODES.values():
            if dec == 0 and i:  # the conversion decode (LLMOPT_INT_DECODE=cvt): first tile only
                continue
            pre_too = dec == 1 and (grp == 128 or nf4 == 2)
            # (LLMOPT_GEMV_STAGES=3: every tile also pipelined for int4-g128 with the exponent trick)
            for pdl, pre, st in ((False, False, 0), *([(True, False, 0)] if i == 0 and dec == 1 else []),
                                 *([(False, True, 0)] if pre_too else []),
                                 *([(False, False, 3)] if dec == 1 and grp == 128 else [])):
                sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "lut_ptr": "*fp32",
                       "out_ptr": "*fp32", "nib": "i32", **one, "GROUP": C, "SPLIT_K": C, "NF4_DECODE": C,
                       "STAGES": C}
                cases.append((T._packed_gemv1_kernel, sig, {"FMT": fmt, "GROUP": grp, "NF4_DECODE": nf4,
                                                            "INT_DECODE": dec, "PDL": pdl, "PREFETCH": pre,
                                                            **cfg.kwargs, "STAGES": st}, cfg.num_warps))
# the row-major kernel's configs as its autotuner holds them (pipelined over 3 stages by default),
# the first also with the plain loop (LLMOPT_GEMV_STAGES=0)
for i, cfg in enumerate(T._rowmajor_gemv1_kernel.configs):
    for fmt, wt in ((T.FMT_INT8, "*i8"), (T.FMT_FP8, "*fp8e4nv"), (T.FMT_DENSE, "*bf16")):
        for dec in T.DECODES.values():
            if dec == 0 and i:
                continue
            pre_too = dec == 1 and fmt != T.FMT_FP8
            for pdl, pre, st in ((False, False, None), *([(True, False, None)] if i == 0 and dec == 1 else []),
                                 *([(False, True, None)] if pre_too else []),
                                 *([(False, False, 0)] if i == 0 and dec == 1 else [])):
                sig = {"x_ptr": "*bf16", "w_ptr": wt, "s_ptr": "*bf16", "out_ptr": "*bf16", **one, "STAGES": C}
                consts = {"FMT": fmt, "INT_DECODE": dec, "PDL": pdl, "PREFETCH": pre, **cfg.kwargs}
                if st is not None:
                    consts["STAGES"] = st
                cases.append((T._rowmajor_gemv1_kernel, sig, consts, cfg.num_warps))
HINTED = {id(T._packed_gemv1_kernel), id(T._rowmajor_gemv1_kernel)}


def check(i):  # compile case i for sm_90; its PTX's marks and ptxas's spill report
    kern, sig, consts, warps = cases[i]
    attrs = ({(kern.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
              if t != C and a not in ("M", "nib")} if id(kern) in HINTED else None)
    k = triton.compile(ASTSource(fn=kern.fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    return ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, "prmt.b32" in ptx,
            ptx.count("ld.global"), ptxas_spills(ptx), "cp.async" in ptx)


results = map_on_every_core(check, range(len(cases)))
spilled = []
pdl_marks = []  # (PDL, whether the PTX waits on and releases the grid dependency)
prmt_marks = []
loads = {}
pipelined = []  # (STAGES > 1 and not PREFETCH, whether the PTX copies tiles with cp.async)
for (kern, sig, consts, warps), (pdl_marked, prmt, n_loads, spill, cp_async) in zip(cases, results):
    if "STAGES" in consts:
        pipelined.append((consts["STAGES"] > 1 and not consts["PREFETCH"], cp_async))
    if "PDL" in consts:
        pdl_marks.append((consts["PDL"], pdl_marked))
    if consts.get("NF4_DECODE") is not None:  # NF4 by byte permutes: prmt in the PTX, nowhere else
        prmt_marks.append((consts["NF4_DECODE"] == 2, prmt))
    if consts.get("PREFETCH") is not None:  # global load sites, to compare each PREFETCH twin
        twin = tuple(sorted((a, v) for a, v in consts.items() if a != "PREFETCH")) + (kern.fn.__name__,)
        loads[twin, consts["PREFETCH"]] = n_loads
    if spill is not None:
        spilled.append((kern.fn.__name__, consts, spill))
print(len(cases), "compiled;", spilled)
assert not spilled, spilled
assert sum(p for p, _ in pdl_marks) == 8 and all(p == marked for p, marked in pdl_marks), pdl_marks
assert sum(p for p, _ in prmt_marks) >= 8 and all(p == marked for p, marked in prmt_marks), prmt_marks
# PREFETCH loads the first tile before the loop and the next one in it: more load sites than
# its twin (the codes', scales' and zeros' loads written twice)
pre = [(twin, n, loads[twin, False]) for (twin, p), n in loads.items() if p]
assert len(pre) == 32 and all(n > base for _, n, base in pre), pre
# the pipelined loop copies its tiles to shared memory asynchronously; no other loop does
assert sum(p for p, _ in pipelined) >= 30 and all(p == cp for p, cp in pipelined), pipelined
'''


def test_gemv_kernels_compile_for_hopper_without_spills(tmp_path) -> None:
    """The decode kernels' configs compile for sm_90 (Triton's own compiler and ptxas, no GPU
    needed) with no register spills: every one-row config, the few-row kernels' as the script
    says; skipped without triton."""
    run_triton_script(_COMPILE_SCRIPT, tmp_path, interpret=False)


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """A tiny interpreter for the integer PTX the NF4 byte-permute and the tensor-core int4
    decodes use (and, or, shl, shr.u32, lop3.b32, prmt.b32 in its default mode), on 32-bit
    unsigned values."""
    def val(tok: str) -> int:
        return int(tok, 0) & 0xFFFFFFFF if tok[0].isdigit() else regs[tok]
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *args = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in args]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shl.b32":
            r = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "lop3.b32":  # bit i of the result: bit (4a + 2b + c) of the table, a[3]
            r = 0
            for i in range(32):
                idx = (((a[0] >> i) & 1) << 2) | (((a[1] >> i) & 1) << 1) | ((a[2] >> i) & 1)
                r |= ((a[3] >> idx) & 1) << i
        elif op == "prmt.b32":
            pool = a[0] | (a[1] << 32)  # bytes 0-3 from a, 4-7 from b
            r = 0
            for i in range(4):
                nib = (a[2] >> (4 * i)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:  # sign-replicate mode: never used by the decode
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
        regs[d] = r
    return regs


def _kernel_ptx(jit_fn) -> str:
    """The PTX string literal a Triton helper passes to ``tl.inline_asm_elementwise``."""
    import ast

    call = next(n for n in ast.walk(ast.parse(jit_fn.src)) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", "") == "inline_asm_elementwise")
    return call.args[0].value


def test_nf4_byte_permute_decode_gives_every_level() -> None:
    """The PTX of LLMOPT_NF4_DECODE=prmt as written in the kernel, interpreted on CPU: every code
    in every one of a word's eight positions decodes to its NF4 level (rounded to bfloat16), as
    float32 bits; and it is the PTX that the codebook's byte tables generate."""
    pytest.importorskip("triton")
    from llmopt.quant.kernels import triton_wo as T
    from llmopt.quant.primitives import nf4_codebook

    asm = _kernel_ptx(T._nf4_prmt)
    assert asm.split() == T._nf4_prmt_asm().split()
    want = nf4_codebook().to(torch.bfloat16).float()
    rng = torch.Generator().manual_seed(0)
    words = [sum(((c + j) % 16) << (4 * j) for j in range(8)) for c in range(16)]  # each code everywhere
    words += torch.randint(0, 1 << 32, (64,), generator=rng, dtype=torch.int64).tolist()
    for word in words:
        regs = _run_ptx(asm, {"$8": word})
        got = torch.tensor([regs[f"${j}"] for j in range(8)], dtype=torch.int64)
        got = got.to(torch.int32).view(torch.float32)  # the low 32 bits as float32
        codes = [(word >> (4 * j)) & 0xF for j in range(8)]
        assert torch.equal(got, want[codes]), (hex(word), got, want[codes])


def test_int4_mma_byte_decode_gives_both_codes_as_bfloat16() -> None:
    """The tensor-core kernel's PTX (``_split_bf16``) as written, interpreted on CPU: for every
    byte in both positions of a register, the low nibble comes out as the bfloat16 number 128 +
    code in the first output pair and the high nibble in the second."""
    pytest.importorskip("triton")
    from llmopt.quant.kernels import triton_int4_mma as MMA

    asm = _kernel_ptx(MMA._split_bf16)
    for b0 in range(256):
        b1 = (b0 * 37 + 11) % 256  # the other byte: every value, paired with another
        regs = _run_ptx(asm, {"$2": b0 | (b1 << 8) | (0xABCD << 16)})  # bits 16-31: not the inputs'
        for out, codes in (("$0", (b0 & 0xF, b1 & 0xF)), ("$1", (b0 >> 4, b1 >> 4))):
            pair = torch.tensor([regs[out] & 0xFFFF, regs[out] >> 16], dtype=torch.int32).to(torch.int16)
            got = pair.view(torch.bfloat16).float()
            assert got.tolist() == [128.0 + c for c in codes], (b0, b1, out, got)


def test_nf4_mma_byte_decode_gives_both_levels() -> None:
    """The tensor-core kernel's NF4 PTX (``_split_nf4_bf16``) as written, interpreted on CPU: for
    every byte in both positions, the NF4 levels (rounded to bfloat16) of its low nibble come
    out in the first pair and of its high nibble in the second; and it is the PTX that the
    codebook's byte tables generate (``nf4_split_asm``)."""
    pytest.importorskip("triton")
    from llmopt.quant.kernels import triton_int4_mma as MMA
    from llmopt.quant.primitives import nf4_codebook

    asm = _kernel_ptx(MMA._split_nf4_bf16)
    assert asm.split() == MMA.nf4_split_asm().split()
    want = nf4_codebook().to(torch.bfloat16).float()
    for b0 in range(256):
        b1 = (b0 * 37 + 11) % 256
        regs = _run_ptx(asm, {"$2": b0 | (b1 << 8) | (0x5A5A << 16)})
        for out, codes in (("$0", (b0 & 0xF, b1 & 0xF)), ("$1", (b0 >> 4, b1 >> 4))):
            pair = torch.tensor([regs[out] & 0xFFFF, regs[out] >> 16], dtype=torch.int32).to(torch.int16)
            assert torch.equal(pair.view(torch.bfloat16).float(), want[list(codes)]), (b0, b1, out)


def test_one_row_kernels_name_no_module_constants() -> None:
    """torch.compile copies a user-defined Triton kernel and the helpers it calls into a module of
    its own; a module-level constant they read did not survive that under torch 2.11 (every nf4
    compile failed to import). The one-row kernels, the tensor-core int4 kernel and their helpers
    read only ``tl``, ``triton`` and other Triton functions."""
    pytest.importorskip("triton")
    import builtins
    import dis

    import triton

    from llmopt.quant.kernels import triton_int4_mma as MMA
    from llmopt.quant.kernels import triton_wo as T

    seen, todo = set(), [T._packed_gemv1, T._rowmajor_gemv1, MMA._int4_mma]
    while todo:
        fn = todo.pop()
        if fn.fn.__name__ in seen:
            continue
        seen.add(fn.fn.__name__)
        for ins in dis.Bytecode(fn.fn):
            if ins.opname != "LOAD_GLOBAL" or ins.argval in ("tl", "triton"):
                continue
            if ins.argval not in fn.fn.__globals__:  # a builtin (range, min)
                assert hasattr(builtins, ins.argval), (fn.fn.__name__, ins.argval)
                continue
            called = fn.fn.__globals__[ins.argval]
            assert isinstance(called, triton.runtime.jit.JITFunction), (fn.fn.__name__, ins.argval)
            todo.append(called)
    assert {"_nf4_prmt", "_nf4_select", "_nibble_float", "_split_range", "_split_bf16", "_split_nf4_bf16"} <= seen


def test_pdl_one_row_op_leaves_the_packed_formats_cast_to_the_graph() -> None:
    """The opaque PDL op of the one-row kernels returns the packed formats' float32 split-K sums
    (the cast to the activation dtype follows it in the traced graph, where inductor joins it to
    the next kernel) and the row-major formats' output in the activation dtype: the op's fake
    (what torch.compile traces with) says so for every format."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmopt.quant.kernels import triton_wo as T

    k, n = 256, 96
    with FakeTensorMode():
        x2 = torch.empty(1, k, dtype=torch.bfloat16)
        packed = torch.empty(k // 8, n, dtype=torch.int32)
        rowmajor = torch.empty(n, k, dtype=torch.int8)
        s = torch.empty(n, dtype=torch.bfloat16)
        for fmt, w, dtype in ((T.FMT_NF4, packed, torch.float32), (T.FMT_INT4, packed, torch.float32),
                              (T.FMT_INT8, rowmajor, torch.bfloat16), (T.FMT_FP8, rowmajor, torch.bfloat16)):
            out = T.gemv1_pdl_op(x2, w, s, s, s, fmt, 64, 2, 0, False)
            assert out.shape == (n,) and out.dtype == dtype, fmt


_MMA_SCRIPT = r'''
import torch
from llmopt.quant import primitives as P
from llmopt.quant.primitives import nf4_codebook
from llmopt.quant.kernels import reference as ref
from llmopt.quant.kernels import triton_int4_mma as T
from tests.helpers import map_on_every_core

torch.set_num_threads(1)  # no OpenMP team before the fork below
torch.manual_seed(0)
cases, jobs = [], []
# NF4 differs from int4 only in the byte decode: each case runs it on two tiles, those not yet
# run as NF4 first
nf4_pending = list(T.TILES)
# a ragged N and a K of odd chunk counts (K = 640 is 5 chunks: tiles of 2 and 4 chunks run past it)
for n, k, group in [(96, 256, 128), (64, 384, 32), (128, 512, 64), (40, 640, 128), (64, 256, 256)]:
    w = torch.randn(n, k) * 0.02
    w[:, :16] += 0.5  # a large offset in one group: the codes' 1024 offset must come out exactly
    prm = P.group_minmax_params(w, 4, group)
    codes = P.quantize_groupwise(w, prm, 4, group)
    sc, zs = prm.scales.t().contiguous().half(), prm.zeros.t().contiguous().half()
    deq = ref.dequant_int4(P.pack_bits(codes.t().contiguous(), 4), sc, zs, group, k, torch.float64)
    packed, st, zt = T.pack(codes, sc, zs)
    # the same codes read as NF4, with the scales as absmax (levels rounded to float16, as the
    # kernel's float16 path reads them)
    lut = nf4_codebook()
    ast_ = st.abs()
    deq_nf4 = lut.half().double()[codes.long()] * ast_.double().repeat_interleave(group, dim=1)[:, :k]
    for m in (1, 8) if group != 256 else (16,):
        planned = T.plan(m, group)
        if planned is None:
            continue
        cap, cols = planned
        x = torch.randn(m, k, dtype=torch.float16)  # the interpreter's dot takes float16, not bfloat16
        cases.append((n, k, group, m, cols, x, packed, st, ast_, zt, lut, x.double() @ deq.t(),
                      x.double() @ deq_nf4.t()))
        fitting = [t for t in T.TILES if t[1] <= cap]
        as_nf4 = ([t for t in nf4_pending if t in fitting] + fitting)[:2]
        nf4_pending = [t for t in nf4_pending if t not in as_nf4]
        jobs += [(len(cases) - 1, tile, nf4) for tile in fitting
                 for nf4 in ((False, True) if tile in as_nf4 else (False,))]


def run(job):  # one tile on one case, int4 or NF4: its key and relative error
    c, (bn, ch, sn, warps, stages), nf4 = job
    n, k, group, m, cols, x, packed, st, ast_, zt, lut, expect, expect_nf4 = cases[c]
    out = torch.zeros(m, n)
    T._int4_mma[(-(-k // (T.CHUNK * ch)), sn)](
        x, packed, st if not nf4 else ast_, zt, lut, out, m, n, k, st.shape[1], k,
        GROUP=group, BLOCK_N=bn, CHUNKS=ch, SPLIT_N=sn, COLS=cols, NF4=nf4)
    want = expect_nf4 if nf4 else expect
    return (n, k, group, m, nf4), ((out.double() - want).norm() / want.norm()).item()


results = map_on_every_core(run, jobs)
worst = {}
for key, err in results:
    worst[key] = max(err, worst.get(key, 0.0))
print(worst)
assert len(worst) == 18 and all(e < 1e-3 for e in worst.values()), worst
assert not nf4_pending, nf4_pending  # NF4 too ran on every tile
'''


def test_int4_mma_kernel_every_tile_under_the_interpreter(tmp_path) -> None:
    """The tensor-core kernel (``triton_int4_mma``) against float64 dequantise-matmul, as int4
    (every tile in every case) and as NF4 (every tile in some case): 1, 8 and 16 rows, groups of
    32 to 256, a ragged N and K; skipped without triton."""
    run_triton_script(_MMA_SCRIPT, tmp_path, interpret=True)


def test_int4_mma_layout_holds_each_code_once() -> None:
    """``pack`` puts code k of chunk j (128 inputs) in byte 64 j + k % 64, low nibble for the
    first half of the chunk and high for the second; plans stay within the columns."""
    pytest.importorskip("triton")
    from llmopt.quant.kernels import triton_int4_mma as T

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 384), generator=g)
    packed, st, zt = T.pack(codes, torch.rand(3, 5), torch.rand(3, 5))
    assert packed.shape == (5, 192) and packed.dtype == torch.uint8 and st.shape == (5, 3)
    b = packed.reshape(5, 3, 64).long()
    back = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(5, 384)
    assert torch.equal(back, codes)
    with pytest.raises(ValueError, match="multiple of 128"):
        T.pack(codes[:, :200], torch.rand(2, 5), torch.rand(2, 5))
    for m in (1, 2, 8, 16):
        for group in (32, 64, 128):
            planned = T.plan(m, group)
            if planned is not None:
                cap, cols = planned
                assert m * max(1, cap * T.CHUNK // group) <= cols <= T.MAX_COLS
    assert T.plan(16, 32) is None and not T.fits(16, 4096, 32) and T.fits(8, 4096, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (11008, 4096, 32), (4096, 11008, 64)])
@pytest.mark.parametrize("m", [1, 2, 8])
def test_int4_mma_kernel_matches_float64_dequant(n: int, k: int, group: int, m: int) -> None:
    from llmopt.quant.kernels import triton_int4_mma as T

    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, k, generator=g) * 0.02
    prm = P.group_minmax_params(w, 4, group)
    codes = P.quantize_groupwise(w, prm, 4, group)
    sc = prm.scales.t().contiguous().to(torch.bfloat16)
    zs = prm.zeros.t().contiguous().to(torch.bfloat16)
    deq = ref.dequant_int4(P.pack_bits(codes.t().contiguous(), 4), sc, zs, group, k, torch.float64)
    packed, st, zt = (t.cuda() for t in T.pack(codes, sc, zs))
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    y = T.int4_mma(x, packed, st, zt, group)
    expect = x.double() @ deq.cuda().t()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.double() - expect).norm() / expect.norm()).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 11008)])
@pytest.mark.parametrize("m", [1, 8])
def test_nf4_mma_kernel_matches_float64_dequant(n: int, k: int, m: int) -> None:
    """NF4 (blocks of 64) through the tensor-core kernel, levels rounded to bfloat16 by its PTX."""
    from llmopt.quant.kernels import triton_int4_mma as T

    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g) * 0.02
    nf = P.quantize_nf4(w, 64)
    absmax = nf.absmax.t().contiguous().to(torch.bfloat16)  # [G, N]
    deq = ref.dequant_nf4(P.pack_bits(nf.codes.t().contiguous(), 4), absmax, 64, k, torch.float64)
    packed, at, _ = (t.cuda() for t in T.pack(nf.codes, absmax, absmax))
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    y = T.nf4_mma(x, packed, at, 64, P.nf4_codebook().cuda())
    expect = x.double() @ deq.cuda().t()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.double() - expect).norm() / expect.norm()).item() < 5e-3


@pytest.mark.gpu
def test_int4_module_takes_the_mma_kernel_for_batched_decode() -> None:
    """Int4Linear (groups of 128) on CUDA holds the tensor-core layout and sends 4 to 16 rows
    through it (fewer stay on tinygemm): eager and compiled both match float64
    dequantise-matmul. Groups of 32 hold no such copy."""
    from llmopt.quant import kernels
    from llmopt.quant.linear import Int4Linear

    if kernels.mma_min_rows(128) != 4:
        pytest.skip("LLMOPT_WO_KERNEL is not auto")
    g = torch.Generator().manual_seed(3)
    n, k, group = 1024, 2048, 128
    w = torch.randn(n, k, generator=g) * 0.02
    prm = P.group_minmax_params(w, 4, group)
    codes = P.quantize_groupwise(w, prm, 4, group)
    lin = Int4Linear.from_codes(codes, prm.scales, prm.zeros, group, None, torch.bfloat16).cuda()
    lin.prepare_for_device()
    assert lin.mma_weight is not None and lin.tg_weight is not None
    deq = lin.dequantize().double()
    compiled = torch.compile(lin)
    for m in (1, 2, 8, 16):
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        assert kernels.use_mma_for(x, group) == (m >= 4)
        expect = x.double() @ deq.t()
        for y in (lin(x), compiled(x)):
            assert ((y.double() - expect).norm() / expect.norm()).item() < 5e-3
    p32 = P.group_minmax_params(w, 4, 32)
    lin32 = Int4Linear.from_codes(P.quantize_groupwise(w, p32, 4, 32), p32.scales, p32.zeros, 32, None,
                                  torch.bfloat16).cuda()
    lin32.prepare_for_device()
    assert lin32.mma_weight is None and lin32.tg_weight is not None


def test_wo_batch_copy_keeps_auto_off_the_tensor_core_kernel() -> None:
    """The rows from which ``auto`` takes the tensor-core kernel (int4 g128, g64, g32; NF4
    blocks of 64, 32), by default and with LLMOPT_WO_BATCH_COPY=0, which holds no copy for it."""
    import os
    import subprocess
    import sys

    code = ("from llmopt.quant import kernels as k; "
            "print(k.mma_min_rows(128), k.mma_min_rows(64), k.mma_min_rows(32), "
            "k.mma_min_rows(64, 'nf4'), k.mma_min_rows(32, 'nf4'))")

    def rows(**env: str) -> list[str]:
        base = {n: v for n, v in os.environ.items() if n not in ("LLMOPT_WO_KERNEL", "LLMOPT_WO_BATCH_COPY")}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**base, **env})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert rows() == ["4", "8", "0", "2", "0"]
    assert rows(LLMOPT_WO_BATCH_COPY="0") == ["0"] * 5
    assert rows(LLMOPT_WO_KERNEL="mma", LLMOPT_WO_BATCH_COPY="0") == ["1"] * 5


@pytest.mark.gpu
def test_nf4_module_takes_the_mma_kernel_from_two_rows() -> None:
    """NF4Linear (blocks of 64) on CUDA holds the tensor-core layout and sends 2 to 16 rows
    through it (one row stays on the one-row kernel): eager and compiled both match float64
    dequantise-matmul. Double-quantised absmax holds no such copy."""
    from torch import nn

    from llmopt.quant import kernels
    from llmopt.quant.nf4 import NF4Config, quantize_linear

    if kernels.mma_min_rows(64, "nf4") != 2:
        pytest.skip("LLMOPT_WO_KERNEL is not auto")
    g = torch.Generator().manual_seed(5)
    n, k = 1024, 2048
    dense = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
    lin = quantize_linear(dense.to(torch.bfloat16), NF4Config(block_size=64)).cuda()
    lin.prepare_for_device()
    assert lin.mma_weight is not None
    deq = lin.dequantize().double()
    compiled = torch.compile(lin)
    for m in (1, 2, 8, 16):
        x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        assert kernels.use_mma_for(x, 64, "nf4") == (m >= 2)
        expect = x.double() @ deq.t()
        for y in (lin(x), compiled(x)):
            assert ((y.double() - expect).norm() / expect.norm()).item() < 5e-3
    lin_dq = quantize_linear(dense, NF4Config(block_size=64, double_quant=True)).cuda()
    lin_dq.prepare_for_device()
    assert lin_dq.mma_weight is None


_MMA_COMPILE_SCRIPT = r'''
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmopt.quant.kernels import triton_int4_mma as T
from tests.helpers import map_on_every_core, ptxas_spills

C = "constexpr"
sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "lut_ptr": "*fp32", "out_ptr": "*fp32",
       "M": "i32", "N": "i32", "K": "i32", "G": "i32", "stride_xm": "i32", "GROUP": C, "BLOCK_N": C, "CHUNKS": C,
       "SPLIT_N": C, "COLS": C, "NF4": C}
hinted = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K", "stride_xm")
attrs = {(T._int4_mma.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
done, jobs = set(), []
for group in (32, 64, 128):
    for m in (1, 4, 8, 16):
        planned = T.plan(m, group)
        if planned is None:
            continue
        cap, cols = planned
        for (bn, ch, sn, warps, stages), nf4 in itertools.product(T.TILES, (False, True)):
            key = (group, cols, bn, ch, warps, stages, nf4)
            if ch > cap or key in done or (nf4 and group != 64):  # NF4: blocks of 64
                continue
            done.add(key)
            jobs.append((key, sn))


def check(job):  # compile one tile for sm_90: (no PTX decode or no wgmma, ptxas's spill report)
    (group, cols, bn, ch, warps, stages, nf4), sn = job
    consts = {"GROUP": group, "BLOCK_N": bn, "CHUNKS": ch, "SPLIT_N": sn, "COLS": cols, "NF4": nf4}
    k = triton.compile(ASTSource(fn=T._int4_mma, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    return (("prmt.b32" if nf4 else "lop3.b32") not in ptx or "wgmma" not in ptx,  # PTX decode, tensor cores
            ptxas_spills(ptx))


results = map_on_every_core(check, jobs)
no_asm = [key for (key, _), (bad, _) in zip(jobs, results) if bad]
spilled = [(key, spill) for (key, _), (_, spill) in zip(jobs, results) if spill is not None]
print(len(done), "compiled;", spilled, no_asm)
assert len(done) >= 20 and not spilled and not no_asm, (spilled, no_asm)
'''


def test_int4_mma_kernel_compiles_for_hopper_without_spills(tmp_path) -> None:
    """Every tile the tensor-core kernel can be given (``plan``: groups of 32 to 128, 1 to 16
    rows; NF4 with blocks of 64) compiles for sm_90 with its PTX decode and wgmma and spills no
    registers; skipped without triton."""
    run_triton_script(_MMA_COMPILE_SCRIPT, tmp_path, interpret=False)
