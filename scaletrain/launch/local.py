"""Local multi-process runs through torch's elastic agent, and the equivalent torchrun command.

The agent rendezvous on localhost at a free port, starts nproc_per_node workers (`scaletrain train` again,
see command.py) with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, and when one dies it stops the
others and starts the whole group again, up to max_restarts times. Every restart auto-resumes from the
latest complete checkpoint in the shared run folder."""

from __future__ import annotations

import os
import signal
import socket
import sys
import uuid
from typing import Sequence

from scaletrain.configs.schema import LaunchConfig
from scaletrain.errors import REQUEUE_EXIT_CODE
from scaletrain.launch.command import shell_join, worker_overrides

# The agent forwards these to the workers; the trainer saves on USR1/TERM and exits with REQUEUE_EXIT_CODE.
_FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"  # USR2: submitit's preemption
_SHUTDOWN_TIMEOUT_S = 60  # how long a signalled worker may take to save before the agent SIGKILLs it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def worker_environment(nproc: int) -> dict[str, str]:
    """Share the cores: without this every worker starts one intra-op thread per core and they thrash."""
    threads = max((os.cpu_count() or 1) // nproc, 1)
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}


def run_elastic(launcher: LaunchConfig, worker_argv: Sequence[str], run_dir: str) -> int:
    """Starts nproc_per_node copies of worker_argv (`scaletrain train ...`, see command.train_argv) and
    returns 0, the first failed rank's exit code once no restarts are left, or REQUEUE_EXIT_CODE after a
    forwarded USR1/USR2/TERM."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig as ElasticConfig

    argv = list(worker_argv)
    port = free_port()
    config = ElasticConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=launcher.nproc_per_node,
        run_id=f"scaletrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"localhost:{port}", rdzv_configs={"is_host": True},
        max_restarts=launcher.max_restarts, monitor_interval=0.5,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run_dir, "elastic")),
        signals_to_handle=_FORWARDED_SIGNALS, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    print(f"[launch] {launcher.nproc_per_node} local workers, rendezvous localhost:{port}, "
          f"max_restarts={launcher.max_restarts}: {shell_join(argv)}", flush=True)
    os.environ.update(worker_environment(launcher.nproc_per_node))
    # With the agent's TCPStore shared (torch's default for c10d), a restarted group meets the previous
    # attempt's keys in the same store and gloo dials dead ranks' addresses ("connectFullMesh failed").
    # Unshared, every attempt gets a fresh store hosted by its rank 0.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # The agent installs its own handlers for the forwarded signals and leaves them: give the caller's back
    # (an in-process caller, `scaletrain eval --tp` say, would otherwise raise the agent's exception on its
    # next SIGTERM instead of running its own handler).
    forwarded = [getattr(signal, name) for name in _FORWARDED_SIGNALS.split(",")]
    previous = {signum: signal.getsignal(signum) for signum in forwarded}
    try:
        return _run_agent(config, argv, launcher)
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python; nothing to give back
                signal.signal(signum, handler)


def _run_agent(config, argv: list[str], launcher: LaunchConfig) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, entrypoint=argv[0])(*argv[1:])
    except ChildFailedError as error:
        # The root cause: a worker killed by a signal (OOM killer, kill -9) before one that raised because a
        # peer vanished mid-collective; the agent may observe the latter first. Then the earliest.
        rank, failure = min(error.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp))
        print(f"[launch] rank {rank} failed with exit code {failure.exitcode} and no restarts were left "
              f"(launcher.max_restarts={launcher.max_restarts})", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:
        # The agent passed the signal on; on a stop signal the trainer saves and asks for a requeue.
        if error.sigval in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            return REQUEUE_EXIT_CODE
        return 128 + int(error.sigval)
    return 0


def torchrun_command(launcher: LaunchConfig, overrides: Sequence[str], run_dir: str) -> str:
    """The same workers started by `torchrun` (on every node of a multi-node run: the rendezvous id and
    endpoint tie the nodes together; $MASTER_ADDR is left for the node's shell to expand)."""
    if launcher.nodes == 1:
        options = ["--standalone"]
    else:
        options = [f"--nnodes={launcher.nodes}", "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:29500",
                   f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    options += [f"--nproc-per-node={launcher.nproc_per_node}", f"--max-restarts={launcher.max_restarts}"]
    return " ".join(["torchrun", *options, "-m", "scaletrain.cli", "train",
                     shell_join(worker_overrides(overrides, run_dir))])
