"""Run a function on N gloo ranks on this machine, for tests and CPU benchmarks.

Workers come from a forkserver that has torch preloaded, so a launch costs well under a second instead
of the 2-7 s of `spawn`. The parent owns the TCPStore (port 0, so no free-port race); each rank joins a
gloo process group through it with one intra-op thread, runs `fn(rank, world_size, *args)`, and sends
back its return value or its traceback. `fn` must be importable by name (a module-level function)."""

from __future__ import annotations

import datetime
import os
import pickle
import traceback
from typing import Any, Callable

from scaletrain.forkserver import forkserver_context


def _worker(fn, rank, world_size, port, args, env, connection) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        connection.send(("ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        connection.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        connection.close()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> list[Any]:
    """Returns [fn's result on rank 0, ..., on rank N-1]; raises with the first failing rank's traceback."""
    import torch.distributed as dist

    context = forkserver_context()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    pipes, processes = [], []
    for rank in range(world_size):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(fn, rank, world_size, store.port, args,
                                                        dict(env or {}), sender), daemon=True)
        process.start()
        sender.close()
        pipes.append(receiver)
        processes.append(process)
    results, errors = [], []
    try:
        for rank, (receiver, process) in enumerate(zip(pipes, processes)):
            if not receiver.poll(timeout):
                errors.append(f"rank {rank} produced no result within {timeout:.0f}s")
                break
            try:
                status, payload = receiver.recv()
            except EOFError:
                process.join(5)
                errors.append(f"rank {rank} died with exit code {process.exitcode}")
                continue
            if status == "ok":
                results.append(pickle.loads(payload))
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    if errors:
        raise RuntimeError(errors[0])
    return results
