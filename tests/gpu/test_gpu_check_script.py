"""scripts/gpu_check.sh's module on a machine without CUDA: a clear message and exit code 2, nothing written;
the test runner it uses reads pytest's junit counts."""

import pytest
import torch

from hybrid_rl.benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_it_says_where_to_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--json-out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not out.exists()


def test_the_gpu_tests_are_collected_and_counted(tmp_path):
    result = gpu_check.run_gpu_tests(tmp_path)
    assert result["returncode"] == 0 and result["tests"] == 11
    assert result["skipped"] == (0 if torch.cuda.is_available() else 11)


def test_figures_are_read_where_progress_dots_precede_them():
    out = 'GPU_FIGURE {"a": 1}\n..GPU_FIGURE {"b": 2.5}\n.F.\nno figure here\n'
    assert gpu_check.figures_in(out) == {"a": 1, "b": 2.5}


def test_the_full_size_forward_case_runs_on_the_cpu_for_a_small_preset():
    out = gpu_check.forward_case("micro", 2, 64, device="cpu")
    assert out["finite_logits"] and out["params"] > 0 and out["tokens_per_s"] > 0
    assert torch.get_default_dtype() == torch.float32  # restored
