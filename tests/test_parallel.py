"""The shared mesh on 8 fake CPU devices: sizes, sharding rules, host <-> global arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmfm_jax import parallel


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1, "fsdp": 1}, {"data": 8, "fsdp": 1}),
    ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4}),
    ({"data": -1, "fsdp": 2}, {"data": 4, "fsdp": 2}),
    ({"data": 8}, {"data": 8, "fsdp": 1}),
])
def test_mesh_sizes_resolve_the_rest(sizes, expected):
    mesh = parallel.make_mesh(sizes)
    assert dict(mesh.shape) == expected


@pytest.mark.parametrize("sizes", [{"data": 3, "fsdp": -1}, {"data": -1, "fsdp": -1},
                                   {"data": 2, "fsdp": 2}])
def test_bad_mesh_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="mesh"):
        parallel.make_mesh(sizes)


def test_logical_rules_map_axes():
    assert parallel.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", None)
    assert parallel.logical_to_spec(None) == P()
    # a mesh axis shards one array dimension at most
    assert parallel.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)


def test_logical_sharding_replicates_dims_that_do_not_divide():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    assert parallel.logical_sharding(mesh, ("embed", "mlp"), shape=(64, 3)).spec == P("fsdp", None)
    assert parallel.logical_sharding(mesh, ("embed", "mlp"), shape=(6, 3)).spec == P(None, None)


def test_host_to_global_and_back_roundtrip():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "label": np.arange(16, dtype=np.int32)}
    arrays = parallel.host_to_global(batch, mesh)
    assert arrays["image"].shape == (16, 3)
    assert len(arrays["image"].sharding.device_set) == 8
    assert arrays["image"].addressable_shards[0].data.shape == (2, 3)
    back = parallel.global_to_host(arrays)
    np.testing.assert_array_equal(back["image"], batch["image"])
    np.testing.assert_array_equal(back["label"], batch["label"])
    # a sharded computation returns to the same host values
    doubled = jax.jit(lambda x: 2 * x)(arrays["image"])
    np.testing.assert_array_equal(parallel.global_to_host(doubled, gather=True),
                                  2 * batch["image"])


def test_fsdp_sharded_matmul_equals_replicated():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    w_sharded = jax.device_put(w, parallel.logical_sharding(mesh, ("embed", "mlp"), w.shape))
    x_sharded = parallel.host_to_global(x, mesh)
    out = jax.jit(jnp.dot, out_shardings=parallel.batch_sharding(mesh, 2))(x_sharded, w_sharded)
    np.testing.assert_allclose(np.asarray(out), x @ w, rtol=1e-6, atol=1e-6)


def test_process_batch_slice_single_process():
    assert parallel.process_batch_slice(16) == slice(0, 16)


def test_distributed_not_initialised_for_one_process(monkeypatch):
    for var in ("MMFM_NUM_PROCESSES", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False


def test_axis_rules_set_the_default_table_inside_the_block_only():
    assert parallel.active_rules() == parallel.LOGICAL_AXIS_RULES
    as_json = [["batch", ["data", "fsdp"]], ["embed", None], ["mlp", "fsdp"]]  # config.json
    with parallel.axis_rules(as_json) as rules:
        assert rules == (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "fsdp"))
        assert parallel.active_rules() == rules
        assert parallel.logical_to_spec(("embed", "mlp")) == P(None, "fsdp")
        # explicit rules still win
        assert parallel.logical_to_spec(("embed", "mlp"),
                                        parallel.LOGICAL_AXIS_RULES) == P("fsdp", None)
    assert parallel.logical_to_spec(("embed", "mlp")) == P("fsdp", None)


def test_axis_rules_refuse_an_unknown_mesh_axis():
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        parallel.normalize_rules([("embed", "model")])
    with pytest.raises(ValueError, match="not a .* pair"):
        parallel.normalize_rules(["embed"])
