"""A two-node local Ray cluster (ray.cluster_utils.Cluster): workers land on both nodes and finish a rollout.

Runs in a subprocess: this process's session Ray (conftest) cannot coexist with a second cluster.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
    from hybrid_rl.rollout.engine import GroupRequest
    from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID
    from rollout_fixtures import ToyModel
    from hybrid_rl.rollout.pool import RolloutPool

    node = dict(num_cpus=1, object_store_memory=80 * 1024 ** 2)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    pool = RolloutPool(ToyModel(272), PoolConfig(num_workers=2, num_cpus_per_worker=1, address=cluster.address,
                                                 task_timeout_s=120),
                       SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=4))
    trajs = pool.run_groups([GroupRequest(FIXED_TURNS_ID, s, s, num_samples=2, env_kwargs={"turns": 2}) for s in range(6)])
    print("RESULT " + json.dumps({
        "nodes": len(ray.nodes()),
        "worker_nodes": sorted({i["node_id"] for i in pool.info}),
        "trajectories": len(trajs),
        "statuses": sorted({t.status for t in trajs}),
        "workers_in_trajectories": sorted({t.worker for t in trajs}),
    }))
    pool.close()
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_two_node_cluster_places_workers_on_both_nodes_slow():
    here = os.path.dirname(os.path.abspath(__file__))  # rollout_fixtures, for the script and the cluster's workers
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=400, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["nodes"] == 2
    assert len(result["worker_nodes"]) == 2
    assert result["trajectories"] == 12 and result["statuses"] == ["terminated"]
    assert len(result["workers_in_trajectories"]) == 2
