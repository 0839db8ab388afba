"""The tensor-parallel process group: who am I, which device, which backend, and clean failure.

Ranks are started either by llmopt's own launcher (``--tp N`` on one machine, see ``launch.py``)
or by torchrun (one node or several). Both set the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` variables, so a rank never needs to know who started it.
NCCL joins ranks on GPUs (device ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llmopt.devices import release_cuda_graphs
from llmopt.errors import UserError

log = logging.getLogger(__name__)

# The lent GPU machines require NVLink multicast (NVLS) to stay off: NCCL must not build NVLS
# rings and symmetric memory (CUDA or NVSHMEM backend) must not map multicast objects. Forced in
# every rank's environment.
FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

LAUNCHER_PID_ENV = "LLMOPT_LAUNCHER_PID"  # set by launch.py; ranks exit if that process dies
TIMEOUT_ENV = "LLMOPT_DIST_TIMEOUT"  # seconds a collective may wait before the rank gives up
DEFAULT_TIMEOUT_S = 600.0  # long enough for a cold compile of a 70B decode step on one rank

ALLREDUCE_MODES = ("auto", "nccl", "symm-one-shot", "symm-two-shot")


def resolve_allreduce(mode: str, device: torch.device) -> str:
    """``auto``: symmetric-memory one-shot on GPUs (measured on 2 H200s under regional
    compilation: 286.2 against 253.5 tok/s with NCCL at 7B, 197.9 against 176.8 at 13B), the
    process group's own all-reduce (NCCL, or gloo on CPU) elsewhere."""
    if mode != "auto":
        return mode
    return "symm-one-shot" if device.type == "cuda" else "nccl"


def force_env(env: dict[str, str] | None = None) -> None:
    """Put ``FORCED_ENV`` into ``env`` (default: this process's environment)."""
    target: Any = os.environ if env is None else env
    for k, v in FORCED_ENV.items():
        target[k] = v


@dataclass(frozen=True)
class RankEnv:
    """The launcher variables of one rank (torchrun's names)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, env: dict[str, str] | None = None) -> RankEnv | None:
        """None when this process was not started as a rank (no ``WORLD_SIZE``)."""
        env = dict(os.environ) if env is None else env
        if "WORLD_SIZE" not in env:
            return None

        def read(name: str, default: int | None = None) -> int:
            raw = env.get(name)
            if raw is None:
                if default is None:
                    raise UserError(f"launcher environment has WORLD_SIZE but no {name}")
                return default
            try:
                return int(raw)
            except ValueError:
                raise UserError(
                    f"launcher environment variable {name}={raw!r} is not an integer"
                ) from None

        world = read("WORLD_SIZE")
        rank = read("RANK")
        local_rank = read("LOCAL_RANK", rank)
        local_world = read("LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world:
            raise UserError(
                f"launcher environment is inconsistent: RANK={rank}, WORLD_SIZE={world}"
            )
        if not 0 <= local_rank < local_world:
            raise UserError(
                f"launcher environment is inconsistent: LOCAL_RANK={local_rank}, "
                f"LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank, world, local_rank, local_world)


def rank_env() -> RankEnv | None:
    return RankEnv.from_environ()


def rank_index() -> int:
    """This process's rank (0 outside any launched group)."""
    env = rank_env()
    return 0 if env is None else env.rank


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_gpu(device_spec: str) -> bool:
    spec = device_spec.strip().lower()
    if spec == "auto":
        return _gpu_count() > 0
    return spec.startswith("cuda")


def check_tp_request(tp: int, device_spec: str, local_world_size: int | None = None) -> None:
    """Reject impossible requests before any rank starts: one clear line each."""
    if not isinstance(tp, int) or tp < 1:
        raise UserError(f"--tp must be a positive integer, got {tp!r}")
    spec = device_spec.strip().lower()
    if spec not in ("auto", "cpu", "cuda") and not spec.startswith("cuda:"):
        raise UserError(f"unknown device {device_spec!r}; use auto, cpu or cuda with --tp")
    if tp == 1:
        return
    if spec.startswith("cuda:"):
        raise UserError(
            f"--device {device_spec} names one GPU, but --tp {tp} needs one per rank: use --device cuda "
            "(rank i uses cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose GPUs"
        )
    if wants_gpu(spec):
        n = _gpu_count()
        per_node = local_world_size if local_world_size is not None else tp
        if n == 0:
            raise UserError(
                f"--tp {tp} on GPUs asked for, but CUDA is not available on this machine"
            )
        if per_node > n:
            raise UserError(
                f"--tp {tp} needs {per_node} GPUs on this machine but only {n} are present "
                "(use torchrun across several nodes, or a smaller --tp)"
            )


@dataclass
class TPContext:
    """One rank's view of the tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any  # torch.distributed.ProcessGroup (its type moved between torch versions)
    allreduce: str = "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (prompts, seeds: small host objects)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)


_CURRENT: TPContext | None = None


def current_tp() -> TPContext | None:
    return _CURRENT


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return timedelta(seconds=seconds)


def _rank_device(device_spec: str, env: RankEnv) -> torch.device:
    spec = device_spec.strip().lower()
    if wants_gpu(spec):
        n = _gpu_count()
        if env.local_rank >= n:
            raise UserError(
                f"rank {env.rank} has LOCAL_RANK {env.local_rank} but this machine has only {n} GPU(s)"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _label_logs(rank: int) -> None:
    # Every rank logs to the same terminal: say which one is talking.
    fmt = logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)


_WATCH_STOP = threading.Event()
_WATCHER: threading.Thread | None = None


def _watch_launcher(pid: int) -> None:
    """Exit when the launcher is gone, so no rank outlives a killed ``llmopt --tp`` process.
    ``shutdown_tp`` stops and joins the thread: a daemon thread still running at interpreter
    exit is ended by a forced unwind, which aborted ranks ("terminate called without an active
    exception") now and then."""
    global _WATCHER

    def watch() -> None:
        while not _WATCH_STOP.wait(1.0):
            if os.getppid() != pid:
                log.error("the launcher (pid %d) is gone; this rank stops", pid)
                os._exit(1)

    _WATCH_STOP.clear()
    _WATCHER = threading.Thread(target=watch, name="llmopt-launcher-watch", daemon=True)
    _WATCHER.start()


def init_tp(tp: int, device_spec: str = "auto", allreduce: str = "nccl") -> TPContext:
    """Join the group described by the launcher environment; returns this rank's context.

    Raises ``UserError`` when the environment does not match ``tp`` (e.g. torchrun started a
    different number of ranks than ``--tp`` says).
    """
    global _CURRENT
    if _CURRENT is not None:
        if _CURRENT.world_size != tp:
            raise UserError(
                f"already in a tensor-parallel group of {_CURRENT.world_size}, asked for {tp}"
            )
        return _CURRENT
    if allreduce not in ALLREDUCE_MODES:
        raise UserError(f"unknown all-reduce {allreduce!r}; known: {', '.join(ALLREDUCE_MODES)}")
    env = rank_env()
    if env is None:
        raise UserError(
            f"--tp {tp} inside a process that no launcher started (no WORLD_SIZE in the environment)"
        )
    if env.world_size != tp:
        raise UserError(
            f"the launcher started {env.world_size} rank(s) but --tp is {tp}; they must match"
        )
    check_tp_request(tp, device_spec, env.local_world_size)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(
                f"launcher environment lacks {name} (start ranks with torchrun or --tp)"
            )
    force_env()
    device = _rank_device(device_spec, env)
    allreduce = resolve_allreduce(allreduce, device)
    if allreduce != "nccl" and device.type != "cuda":
        raise UserError(f"--tp-allreduce {allreduce} needs GPUs (symmetric memory is CUDA-only)")
    _label_logs(env.rank)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and launcher.isdigit():
        _watch_launcher(int(launcher))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Eager communicator creation: a missing peer fails here, at start-up, not mid-decode.
        kwargs["device_id"] = device
    else:
        # Ranks share the CPU cores: one thread each avoids N-fold oversubscription.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size, timeout=_timeout(), **kwargs
    )
    group = dist.group.WORLD
    _CURRENT = TPContext(
        env.rank, env.world_size, env.local_rank, device, backend, group, allreduce
    )
    atexit.register(shutdown_tp)
    log.info("rank %d/%d on %s (%s)", env.rank, env.world_size, device, backend)
    return _CURRENT


def shutdown_tp(barrier: bool = False) -> None:
    """Leave the group. ``barrier=True`` (a rank that finished cleanly) first waits for the
    others: rank 0 hosts the rendezvous store, and tearing it down while a peer still talks to it
    aborted rank 0 now and then. The atexit call (also after errors) does not wait, so a failed
    rank never blocks on peers stuck in a collective; the launcher stops those."""
    global _CURRENT, _WATCHER
    if _WATCHER is not None:
        _WATCH_STOP.set()
        _WATCHER.join()
        _WATCHER = None
    if _CURRENT is None:
        return
    _CURRENT = None
    if dist.is_available() and dist.is_initialized():
        try:
            store, rank, world = None, dist.get_rank(), dist.get_world_size()
            if barrier:  # (not after a failure: a failed rank's peers may never finish)
                store = dist.distributed_c10d._get_default_store()
                _store_barrier(store, world, _timeout().total_seconds())
                log.info("rank %d: every rank finished; leaving the group", rank)
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            n = release_cuda_graphs()  # graphs that captured collectives would block the destroy
            log.info("rank %d: %d CUDA graphs (and compile's graph trees) released", rank, n)
            dist.destroy_process_group()
            log.info("rank %d: group destroyed", rank)
            if store is not None and world > 1:
                _leave_in_order(store, rank, world)
        except Exception as e:  # a peer already gone: nothing more to release
            log.debug("destroy_process_group: %s", e)


def _store_barrier(store: Any, world: int, timeout_s: float) -> None:
    """Wait until every rank got here, on the rendezvous store (TCP, host side) rather than with
    a collective: a GPU barrier queues one more NCCL operation behind whatever the ranks left on
    their communicators, and on 2 H200s a TP=2 run that had served and then passed a device
    synchronize still never got past the shutdown (bench/results/tp/h200x2_s10d/tests.log)."""
    key = "llmopt/finished"
    store.add(key, 1)
    if not _wait_for_count(store, key, world, timeout_s):
        log.warning("not every rank finished within %.0f s; leaving the group anyway", timeout_s)


def _wait_for_count(store: Any, key: str, count: int, timeout_s: float) -> bool:
    """Poll the store's counter ``key`` until it reaches ``count``; False once ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _leave_in_order(store: Any, rank: int, world: int, timeout_s: float = 30.0) -> None:
    """Rank 0 hosts the rendezvous store: it waits until every peer has torn its group down
    before it exits and closes the store. Peers still tearing down while the store vanished
    aborted now and then ("terminate called without an active exception", exit 134)."""
    key = "llmopt/left"
    if rank != 0:
        store.add(key, 1)
        return
    _wait_for_count(store, key, world - 1, timeout_s)
