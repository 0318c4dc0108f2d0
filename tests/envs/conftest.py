import socket

import pytest

from hybrid_rl import envs

BUILTIN_IDS = [f"hybrid_rl/{b.name}" for b in envs.registry.BUILTINS]


@pytest.fixture(params=BUILTIN_IDS, ids=lambda i: i.split("/")[1])
def env_id(request):
    return request.param


@pytest.fixture
def check_and_list(capsys):
    """Run the env checker (the expert must win every episode) and ``envs list``; -> the env's row of the list."""
    from hybrid_rl.cli import main
    from hybrid_rl.envs.checker import check

    def run(env_id: str) -> str:
        report = check(env_id, episodes=100)
        assert report.passed, report.format()
        assert report.expert["success_rate"] == 1.0
        assert main(["envs", "list"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith(env_id))

    return run


@pytest.fixture
def listener():
    """A TCP server on loopback that never accepts: what sandboxed code tries to reach (the sandbox tests)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()
