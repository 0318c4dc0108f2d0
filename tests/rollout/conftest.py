import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # helpers.py, rollout_fixtures.py
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node binds to 127.0.0.1


def _model_available() -> bool:
    try:
        from hybrid_rl.model import HybridLM  # noqa: F401
    except ImportError:
        return False
    return True


MODEL_KINDS = ["toy"] + (["micro"] if _model_available() else [])


@pytest.fixture(params=MODEL_KINDS)
def model_kind(request):
    return request.param


def fixtures_on_worker_path() -> dict:
    """A Ray runtime env that puts this folder first on the workers' PYTHONPATH."""
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}}


@pytest.fixture(scope="session")
def ray_session():
    """ONE local Ray per pytest session (ray.init costs ~7 s): 2 CPUs, no dashboard, small object store; its
    workers import rollout_fixtures from this folder. A Ray that an earlier test left running (a pipeline or RL
    test whose pool started the library's own, in a run of both tiers) has neither, so it is replaced."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 ** 2,
             log_to_driver=False, configure_logging=False, runtime_env=fixtures_on_worker_path())
    yield ray
    ray.shutdown()
