"""The two collectives tensor parallelism needs: sum across ranks, gather along the last axis.

Three all-reduce paths, chosen once per model:
- eager ``torch.distributed.all_reduce`` (in place; NCCL or gloo);
- functional collectives while ``torch.compile`` traces, so the reduction becomes a graph node
  that lands inside the CUDA graph with the rest of the decode step;
- PyTorch symmetric memory (``torch.ops.symm_mem`` one-shot or two-shot, GPU only): each rank
  reads its peers' buffers over NVLink directly, which beats NCCL's protocol overhead for the
  few-KB messages of batch-1 decode. Multicast (NVLS) variants are never used.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

log = logging.getLogger(__name__)

# Elements of the symmetric buffer: decode messages are [batch, 1, hidden]; bigger ones (prefill)
# fall back to NCCL, where bandwidth rather than latency decides.
DEFAULT_SYMM_NUMEL = 1 << 20


class TPComm:
    """Collectives over one group; a module hook holds it and calls it in forward."""

    def __init__(self, group: Any, rank: int, world_size: int, backend: str) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.mode = "nccl" if backend == "nccl" else backend
        self._buf: torch.Tensor | None = None  # [numel] symmetric buffer
        self._group_name = ""
        self._one_shot_copy = False
        self._two_shot_out = False
        self._active = False  # symmetric-memory path on

    # -- symmetric memory -----------------------------------------------------------------------
    def enable_symm_mem(
        self, mode: str, dtype: torch.dtype, device: torch.device, numel: int = DEFAULT_SYMM_NUMEL
    ) -> None:
        """Allocate and rendezvous the symmetric buffer (a collective: every rank calls it)."""
        import torch.distributed._symmetric_memory as symm_mem

        assert mode in ("symm-one-shot", "symm-two-shot"), mode
        if self._buf is not None and self._buf.dtype == dtype and self._buf.numel() >= numel:
            self.mode, self._active = mode, True  # reuse: rendezvous happens once per buffer
            return
        self._group_name = self.group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before rendezvous on older torch; a no-op warning on newer
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(self._group_name)
        buf = symm_mem.empty(numel, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, self._group_name)
        ops = torch.ops.symm_mem
        self._one_shot_copy = hasattr(ops, "one_shot_all_reduce_copy")
        self._two_shot_out = hasattr(ops, "two_shot_all_reduce_out")
        try:
            # Compiled graphs (cudagraph trees) then use the buffer in place instead of copying
            # it into graph-owned memory, which would not be symmetric.
            torch._dynamo.mark_static_address(buf)
        except Exception as e:  # older torch: eager and manual CUDA graphs still work
            log.debug("mark_static_address: %s", e)
        self._buf = buf
        self.mode, self._active = mode, True
        log.info("symmetric-memory all-reduce (%s), %d elements of %s", mode, numel, dtype)

    def enable_inductor_symm_mem(self, threshold_bytes: int = 256 * 1024) -> bool:
        """Let inductor lower compiled all-reduces of small tensors to one-shot symmetric-memory
        kernels, writing the producing kernel's output straight into symmetric memory (no copy).
        Only affects compiled code; returns False when this torch has no such option."""
        import torch._inductor.config as inductor_config
        import torch.distributed._symmetric_memory as symm_mem

        coll = getattr(inductor_config, "_collective", None)
        if coll is None or not hasattr(coll, "auto_select"):
            return False
        coll.auto_select = True
        coll.one_shot_all_reduce_threshold_bytes = threshold_bytes
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(self.group.group_name)
        self.mode, self._active = "symm-inductor", False
        return True

    def disable_symm_mem(self) -> None:
        """Back to NCCL (the buffer stays allocated for a later ``enable_symm_mem``)."""
        if self.mode == "symm-inductor":
            import torch._inductor.config as inductor_config

            inductor_config._collective.auto_select = False
        self.mode = "nccl" if self.backend == "nccl" else self.backend
        self._active = False

    def _symm_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        assert self._buf is not None
        n = x.numel()
        buf = self._buf[:n]  # [n] view into the symmetric allocation (offset is allowed)
        flat = x.reshape(-1)
        ops = torch.ops.symm_mem
        if self.mode == "symm-one-shot":
            if self._one_shot_copy:
                out = ops.one_shot_all_reduce_copy(buf, flat, "sum", self._group_name)
            else:
                buf.copy_(flat)
                out = ops.one_shot_all_reduce(buf, "sum", self._group_name)
        else:
            buf.copy_(flat)
            if self._two_shot_out:
                out = torch.empty_like(flat)
                ops.two_shot_all_reduce_out(buf, "sum", self._group_name, out)
            else:
                # In place on the shared buffer: copy out before the next reduction reuses it.
                out = ops.two_shot_all_reduce_(buf, "sum", self._group_name).clone()
        return out.view(x.shape)

    def _use_symm(self, x: torch.Tensor) -> bool:
        buf = self._buf
        return (
            self._active and buf is not None and x.dtype == buf.dtype and x.numel() <= buf.numel()
        )

    # -- the collectives ------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (may reuse ``x``'s storage)."""
        if self.world_size == 1:
            return x
        if self._use_symm(x):
            return self._symm_all_reduce(x)
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last axis, rank 0 first: [..., N * x.shape[-1]]."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        # Gather along a new leading axis, then move it next to the last: gathering along the last
        # axis directly makes funcol call a helper dynamo refuses to trace (torch 2.11).
        if torch.compiler.is_compiling():
            out = funcol.all_gather_tensor(x, 0, self.group).view(self.world_size, *x.shape)
        elif self.backend == "nccl":
            out = x.new_empty((self.world_size, *x.shape))  # [N, ..., C]
            dist.all_gather_into_tensor(out, x, group=self.group)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x, group=self.group)
            return torch.cat(parts, dim=-1)
        return out.movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])
