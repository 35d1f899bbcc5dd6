"""Ray for the curation stages: join a cluster or start an embedded local Ray, run batches on a
pool of actors in input order, and re-raise a library error raised inside Ray as itself.

The stages use Ray core (actors and tasks), not Ray Data: records travel as Python objects
(pickled by Ray), so metadata of any shape, lone surrogates and float spellings come out exactly
as they went in, and on the 2-core box Ray Data's executor with its stats, autoscaling and
location actors cost ~20-30% of a core next to the work (docs/curation.md "Engines").
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Any, Iterable, Iterator

from llmpipe.config.data import CurationSection

PICKLE = pickle.HIGHEST_PROTOCOL


@contextlib.contextmanager
def ray_session(cfg: CurationSection) -> Iterator[str]:
    """Connect to ``curation.ray_address`` (or ``$RAY_ADDRESS``), else start an embedded local
    Ray for the duration of the block. Yields a description of where the work runs."""
    import ray

    started = False
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        common = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:  # embedded: one node on this machine, its traffic on loopback
            # Ray waits 30 s for its GCS to start; a busy shared box needs longer
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
            # Ray renices its workers to 15; an embedded Ray's workers are the stage's own work,
            # at the priority of the local engine's pool workers
            os.environ.setdefault("RAY_worker_niceness", "0")
            # address="local": a new instance even if another Ray runs on this machine
            ray.init(address="local", num_cpus=cfg.num_cpus, _node_ip_address="127.0.0.1", **common)
        else:
            host = address.split("://")[-1].rsplit(":", 1)[0]
            if _is_loopback(host) and host not in ("127.0.0.1", "localhost"):
                # a cluster on a loopback address (e.g. 127.0.0.2, as the tests start): join it
                # from there. Ray itself rewrites 127.0.0.1/localhost to this machine's IP.
                common["_node_ip_address"] = host
            ray.init(address=address, **common)
        started = True
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = int(ray.cluster_resources().get("CPU", 0))
    try:
        yield f"Ray {ray.__version__}: {len(nodes)} node(s), {cpus} CPUs"
    finally:
        if started:
            ray.shutdown()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ordered_actor_map(actor_cls: type, args: tuple, items: Iterable[Any], workers: int,
                      max_in_flight: int | None = None) -> Iterator[Any]:
    """``actor(item)`` for every item, on a pool of ``workers`` Ray actors (one CPU each, built
    once with ``actor_cls(*args)``), results yielded in input order.

    ``items`` is consumed lazily and at most ``max_in_flight`` (default 2 x workers) items are
    submitted and not yet yielded, so memory is bounded by the batch, not the input. Ray core
    actors, not Ray Data: on a small box Ray Data's executor, stats and autoscaling actors cost
    ~20-30% of a core next to the work (benchmarks/results/curation_scale_pii.json).
    """
    import ray
    from ray.util import ActorPool

    remote_cls = ray.remote(num_cpus=1)(actor_cls)
    pool = ActorPool([remote_cls.remote(*args) for _ in range(max(1, workers))])
    limit = max_in_flight or 2 * max(1, workers)
    pending = 0
    for item in items:
        while pending and (pending >= limit or not pool.has_free()):
            yield pool.get_next()
            pending -= 1
        pool.submit(lambda actor, value: actor.__call__.remote(value), item)
        pending += 1
    while pending:
        yield pool.get_next()
        pending -= 1


def unwrap(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in the chain of a Ray error (task errors wrap the
    library's own error, e.g. DedupError, which the stage reports as usual)."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    found = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            found.append(e)
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    plain = [e for e in found if not isinstance(e, RayError)]  # the original, not Ray's wrapper
    return (plain or found or [None])[0]


@contextlib.contextmanager
def library_errors(*types: type[BaseException]) -> Iterator[None]:
    """Re-raise a library error raised inside a Ray task as itself."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it wraps one of types
        inner = unwrap(exc, types)
        if inner is None or inner is exc:
            raise
        raise inner from None
