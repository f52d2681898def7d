"""dask.distributed plumbing shared by the stages: connect, load once per worker, run tasks.

`--scheduler` takes either
    ADDRESS    an existing scheduler (`tcp://host:8786`, started with `dask scheduler`); its
               workers (`dask worker ADDRESS`) must import this project and see the store path
    local:N    a LocalCluster of N worker processes on this machine, one thread each

Tasks are plain module-level functions that return small values; anything heavy (a model, a
data source) is built once per worker by a `LoadOnce` plugin and looked up with `loaded(name)`.
A task whose worker dies is re-run elsewhere by the scheduler; a task that raises is retried
`retries` times. Tasks must therefore be idempotent: each writes only its own block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from stages.progress import progress_bar
from store.errors import UserError

try:  # the base class makes register_plugin treat it as a worker plugin
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object  # type: ignore[assignment,misc]

LOCAL = re.compile(r"local:(\d+)")
CONNECT_TIMEOUT = "15s"


def check_scheduler(spec: str) -> str:
    """The spec itself when it is local:N (N >= 1) or looks like an address; else a UserError."""
    spec = spec.strip()
    local = LOCAL.fullmatch(spec)
    if local and int(local.group(1)) >= 1:
        return spec
    if spec.startswith("local") or not spec or any(c.isspace() for c in spec):
        raise UserError(
            f"--scheduler must be a scheduler address (tcp://host:8786) or local:N with "
            f"N >= 1 workers, got {spec!r}"
        )
    return spec


@contextmanager
def connect(scheduler: str) -> Iterator[Any]:
    """A distributed Client for the spec; a local:N cluster is closed on exit."""
    from distributed import Client, LocalCluster

    scheduler = check_scheduler(scheduler)
    local = LOCAL.fullmatch(scheduler)
    if local:
        cluster = LocalCluster(
            n_workers=int(local.group(1)),
            threads_per_worker=1,  # one model and one task per process
            processes=True,
            dashboard_address=None,
        )
        with cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as err:
        raise UserError(
            f"cannot reach the dask scheduler at {scheduler} ({type(err).__name__}: {err}); "
            "start one with `dask scheduler` and workers with `dask worker ADDRESS`, "
            "or use --scheduler local:N"
        ) from err
    with client:
        if not client.scheduler_info().get("workers"):
            try:
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except TimeoutError as err:
                raise UserError(
                    f"the dask scheduler at {scheduler} has no workers; start some with "
                    f"`dask worker {scheduler}`"
                ) from err
        yield client


class LoadOnce(WorkerPlugin):
    """Builds `build(*args)` once on every worker (also on workers that join or restart later)
    and keeps it until the plugin is unregistered: the model is loaded once, not per task."""

    def __init__(self, name: str, build: Callable[..., Any], *args: Any):
        self.name, self.build, self.args = name, build, args
        self.value: Any = None

    def setup(self, worker) -> None:
        self.value = self.build(*self.args)

    def teardown(self, worker) -> None:
        self.value = None  # frees the model on a long-lived cluster


def loaded(name: str) -> Any:
    """Inside a task: what the LoadOnce plugin `name` built on this worker."""
    from distributed import get_worker

    plugin = get_worker().plugins.get(name)
    if plugin is None or plugin.value is None:
        raise RuntimeError(f"worker plugin {name!r} is not set up on this worker")
    return plugin.value


@contextmanager
def plugin(client, name: str, build: Callable[..., Any], *args: Any) -> Iterator[str]:
    """Register a LoadOnce plugin for the duration of the block (errors in its setup, such as
    a UserError from loading the model, are raised here, on the client)."""
    client.register_plugin(LoadOnce(name, build, *args), name=name)
    try:
        yield name
    finally:
        with suppress(Exception):  # the cluster may already be gone; nothing to free then
            client.unregister_worker_plugin(name)


def run_tasks(
    client,
    fn: Callable[..., Any],
    items: Sequence[Any],
    *extra: Any,
    desc: str,
    unit: str,
    weights: Sequence[int] | None = None,
    retries: int = 2,
    progress: bool = True,
) -> list[Any]:
    """fn(item, *extra) for every item on the cluster; results in the order of `items`.

    A progress bar advances by each item's weight as tasks finish. The first failing task
    (after its retries) cancels the rest and its exception is raised here."""
    from distributed import as_completed

    weights = list(weights) if weights is not None else [1] * len(items)
    futures = client.map(fn, list(items), *[[e] * len(items) for e in extra], pure=False,
                         retries=retries)  # fmt: skip
    position = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(items)
    bar = progress_bar(total=sum(weights), desc=desc, unit=unit, enabled=progress)
    with bar:
        try:
            for future in as_completed(futures):
                i = position[future.key]
                results[i] = future.result()
                bar.update(weights[i])
        except BaseException:
            client.cancel(futures)
            raise
    return results
