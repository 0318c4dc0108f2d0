import pytest

from hybrid_rl import envs

BUILTIN_IDS = [f"hybrid_rl/{b.name}" for b in envs.registry.BUILTINS]


@pytest.fixture(params=BUILTIN_IDS, ids=lambda i: i.split("/")[1])
def env_id(request):
    return request.param
