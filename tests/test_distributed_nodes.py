"""ruvpy.distributed when a whole node goes: a Ray cluster of two nodes on this machine
(ray.cluster_utils.Cluster: a raylet and an object store each), one worker per node. Losing
the node loses the worker *and* the snapshots in that node's object store: the sequence is
rebuilt from the whole history the driver recorded, bit-identical to a copy taken before.
When a node with room joins again, Ray restarts the worker there and it rejoins placement."""
import logging

import numpy as np
import pytest

from _helpers import import_or_skip, require_model

ray = import_or_skip("ray", "RUVPY_REQUIRE_RAY", "pip install 'ruvpy[distributed]'")

from ray.cluster_utils import Cluster as RayCluster  # noqa: E402

from ruvpy.distributed import ALIVE, RESTARTING, Cluster  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    require_model()                 # every worker loads the model
    assert not ray.is_initialized()
    nodes = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 128 << 20})
    second = nodes.add_node(num_cpus=1, object_store_memory=128 << 20)
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    yield nodes, second
    ray.shutdown()
    nodes.shutdown()


def test_a_lost_node_loses_no_token(two_nodes, caplog):
    nodes, second = two_nodes
    caplog.set_level(logging.INFO, logger="ruvpy.distributed")
    # num_cpus=1: one worker per node, and a lost node's worker waits for a node with room
    with Cluster(2, checkpoint_every=16, max_restarts=1, max_tokens=1024,
                 worker_options={"num_cpus": 1}) as cluster:
        nodes_of = [s["node_id"] for s in cluster.stats()]
        assert sorted(nodes_of) == sorted(n["NodeID"] for n in ray.nodes())
        victim = nodes_of.index(second.node_id)
        seq = cluster.new_sequence()
        if cluster.worker_of(seq) != victim:
            cluster.migrate(seq, victim)
        ids = list(range(1000, 1100))
        cluster.forward(seq, ids[:40])                  # its snapshot: in the second node
        for token in ids[40:45]:
            cluster.forward(seq, [token])
        assert cluster.sequence_info(seq)["snapshot_position"] == 40
        # an exact copy on the first node, to compare with
        copy = cluster.import_sequence(cluster.export_sequence(seq), worker=1 - victim)

        nodes.remove_node(second)
        for token in (7, 8, 9):
            logits = cluster.forward(seq, [token])
            np.testing.assert_array_equal(logits, cluster.forward(copy, [token]))
        info = cluster.sequence_info(seq)
        assert info["worker"] == 1 - victim and info["restores"] == 1
        assert info["last_restore"] == {"worker": 1 - victim, "from_snapshot": False,
                                        "replayed_tokens": 45, "replayed_steps": 6,
                                        "seconds": info["last_restore"]["seconds"]}
        assert cluster.tokens(seq) == ids[:45] + [7, 8, 9]
        assert "snapshot is unusable" in caplog.text
        assert cluster.worker_states()[victim][0] == RESTARTING     # no node has room

        # a node with room joins: Ray restarts the worker there, empty, back in placement
        nodes.add_node(num_cpus=1, object_store_memory=128 << 20)
        assert [s for s, _ in cluster.wait_for_workers(timeout=300)] == [ALIVE, ALIVE]
        assert cluster.worker_of(cluster.new_sequence()) == victim   # the emptier one
