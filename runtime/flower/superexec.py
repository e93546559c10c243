"""Flower's SuperExec for an institution's SuperNode, starting each ClientApp from a warm fork.

Flower 1.41's SuperNode hands every message to a new ``flwr-clientapp`` process,
which imports Flower and the ClientApp before it does anything: about 1.5 s of
CPU per message, five messages per institution per SecAgg+ round. This entry
point runs Flower's own SuperExec (same options, same task loop) with one change:
a ClientApp task runs in a process forked from a ``multiprocessing`` forkserver
that has already imported Flower's ClientApp runtime and fedsilo's ClientApp.
The child runs exactly what ``flwr-clientapp`` runs (``run_clientapp``), with the
task's token; other task types go through Flower's subprocess launcher.

The forkserver is a clean single-threaded process (no torch: training happens in
the institution's warm trainer, see ``fedsilo.client.trainer``), so forking it is safe.
Flower is imported inside functions: this module is imported again wherever a task
is unpickled, and only ``main``'s process needs Flower's SuperExec.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

from fedsilo.runtime.processes import bind_to_parent, scrub_environment

# What every ClientApp process needs; imported once, in the forkserver.
PRELOAD = ["fedsilo.client.client_app", "flwr.supernode.runtime.run_clientapp"]


def run_task(address: str, token: str, insecure: bool, root_certificates: str | None, parent_pid: int | None) -> None:
    """One ClientApp task, as ``flwr-clientapp --token TOKEN`` would run it."""
    bind_to_parent(os.getppid())  # killed with the forkserver (which ends with this SuperExec)
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def forking_executor() -> Any:
    """Flower's subprocess executor, except that ClientApp tasks fork from the warm forkserver."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)

    class ForkingExecutor(SubprocessExecutor):
        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
                return super().launch(spec)
            multiprocessing.active_children()  # reap the tasks that have finished
            task = context.Process(
                target=run_task,
                args=(
                    spec.runtime_api_address,
                    spec.token,
                    spec.insecure,
                    spec.root_certificates_path,
                    spec.parent_pid,
                ),
                name=f"clientapp-{spec.task_id}",
            )
            task.start()
            return LaunchResult.accepted()

    # Start the forkserver now, so that the first message does not wait for its imports.
    context.Process(target=_nothing).start()
    return ForkingExecutor()


def _nothing() -> None:
    """A task that does nothing (starts the forkserver)."""


def main() -> None:
    """``flower-superexec`` with the forking ClientApp launcher."""
    # Killed when the SuperNode that started it ends, however it ends (Flower's own watch of
    # --parent-pid only polls, and only if the SuperNode's pid is not reused).
    if "--parent-pid" in sys.argv[1:-1]:
        bind_to_parent(int(sys.argv[sys.argv.index("--parent-pid") + 1]))
    scrub_environment()  # Flower's internal switches, should this process have been started with them
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    if not callable(getattr(superexec, "get_executor", None)):
        raise RuntimeError("flwr's SuperExec no longer picks its executor with get_executor; review this patch")
    superexec.get_executor = lambda *args, **kwargs: forking_executor()
    flower_superexec()


if __name__ == "__main__":
    main()
