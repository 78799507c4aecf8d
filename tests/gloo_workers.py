"""Running a test's worker function on 2 CPU processes over gloo, bounded in time, on loopback only.

Shared by the DDP, FSDP2 and DeepSpeed tests. The workers write their results to files; the test process compares
them with a single-process run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# Fail in a minute rather than wait gloo's default 30 minutes when the processes cannot connect.
CONNECT_TIMEOUT = timedelta(seconds=60)
# The whole spawn (imports, connecting, training, saving) ends by then, or the workers are killed.
SPAWN_TIMEOUT_S = 300


def loopback_interface() -> str | None:
    """Gloo connects through the address the hostname resolves to; on machines where that address is
    unreachable (containers, closed CI sandboxes) it blocks forever. Loopback always works for one host."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _run(rank: int, body: Callable, init_file: str, *args) -> None:
    """One worker process: join the gloo group through a file (no port to pick, nothing reachable from outside),
    run `body(rank, *args)`, leave the group, and end without interpreter teardown.

    Seen once in a CI-like run: freeing gloo objects at interpreter exit deadlocked (a gloo thread waited for the
    GIL held by the destructor joining it). The results are on disk by then, so the teardown is skipped.
    """
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=CONNECT_TIMEOUT
    )
    try:
        body(rank, *args)
        dist.barrier()  # all collectives finished on both ranks
    finally:
        dist.destroy_process_group()
    os._exit(0)


def spawn(body: Callable, init_file: str, args: tuple, extra_env: dict[str, str] | None = None) -> None:
    """Run `body(rank, *args)` on WORLD processes joined by the (not yet existing) file `init_file`; raise the first
    worker's error, or kill them all when they have not finished within SPAWN_TIMEOUT_S."""
    if not os.path.isabs(init_file):  # file://relative/path names a host "relative" and the file /path
        raise ValueError(f"init_file must be an absolute path, got {init_file!r}")
    loopback = loopback_interface()
    with pytest.MonkeyPatch.context() as env:  # the spawned workers inherit these
        env.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        if loopback is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            env.setenv("GLOO_SOCKET_IFNAME", loopback)
        for name, value in (extra_env or {}).items():
            env.setenv(name, value)
        context = mp.start_processes(
            _run, args=(body, init_file, *args), nprocs=WORLD, join=False, start_method="spawn"
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # raises on a worker's error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


def torchrun(script: str, args: list[str], cwd: str, timeout_s: float = SPAWN_TIMEOUT_S) -> str:
    """Run `torchrun --standalone --nproc-per-node WORLD script args` (rendezvous on a free localhost port) and
    return its output; the whole process group is killed if it has not finished within `timeout_s`."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))  # the code under test
    loopback = loopback_interface()
    if loopback is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", script]
    process = subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0:
        raise AssertionError(f"{script} exited with {process.returncode}:\n{output[-6000:]}")
    return output
