"""The Ray settings olrec's clusters run with, in one place.

Ray reads its ``RAY_*`` variables when each of its processes starts, and a
node's workers inherit the raylet's environment. A cluster olrec starts itself
(:func:`init_ray`) takes them from the driver; a cluster started by hand needs
them on every node, so ``cluster/start-local.sh``, ``cluster/ray-up/*.yaml``
and the ``k8s/`` manifests set the same values (``tests/test_cluster_files.py``
and ``tests/test_k8s.py`` hold them to :data:`ENV`).
"""

from __future__ import annotations

import os
from typing import Any

#: Objects up to 4 MiB travel inside the call that carries them instead of
#: through the node's object store (Ray's default limit is 100 KiB). A
#: training batch's rows from each shard and its gradients back (0.1 to 0.5
#: MiB), and the log's chunks on their way to the workers, are that size: each
#: trip through the object store costs a create, a seal, a fetch and a release
#: in the raylet. bench/train.py, 2 workers + 2 shards on 2 cores: about 1.2x
#: the events/s.
CORE_ENV = {"RAY_max_direct_call_object_size": str(4 * 1024 * 1024)}

#: Serve, for a loaded small machine: gRPC messages up to 4 MiB (larger:
#: RESOURCE_EXHAUSTED); a router asks a replica for its queue length before
#: sending it a request and by default gives up after 0.1 s and backs off, but
#: with trainers on the same two cores a busy replica answers later than that.
SERVE_ENV = {
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(4 * 1024 * 1024),
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2.0",
}

ENV = {**CORE_ENV, **SERVE_ENV}


def apply_env() -> None:
    """Put :data:`ENV` in this process's environment (for the cluster it starts
    and its own Ray core), leaving alone any variable already set: the
    caller's value wins."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)


def init_ray(num_cpus: int, **kwargs: Any) -> Any:
    """Connect to the cluster in ``$RAY_ADDRESS`` (as ``ray job submit`` sets
    it), else start a local one with ``num_cpus`` logical CPUs and :data:`ENV`.
    ``kwargs`` go to ``ray.init`` for a local cluster only."""
    import ray

    apply_env()
    if os.environ.get("RAY_ADDRESS"):
        return ray.init(log_to_driver=False)
    return ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, **kwargs)
