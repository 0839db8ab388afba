"""``--tp N``: start N ranks of the same command on this machine, or join torchrun's ranks.

``maybe_launch(args)`` is the one call a subcommand makes before loading a model:
- ``None``: carry on in this process (``--tp 1``, or this process already is a rank);
- an int: this process started the ranks, they have finished, return that exit code.

The launcher watches its ranks: when one exits with an error it stops the others at once (they
would otherwise wait in a collective until the timeout) and says which rank failed. Rank 0 keeps
stdout and stdin; the other ranks' stdout is discarded; every rank's stderr (its errors and
logs, labelled by rank) reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from llmopt.errors import UserError
from llmopt.parallel.process_group import (
    LAUNCHER_PID_ENV,
    check_tp_request,
    force_env,
    rank_env,
    wants_gpu,
)

log = logging.getLogger(__name__)

_GRACE_S = 5.0  # how long a stopped rank gets to exit before it is killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_model_for_tp(model_spec: str, tp: int) -> None:
    """Heads and sizes must split ``tp`` ways: checked once, before any rank starts.

    For a known model name this also converts it into the cache here, once, instead of N ranks
    racing to convert it.
    """
    from llmopt.parallel.loading import model_config_for
    from llmopt.parallel.sharding import validate_config

    validate_config(model_config_for(model_spec), tp)


def maybe_launch(args: argparse.Namespace, stdin_data: str | None = None) -> int | None:
    """Start ``args.tp`` ranks running this same command, unless that is not needed (None).

    ``args`` needs ``tp``, ``device`` and ``model``; ``args._argv`` (set by ``cli.main``) is the
    command line to repeat (default ``sys.argv[1:]``). ``stdin_data``: text already read from
    stdin, handed to rank 0's stdin.
    """
    tp = getattr(args, "tp", 1)
    device = getattr(args, "device", "auto")
    env = rank_env()
    if env is not None:
        if env.world_size != tp:
            raise UserError(
                f"the launcher started {env.world_size} rank(s) (WORLD_SIZE) but --tp is {tp}; "
                "they must match"
            )
        return None
    check_tp_request(tp, device)
    if tp == 1:
        return None
    if getattr(args, "tp_allreduce", "auto") not in ("auto", "nccl") and not wants_gpu(device):
        raise UserError(
            f"--tp-allreduce {args.tp_allreduce} needs GPUs (symmetric memory is CUDA-only)"
        )
    model = getattr(args, "model", None)
    if model:
        check_model_for_tp(model, tp)
    argv = getattr(args, "_argv", None)
    argv = list(sys.argv[1:] if argv is None else argv)
    return launch_ranks([sys.executable, "-m", "llmopt", *argv], tp, stdin_data=stdin_data)


def _rank_environ(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    force_env(env)
    return env


def _feed(proc: subprocess.Popen[str], data: str) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the rank died before reading; the monitor reports it


def _stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal S -> 128 + S, as a shell reports it


def launch_ranks(cmd: Sequence[str], world_size: int, stdin_data: str | None = None) -> int:
    """Run ``cmd`` as ranks 0..world_size-1 of one group on this machine; returns an exit code."""
    port = free_port()
    procs: list[subprocess.Popen[str]] = []
    try:
        for rank in range(world_size):
            if rank == 0:
                stdin = subprocess.PIPE if stdin_data is not None else None
                stdout = None
            else:
                stdin, stdout = subprocess.DEVNULL, subprocess.DEVNULL
            p = subprocess.Popen(
                list(cmd),
                env=_rank_environ(rank, world_size, port),
                stdin=stdin,
                stdout=stdout,
                text=True,
            )
            procs.append(p)
        if stdin_data is not None:
            threading.Thread(target=_feed, args=(procs[0], stdin_data), daemon=True).start()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                if code != 2:  # 2: the rank already printed its user error
                    log.error(
                        "rank %d of %d exited with code %d; stopping the other ranks",
                        rank,
                        world_size,
                        code,
                    )
                _stop(procs)
                return _exit_code(code)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        _stop(procs)
