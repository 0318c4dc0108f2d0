"""A trainer's accelerate state lives as long as the trainer: the process can make another Accelerator after it."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    """In a fresh interpreter: accelerate's state is process-wide, and this test process has its own."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_a_closed_trainer_leaves_no_accelerate_state_behind():
    out = _run("""
        from accelerate import Accelerator
        from hybrid_rl.distributed import Parallel, ParallelTrainConfig
        for dtype in ("fp32", "bf16"):  # SFT then RL in one process (the pipeline), as a host would
            trainer = Parallel(ParallelTrainConfig(dtype=dtype))
            assert trainer.world == 1 and trainer.dtype == dtype
            trainer.close()
        # the host's own Accelerator with settings of its own: accelerate refuses a change of settings while
        # a state made before it is alive ("AcceleratorState has already been initialized")
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        print("host", acc.mixed_precision, acc.num_processes)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "host bf16 1", out.stdout


def test_a_trainer_keeps_the_accelerate_state_the_host_made_before_it():
    out = _run("""
        from accelerate import Accelerator
        from hybrid_rl.distributed import Parallel, ParallelTrainConfig
        host = Accelerator(cpu=True)
        trainer = Parallel(ParallelTrainConfig())
        trainer.close()
        # the host's accelerator still has its state (a reset would have emptied the shared dict under it)
        print("host", host.num_processes, host.device.type, host.state.initialized)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "host 1 cpu True", out.stdout


def test_a_stage_that_fails_on_a_bad_input_leaves_no_accelerate_state_behind(tmp_path):
    out = _run(f"""
        from accelerate import Accelerator
        from hybrid_rl.cli import main
        for stage in ("sft", "rl"):  # resume=true of a run that does not exist: refused after the trainer started
            rc = main([stage, "run.output_dir={tmp_path}", "run.name=typo", "resume=true", "model.preset=micro",
                       "run.quiet=true"])
            assert rc == 2, (stage, rc)
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        print("host", acc.mixed_precision)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "host bf16", out.stdout
