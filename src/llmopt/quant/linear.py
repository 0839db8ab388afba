"""Quantised drop-in replacements for ``nn.Linear``.

Each holds its packed weight as buffers (so ``state_dict`` is the checkpoint layout and
``model.to(device)`` moves them) and its ``forward`` calls one function of
``llmopt.quant.kernels``, which picks the Triton kernel or the plain-PyTorch path. All can be
built empty on the meta device from shapes alone, which is how quantised checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.quant import kernels
from llmopt.quant.primitives import (
    DoubleQuant,
    double_dequantize,
    nf4_codebook,
    num_groups,
    pack_bits,
)


class QuantLinear(nn.Module):
    """Common parts: shapes, an optional float bias (kept as a parameter so loaders cast it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def prepare_for_device(self) -> None:
        """Load-time repack for the device the module now lives on (default: nothing to do)."""

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            assert self.bias is not None
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    # -- joining modules that read the same input (``models.fusion``) --------------------------
    # Buffers every part must hold equal and the joined module shares (a codebook). Buffers
    # derived from the others (a repacked copy) are rebuilt by ``prepare_for_device``.
    SHARED: tuple[str, ...] = ()

    def out_dims(self) -> dict[str, int] | None:
        """For each buffer that has one entry per output feature, the dimension those entries
        run along; ``None`` where outputs cannot be joined."""
        return None

    def join_key(self) -> tuple[object, ...]:
        """Settings that must agree for two modules' outputs to be joined."""
        return (type(self), self.in_features, self.bias is not None)

    @staticmethod
    def cat_outputs(parts: list[QuantLinear]) -> QuantLinear | None:
        """One module computing ``torch.cat([p(x) for p in parts], -1)`` with the same kernels
        on the same codes: the per-output buffers concatenated, ``None`` if the parts differ in
        format or settings or a part cannot be joined (act-order int4, double-quantised NF4).
        Exact, since every output feature keeps its own codes, scales and zeros."""
        first = parts[0]
        dims = first.out_dims()
        if dims is None or any(p.join_key() != first.join_key() or p.out_dims() != dims for p in parts):
            return None
        if any(not torch.equal(p._buffers[n], first._buffers[n]) for p in parts[1:] for n in first.SHARED):
            return None
        fused = type(first).__new__(type(first))
        fused.__dict__ = {k: v for k, v in first.__dict__.items() if not k.startswith("_cpu_pack")}
        fused._parameters = dict(first._parameters)
        fused._buffers = dict(first._buffers)
        fused._non_persistent_buffers_set = set(first._non_persistent_buffers_set)
        fused._modules = {}
        for name, dim in dims.items():
            fused._buffers[name] = torch.cat([p._buffers[name] for p in parts], dim=dim)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        fused.out_features = sum(p.out_features for p in parts)
        fused.prepare_for_device()
        return fused


class Int8Linear(QuantLinear):
    """int8 codes ``qweight`` [N, K], in one of two forms:

    - ``group_size == 0``: symmetric per output channel, W = qweight * scales[:, None], scales [N];
    - ``group_size > 0``: asymmetric per group of inputs, W[n, k] = (qweight[n, k] - zeros[g, n]) *
      scales[g, n] with g = k // group_size; scales/zeros [G, N] in the compute dtype (zeros hold
      integers). Costs 2 x 16 bits per group more, and re-rounds a weight far less.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, group_size: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        if group_size:
            g = num_groups(in_features, group_size)
            self.register_buffer("scales", torch.ones(g, out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.zeros(g, out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
            self.register_buffer("zeros", None)

    @classmethod
    def per_channel(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> Int8Linear:
        """The symmetric per-channel form from codes [N, K] int8 and scales [N]."""
        n, k = qweight.shape
        m = cls(k, n, bias is not None, qweight.device, dtype)
        m.qweight = qweight.contiguous()
        m.scales = scales.to(dtype)
        m._set_bias(bias)
        return m

    def out_dims(self) -> dict[str, int]:
        if self.group_size:
            return {"qweight": 0, "scales": 1, "zeros": 1}
        return {"qweight": 0, "scales": 0}

    def join_key(self) -> tuple[object, ...]:
        return super().join_key() + (self.group_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size:
            return kernels.int8g_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return kernels.int8_linear(x, self.qweight, self.scales, self.bias)

    def dequantize(self) -> torch.Tensor:
        if self.group_size:
            return kernels.ref.dequant_int8g(self.qweight, self.scales, self.zeros, self.group_size,
                                             self.scales.dtype)
        return kernels.ref.dequant_int8(self.qweight, self.scales, self.scales.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")


class Int4Linear(QuantLinear):
    """Asymmetric group-wise codes (4-bit, or 3-bit GPTQ held in the 4-bit layout):
    W[n, k] = (code[k, n] - zeros[g, n]) * scales[g, n] with g = k // group_size.

    ``qweight`` int32 [K/8, N] packs codes along K; ``scales``/``zeros`` are [G, N] in the compute
    dtype (zeros hold integers; keeping them as floats saves an unpack in the kernel).
    With act-order GPTQ the input channels are stored sorted by group and ``perm`` [K] gathers x
    into that order, so every kernel sees contiguous groups.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 bits: int = 4, act_order: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if in_features % 8:
            raise ValueError(f"in_features must be a multiple of 8 for 4-bit packing, got {in_features}")
        self.group_size = group_size
        self.bits = bits
        g = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(g, out_features, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(g, out_features, dtype=dtype, device=device))
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.register_buffer("perm", None)
        # torch's CUDA int4 layout (the default CUDA decode path), built by prepare_for_device;
        # derived from the buffers above, so kept out of the state dict
        self.register_buffer("tg_weight", None, persistent=False)
        self.register_buffer("tg_scales_zeros", None, persistent=False)
        # the tensor-core kernel's layout (batched CUDA decode), also built by prepare_for_device
        self.register_buffer("mma_weight", None, persistent=False)
        self.register_buffer("mma_scales", None, persistent=False)
        self.register_buffer("mma_zeros", None, persistent=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None, dtype: torch.dtype, bits: int = 4,
                   perm: torch.Tensor | None = None) -> Int4Linear:
        """codes [N, K] (already in stored channel order), scales/zeros [N, G]."""
        n, k = codes.shape
        m = cls(k, n, bias is not None, group_size, bits, perm is not None, codes.device, dtype)
        m.qweight = pack_bits(codes.t().contiguous(), 4)
        m.scales = scales.t().contiguous().to(dtype)
        m.zeros = zeros.t().contiguous().to(dtype)
        if perm is not None:
            m.perm = perm.to(torch.int32)
        m._set_bias(bias)
        return m

    def out_dims(self) -> dict[str, int] | None:
        # act-order parts each gather x in their own order
        return None if self.perm is not None else {"qweight": 1, "scales": 1, "zeros": 1}

    def join_key(self) -> tuple[object, ...]:
        return super().join_key() + (self.group_size, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.mma_weight is not None and kernels.use_mma_for(x, self.group_size):
            return kernels.int4_linear_mma(x, self.mma_weight, self.mma_scales, self.mma_zeros,
                                           self.group_size, self.bias)
        if self.tg_weight is not None and kernels.use_tinygemm_for(x):
            return kernels.int4_linear_tinygemm(x, self.tg_weight, self.tg_scales_zeros, self.group_size, self.bias)
        if kernels._cpu_small(x):
            packed = self._cpu_packed()
            if packed is not None:
                k_pad = packed[1].shape[0] * self.group_size
                if k_pad != self.in_features:
                    # ragged last group: zero inputs meet the padded codes, so the sum is exact
                    x = F.pad(x, (0, k_pad - self.in_features))
                return kernels.int4_linear_cpu_packed(x, packed[0], packed[1], self.group_size, self.bias)
        return kernels.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def prepare_for_device(self) -> None:
        """On CUDA (unless ``LLMOPT_WO_KERNEL`` names another path), repack into torch's int4 layout: uint8
        [N, K/2] (even k in the high nibble) through ``torch._convert_weight_to_int4pack``, and
        scale/zero pairs [G, N, 2] in bf16 for its convention w = (q - 8) * scale + zero. The
        packed copy is used for decode-sized inputs; prefill keeps the dequantise-and-cuBLAS path.
        Where the tensor-core kernel is wanted (``kernels.mma_wanted``) and takes the shape, also
        its layout (``triton_int4_mma.pack``): a second copy of the codes, K*N/2 bytes."""
        self.tg_weight = self.tg_scales_zeros = None
        self.mma_weight = self.mma_scales = self.mma_zeros = None
        if (kernels.mma_wanted(self.group_size) and self.qweight.is_cuda and self.perm is None
                and kernels.mma_layout_fits(self.in_features, self.group_size)):
            from llmopt.quant.kernels.triton_int4_mma import pack

            codes = kernels.ref.unpack_int4_kn(self.qweight, self.in_features).t()
            self.mma_weight, self.mma_scales, self.mma_zeros = pack(codes, self.scales, self.zeros)
        if not (kernels._TINYGEMM and self.qweight.is_cuda and self.perm is None
                and kernels.tinygemm_fits(self.in_features, self.out_features, self.group_size)):
            return
        codes, scales_zeros = self._torch_int4_layout()
        u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()  # [N, K/2]
        self.tg_weight = torch._convert_weight_to_int4pack(u8, kernels.TINYGEMM_INNER_K_TILES)
        self.tg_scales_zeros = scales_zeros.to(torch.bfloat16)

    def _torch_int4_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [N, K] int32 and scale/zero pairs [G, N, 2] float32 for torch's int4 kernels (CPU
        and CUDA), whose convention is w = (q - 8) * scale + zero, with a float zero per group."""
        codes = kernels.ref.unpack_int4_kn(self.qweight, self.in_features).t().to(torch.int32)
        s = self.scales.float()
        return codes, torch.stack([s, (8 - self.zeros.float()) * s], dim=-1).contiguous()

    def weight_bytes(self) -> int:
        """Bytes a one-row decode step reads: the tinygemm copy when there is one, else the packed
        codes (the tensor-core copy, for more rows, is as large as the codes)."""
        if self.tg_weight is None:
            return sum(b.numel() * b.element_size() for b in (self.qweight, self.scales, self.zeros, self.perm)
                       if b is not None)
        return sum(b.numel() * b.element_size() for b in (self.tg_weight, self.tg_scales_zeros))

    def _cpu_packed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """torch's CPU int4 layout, built on first use and kept outside the state dict (a second,
        small copy of the codes: K*N/2 bytes). Rebuilt if the buffers are replaced. torch's kernel
        takes whole groups only, so a ragged K (576 inputs with groups of 128) is padded with
        zero codes to G * group_size; forward pads x with zeros to match."""
        cache = self.__dict__.get("_cpu_pack_cache")
        if cache is not None and cache[0] is self.qweight and cache[1] is self.scales:
            return cache[2]
        packed = None
        if hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and self.out_features % 16 == 0:
            codes, scales_zeros = self._torch_int4_layout()
            k_pad = self.scales.shape[0] * self.group_size
            codes = F.pad(codes, (0, k_pad - self.in_features))
            w = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            # in the compute dtype, so the forward casts nothing: inductor's CPU lowering of the
            # int4 matmul takes no computed (unrealised) scales, as a cast would make them
            packed = (w, scales_zeros.to(self.scales.dtype))
        self.__dict__["_cpu_pack_cache"] = (self.qweight, self.scales, packed)
        return packed

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the model's channel order."""
        w = kernels.ref.dequant_int4(self.qweight, self.scales, self.zeros, self.group_size,
                                     self.in_features, self.scales.dtype)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm.long()] = w
            return out
        return w

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, act_order={self.perm is not None}"


class NF4Linear(QuantLinear):
    """NF4 codes with block-wise absmax along K: W[n, k] = NF4[code[k, n]] * absmax[k // block, n].
    With double quantisation the absmax is stored as int8 codes + float32 block scales + mean
    and expanded each forward (a [G, N] elementwise op, 1/block of the weight's size)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64,
                 double_quant: bool = False, dq_block_size: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if in_features % 8:
            raise ValueError(f"in_features must be a multiple of 8 for 4-bit packing, got {in_features}")
        self.block_size = block_size
        self.double_quant = double_quant
        self.dq_block_size = dq_block_size
        g = num_groups(in_features, block_size)
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32, device=device))
        # the 16 levels travel with the module (not saved): the GPU kernel reads them as a tensor
        self.register_buffer("codebook", nf4_codebook().to(device), persistent=False)
        if double_quant:
            nb = -(-g * out_features // dq_block_size)
            self.register_buffer("absmax", None)
            self.register_buffer("absmax_codes", torch.zeros(g, out_features, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scales", torch.ones(nb, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.ones(g, out_features, dtype=dtype, device=device))
        # the tensor-core kernel's layout (batched decode; kernels.mma_wanted), built by prepare_for_device
        self.register_buffer("mma_weight", None, persistent=False)
        self.register_buffer("mma_absmax", None, persistent=False)

    def prepare_for_device(self) -> None:
        """On CUDA where the tensor-core kernel is wanted for NF4 (``kernels.mma_wanted``: blocks of
        64 or more under ``auto``), its layout (``triton_int4_mma.pack``): a second copy of the
        codes, absmax [N, G]. Double-quantised absmax stays on the other path."""
        self.mma_weight = self.mma_absmax = None
        if (kernels.mma_wanted(self.block_size, "nf4") and self.qweight.is_cuda and not self.double_quant
                and kernels.mma_layout_fits(self.in_features, self.block_size)):
            from llmopt.quant.kernels.triton_int4_mma import pack

            codes = kernels.ref.unpack_int4_kn(self.qweight, self.in_features).t()
            self.mma_weight, self.mma_absmax, _ = pack(codes, self.absmax, self.absmax)

    def weight_bytes(self) -> int:
        """Bytes a decode step reads: the codes, absmax and codebook (the tensor-core copy, when
        there is one, is as large)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if not name.startswith("mma_"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # built on meta for loading: the (unsaved) codebook follows the loaded codes' device
        q = state_dict.get(prefix + "qweight")
        if q is not None and self.codebook.device != q.device:
            self.codebook = nf4_codebook().to(q.device)

    SHARED = ("codebook",)

    def out_dims(self) -> dict[str, int] | None:
        # double quantisation's absmax blocks run across output features: not joined
        return None if self.double_quant else {"qweight": 1, "absmax": 1}

    def join_key(self) -> tuple[object, ...]:
        return super().join_key() + (self.block_size,)

    def current_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        dq = DoubleQuant(self.absmax_codes, self.absmax_scales, self.absmax_offset)
        return double_dequantize(dq, self.dq_block_size)  # float32 [G, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mma_weight is not None and kernels.use_mma_for(x, self.block_size, "nf4"):
            return kernels.nf4_linear_mma(x, self.mma_weight, self.mma_absmax, self.block_size,
                                          self.codebook, self.bias)
        absmax = self.current_absmax().to(x.dtype)
        return kernels.nf4_linear(x, self.qweight, absmax, self.block_size, self.bias, self.codebook)

    def dequantize(self) -> torch.Tensor:
        a = self.current_absmax()
        return kernels.ref.dequant_nf4(self.qweight, a, self.block_size, self.in_features, a.dtype, self.codebook)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.double_quant}"


class FP8Linear(QuantLinear):
    """e4m3 weight with one scale per output channel; ``mode`` "dequant" (weight-only, bf16
    compute) or "scaled_mm" (FP8 activations too, ``torch._scaled_mm``; CUDA only, CPU falls back
    to dequant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "dequant",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.mode = mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    def out_dims(self) -> dict[str, int]:
        return {"qweight": 0, "scales": 0}

    def join_key(self) -> tuple[object, ...]:
        return super().join_key() + (self.mode,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_linear(x, self.qweight, self.scales, self.bias, self.mode)

    def dequantize(self) -> torch.Tensor:
        return kernels.ref.dequant_int8(self.qweight, self.scales, self.scales.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"
