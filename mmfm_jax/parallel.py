"""The one device mesh every program shares: DiTDH training and sampling, EM, Inception.

* `make_mesh(cfg.mesh)` builds a `(data, fsdp)` mesh; a size of -1 means "the rest".
* Logical axis rules map logical array axes (as annotated on parameters and activations)
  to mesh axes: sharding rules as data, as in MaxText and big_vision. A run's rules are
  `config.mesh.rules` (default `LOGICAL_AXIS_RULES`); `axis_rules(rules)` makes them the
  table every sharding without explicit rules resolves through (ours and NNX's), so the
  models annotate axes and never name a table.
* `round_up`, `shard_batch_size` and `replicate_unplaced` are the batch-padding and
  "put the rest on the mesh" helpers every job shares.
* `host_to_global` / `global_to_host` move host-local numpy batches onto the mesh and back,
  also across processes.
* `initialize_distributed` starts JAX's multi-controller runtime when this is one of
  several processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device

# Logical axis name -> mesh axes (None = replicated). Parameters use "embed" for their
# model-width axis, so FSDP shards them over `fsdp`; activations use "batch".
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
LOGICAL_AXIS_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("qkv", None),
    ("tokens", None),
    ("channels", None),
    ("vocab", None),
    ("modes", BATCH_AXES),  # GMM components (K) when the accumulators are large
    ("features", None),
)
_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "mmfm_axis_rules", default=LOGICAL_AXIS_RULES)


def normalize_rules(rules) -> Rules:
    """`rules` as hashable (name, mesh axes) pairs: config.json hands them back as lists.

    Raises ValueError (one line) for an entry that is not a pair or names a mesh axis that
    is not in MESH_AXES."""
    out = []
    for entry in rules:
        if isinstance(entry, str) or len(entry) != 2:
            raise ValueError(f"rule {entry!r} is not a (logical axis, mesh axes) pair")
        name, axes = entry
        group = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in group if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"logical axis {name!r} maps to unknown mesh axis {unknown[0]!r}; "
                             f"the mesh axes are {', '.join(MESH_AXES)}")
        out.append((str(name), axes if axes is None or isinstance(axes, str) else group))
    return tuple(out)


def active_rules() -> Rules:
    """The rules of the innermost `axis_rules` (LOGICAL_AXIS_RULES outside any)."""
    return _ACTIVE_RULES.get()


@contextlib.contextmanager
def axis_rules(rules=None) -> Iterator[Rules]:
    """Resolve every sharding that names no rules through `rules` (None: the default
    table) inside the block: `logical_sharding` here and NNX's parameter metadata."""
    table = LOGICAL_AXIS_RULES if rules is None else normalize_rules(rules)
    token = _ACTIVE_RULES.set(table)
    try:
        with nnx.logical_axis_rules(table):
            yield table
    finally:
        _ACTIVE_RULES.reset(token)


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve -1 ("the rest") so that the product of sizes equals `num_devices`."""
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {unknown}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
    if unknown:
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh sizes {sizes} use {math.prod(sizes.values())} devices, "
                         f"but {num_devices} are present; set one axis to -1")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A `(data, fsdp)` mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(mesh_cfg or {"data": -1, "fsdp": 1}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry logical names (None = replicated), by
    `rules` (None: the active rules)."""
    if logical_axes is None:
        return PartitionSpec()
    table = dict(active_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        group = tuple(a for a in group if a not in used)  # a mesh axis shards one dim only
        used.update(group)
        out.append(group if len(group) > 1 else (group[0] if group else None))
    return PartitionSpec(*out)


def _fits(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (e.g. tiny test models on 8 devices)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        size = math.prod(mesh.shape[a] for a in group)
        out.append(entry if dim % size == 0 else None)
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, logical_axes, shape=None, rules: Rules | None = None):
    """NamedSharding of logical axes on `mesh`; with `shape`, mesh axes that do not divide
    a dimension leave it replicated."""
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        spec = _fits(shape, spec, mesh)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis over every device of the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (padding a batch to whole shards)."""
    return -(-int(n) // int(multiple)) * int(multiple)


def shard_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The smallest batch >= `batch_size` (and >= one row per shard) that the mesh's batch
    axes split evenly."""
    shards = num_batch_shards(mesh)
    return max(shards, round_up(batch_size, shards))


def replicate_unplaced(tree, mesh: Mesh):
    """Leaves not already on `mesh` become replicated global arrays there; placed ones stay.

    Built from a host copy with `make_array_from_callback`, so it also works when the mesh
    spans several processes (each process fills its own devices).
    """
    rep = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])
    return jax.tree.map(put, tree)


def constrain_batch(tree):
    """Inside a traced program run under `jax.sharding.use_abstract_mesh` (the train step):
    keep each leaf's leading (batch) axis split over the batch axes. A `lax.scan` over
    stacked blocks otherwise lets XLA drop the batch sharding of its carry and all-reduce
    whole-batch activations. Outside such a mesh, or for leaves whose leading axis does not
    split evenly, a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return tree
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def constrain(x):
        if x.ndim == 0 or x.shape[0] % shards:
            return x
        return jax.lax.with_sharding_constraint(
            x, PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1))))
    return jax.tree.map(constrain, tree)


def host_to_global(tree, mesh: Mesh):
    """Host-local numpy batches (this process's rows) -> global arrays split over `data`.

    Each process passes its own `global_batch / process_count` rows; the global array
    concatenates them in process order.
    """
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(put, tree)


def global_to_host(tree, *, gather: bool = False):
    """Global arrays -> numpy. `gather=False`: this process's rows, in global order;
    `gather=True`: the whole array on every process."""
    def get(x):
        if gather or jax.process_count() == 1 or x.is_fully_replicated:
            if jax.process_count() > 1 and not x.is_fully_replicated:
                from jax.experimental import multihost_utils
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        seen, rows = set(), []
        for s in shards:
            start = s.index[0].start or 0
            if start not in seen:
                seen.add(start)
                rows.append(np.asarray(s.data))
        return np.concatenate(rows, axis=0)
    return jax.tree.map(get, tree)


def process_batch_slice(global_batch: int) -> slice:
    """Rows of a global batch that belong to this process (for host-side data loading)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} not divisible by {n} processes")
    per = global_batch // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           *, timeout_s: int = 300, heartbeat_s: int | None = None) -> bool:
    """Start jax.distributed when this is one of several processes.

    Arguments fall back to the environment (`MMFM_COORDINATOR`, `MMFM_NUM_PROCESSES`,
    `MMFM_PROCESS_ID`, or SLURM's variables); on Cloud TPU VMs with several hosts JAX
    detects everything itself. Returns True when the runtime was initialised.

    `heartbeat_s` (env `MMFM_HEARTBEAT_S`, default 60) bounds how long the survivors wait
    for a dead process before they exit non-zero instead of hanging.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("MMFM_COORDINATOR")
    if num_processes is None and env.get("MMFM_NUM_PROCESSES"):
        num_processes = int(env["MMFM_NUM_PROCESSES"])
    if process_id is None and env.get("MMFM_PROCESS_ID"):
        process_id = int(env["MMFM_PROCESS_ID"])
    if num_processes is None and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        num_processes = int(env["SLURM_NTASKS"])
        process_id = int(env["SLURM_PROCID"])
    # MMFM_DISTRIBUTED=auto (launch/tpu_vm.sh): JAX's own cluster detection fills in
    # everything; Cloud TPU VM slices announce themselves through metadata, not this env.
    tpu_pod = (env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
               or env.get("MMFM_DISTRIBUTED") == "auto")
    if not tpu_pod and (num_processes is None or num_processes <= 1):
        return False
    # Cross-process CPU collectives (only the CPU client reads this). Asking for the backend
    # here would initialise it before jax.distributed, which JAX refuses.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if not tpu_pod:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_s
                               or int(env.get("MMFM_HEARTBEAT_S", "60")))
    return True


def log_topology() -> None:
    """One line per program start: processes, local and global devices."""
    logging.info("process %d/%d, %d local / %d global devices (%s), backend %s",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].device_kind, jax.default_backend())
