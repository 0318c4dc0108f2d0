"""One metrics logger for every stage: ``metrics.jsonl`` always, plus console, TensorBoard and wandb.

A stage builds one ``MetricsLogger`` from its ``logging:`` section and calls ``log(metrics, step)``,
``log_samples(rows, step)`` and ``close()``. Every backend gets the run name, group, tags, the
resolved config and the git commit. Names follow ``train/…``, ``rollout/…``, ``eval/…``, ``perf/…``,
``moe/…`` (the list of what each stage logs is docs/METRICS.md); a name with another prefix is a
programming error and raises at its first ``log``.

Failure policy: ``metrics.jsonl`` is the record of truth. Each line is flushed as it is written and
the file is fsynced at ``close()``; an error writing it raises. Any other backend that fails (wandb
not installed, ``wandb.init`` crashing, an unwritable TensorBoard folder, an error mid-run) warns
once, is switched off, and the run goes on.

Files in the run directory:

- ``metrics.jsonl``: one line per ``log`` call, ``{"step": N, "time": unix_s, "<name>": value, ...}``;
  non-finite values are written as ``null`` so that the file stays strict JSON.
- ``samples.jsonl``: sample episodes (``{"step": N, **row}``), at most ``samples_per_log`` rows per
  call and ``samples_max_rows`` in all, strings cut to ``samples_max_chars``.
- ``run.json``: name, group, tags, git commit, backends, wandb run id and directory.
- ``config.yaml``: the resolved config (written by ``run.make_run_dir``; here only when absent).
- ``tensorboard/``: event files. ``wandb/``: wandb's own run folder (``wandb sync`` it later when
  it was offline).
- ``report.html``: rebuilt at ``close()`` (``hybrid-rl report RUN_DIR`` rebuilds it by hand).

Readers for tests and tools: ``read_metrics``, ``read_samples``, ``read_run_info`` (owned by
``hybrid_rl.runfiles``, through which the report reads a run; re-exported here), ``read_wandb_offline_run`` (through
wandb's own ``wandb leet inspect --json``), ``read_tensorboard_scalars`` (tensorboard's
``EventAccumulator``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from hybrid_rl.runfiles import METRIC_PREFIXES, read_metrics, read_run_info, read_samples

logger = logging.getLogger(__name__)

__all__ = [
    "LoggingConfig", "MetricsLogger", "METRIC_PREFIXES", "env_key", "json_safe", "moe_load_metrics", "resolve_wandb_mode",
    "read_metrics", "read_samples", "read_run_info", "read_wandb_offline_run", "read_tensorboard_scalars",
    "WandbRun",
]

Backend = Literal["jsonl", "console", "tensorboard", "wandb"]


@dataclass
class LoggingConfig:
    # jsonl is written whatever this list says (it is the record of truth and feeds report.html);
    # the others are on by default so that a first run shows up in every dashboard a user may open.
    backends: list[Backend] = field(default_factory=lambda: ["jsonl", "console", "tensorboard", "wandb"])
    wandb_project: str = "hybrid-rl"
    wandb_entity: str = ""  # empty = the API key's default entity
    # auto = online when an API key is found (WANDB_API_KEY or ~/.netrc), offline otherwise, so a
    # laptop or CI run never blocks on the network; WANDB_MODE in the environment wins over auto.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # wandb's CPU/GPU sampling thread: off by default since it costs a core on small CPU runs;
    # turn it on for GPU runs to see utilisation and memory in wandb.
    wandb_system_metrics: bool = False
    console_every: int = 10  # steps between console lines: often enough to watch, rare enough to read
    samples_per_log: int = 8  # episodes kept per log_samples call: a table a person can skim
    samples_max_rows: int = 512  # episodes kept over the whole run, so samples.jsonl stays small
    samples_max_chars: int = 4000  # longer strings are cut; one runaway generation must not bloat the table
    tensorboard_dir: str = "tensorboard"  # relative to the run directory
    report: bool = True  # rebuild report.html at close(); cheap (a second or two of matplotlib)

    def __post_init__(self):
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"logging.backends lists a backend twice: {self.backends}")
        for name in ("console_every", "samples_per_log", "samples_max_rows", "samples_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"logging.{name} must be >= 1, got {getattr(self, name)}")


def env_key(env_id: str) -> str:
    """The environment part of a per-environment metric name: ``hybrid_rl/GuessNumber-v0`` -> ``GuessNumber-v0``.

    Metric names group on ``/`` (``eval/success/<env>``), so an id's namespace is dropped for our own
    environments and joined with ``.`` for third-party ones; a ``module:`` prefix (what to import) is dropped.
    """
    base, paren, args = env_id.partition("(")
    env_id = base.rpartition(":")[2] + paren + args
    if env_id.startswith("hybrid_rl/"):
        env_id = env_id[len("hybrid_rl/"):]
    return env_id.replace("/", ".")


def moe_load_metrics(counts_by_layer: dict[int, Any], per_expert_up_to: int = 16, prefix: str = "moe") -> dict[str, float]:
    """Expert-load metrics from routed-token counts: ``{layer index: counts [n_experts]}`` -> metric dict.

    Per layer: ``load_max`` and ``load_min`` (an expert's share times n_experts: 1 everywhere is a
    perfect balance), ``dead_experts`` (experts that got no token). Per expert
    (``expert_load/layer<i>/e<j>``, the share of the layer's routed slots) only when the layer has
    at most ``per_expert_up_to`` experts: a 128-expert model would log thousands of series per step.
    """
    out: dict[str, float] = {}
    for layer, counts in sorted(counts_by_layer.items()):
        counts = [float(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
        total, n = sum(counts), len(counts)
        shares = [c / total if total else 0.0 for c in counts]
        out[f"{prefix}/load_max/layer{layer}"] = max(shares) * n
        out[f"{prefix}/load_min/layer{layer}"] = min(shares) * n
        out[f"{prefix}/dead_experts/layer{layer}"] = float(sum(c == 0 for c in counts))
        if n <= per_expert_up_to:
            out.update({f"{prefix}/expert_load/layer{layer}/e{e}": share for e, share in enumerate(shares)})
    return out


# ------------------------------------------------------------------------------------------ logger


class MetricsLogger:
    """Fan ``log(metrics, step)`` out to the configured backends; see the module docstring."""

    def __init__(self, cfg: LoggingConfig | None, run_dir: str | Path, run_name: str = "", config_dict: dict | None = None,
                 group: str = "", tags: Iterable[str] = (), resume_step: int | None = None):
        """``resume_step``: a resumed run goes on after this step: TensorBoard hides the events the stopped run
        wrote past it (they are logged again), and wandb continues the run's id (``run.json``) instead of
        starting another run."""
        from hybrid_rl.run import git_commit

        self.cfg = cfg or LoggingConfig()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume_step = resume_step
        self.previous_info = read_run_info(self.run_dir) if resume_step is not None else {}
        self.info = {
            "name": run_name or self.run_dir.name, "group": group, "tags": list(tags), "git_commit": git_commit(),
            "started": time.time(), "backends": list(self.cfg.backends),
        }
        self.config_dict = dict(config_dict or {})
        self._samples_written = _count_lines(self.run_dir / "samples.jsonl")
        self._closed = False
        self._checked_names: set[str] = set()
        self.backends: list[_Backend] = [_JsonlBackend(self.run_dir, self.info, self.config_dict)]
        for name in self.cfg.backends:
            if name == "jsonl":
                continue
            backend = self._start(name)
            if backend is not None:
                self.backends.append(backend)
        self._write_run_info()

    # ------------------------------------------------------------------ public API

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record scalar ``metrics`` at ``step`` on every backend."""
        clean = {}
        for key, value in metrics.items():
            if key not in self._checked_names:
                _check_name(key)
                self._checked_names.add(key)
            clean[key] = _to_float(key, value)
        if clean:
            self._each("log", clean, int(step))

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Record sample episodes (dicts; a ``messages`` list of ``{"role", "content"}`` shows as a conversation)."""
        room = self.cfg.samples_max_rows - self._samples_written
        rows = [_cap_row(r, self.cfg.samples_max_chars) for r in rows[: min(self.cfg.samples_per_log, max(room, 0))]]
        if not rows:
            return
        self._samples_written += len(rows)
        self._each("log_samples", rows, int(step))

    def close(self, failed: bool = False) -> None:
        """Finish every backend (fsync metrics.jsonl, finish wandb; as failed when ``failed``) and rebuild report.html."""
        if self._closed:
            return
        self._closed = True
        self._each("close", failed)
        self._write_run_info()
        if self.cfg.report:
            try:
                from hybrid_rl.report import build_report

                build_report(self.run_dir)
            except Exception as err:  # the run's data is safe on disk; the report can be rebuilt by hand
                _warn(f"report.html could not be built ({type(err).__name__}: {err}); rebuild it with `hybrid-rl report {self.run_dir}`.")

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    @property
    def active_backends(self) -> list[str]:
        return [b.name for b in self.backends]

    # ------------------------------------------------------------------ internals

    def _start(self, name: str) -> "_Backend | None":
        factory = {"console": _ConsoleBackend, "tensorboard": _TensorBoardBackend, "wandb": _WandbBackend}[name]
        try:
            backend = factory(self)
        except Exception as err:
            _warn(f"metrics backend {name!r} failed to start ({type(err).__name__}: {err}); "
                  f"the run goes on without it (metrics.jsonl keeps everything).")
            return None
        return backend if backend.name else None  # a backend that chose not to run (wandb disabled)

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            if isinstance(backend, _JsonlBackend):
                getattr(backend, method)(*args)  # the record of truth: its errors are the run's errors
                continue
            try:
                getattr(backend, method)(*args)
            except Exception as err:
                _warn(f"metrics backend {backend.name!r} failed in {method} ({type(err).__name__}: {err}); "
                      f"it is switched off for the rest of the run (metrics.jsonl keeps everything).")
                self.backends.remove(backend)
                try:
                    backend.abort()
                except Exception:
                    pass

    def _write_run_info(self) -> None:
        info = dict(self.info)
        for b in self.backends:
            info.update(b.run_info())
        _atomic_write(self.run_dir / "run.json", json.dumps(info, indent=1) + "\n")


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def _check_name(key: str) -> None:
    if not isinstance(key, str) or not key.startswith(METRIC_PREFIXES) or key.endswith("/") or "//" in key:
        raise ValueError(
            f"metric name {key!r} does not follow the naming scheme: it must start with one of "
            f"{', '.join(METRIC_PREFIXES)} and have no empty part (see docs/METRICS.md), e.g. 'train/loss'."
        )


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples: what
    ``json.dumps`` then writes is strict JSON (it writes ``NaN``, which JSON parsers other than Python's refuse),
    as metrics.jsonl is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _to_float(key: str, value: Any) -> float | None:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number (int, float, bool, 0-d tensor or array), got {type(value).__name__}: {value!r:.80}") from None
    return number if math.isfinite(number) else None


def _cap_row(row: dict, max_chars: int) -> dict:
    def cap(v):
        if isinstance(v, str) and len(v) > max_chars:
            return v[:max_chars] + f"… [{len(v) - max_chars} more chars]"
        if isinstance(v, dict):
            return {k: cap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [cap(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return cap(str(v))

    return {str(k): cap(v) for k, v in row.items()}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


def _render_conversation(row: dict) -> str:
    messages = row.get("messages") or []
    return "\n\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in messages if isinstance(m, dict))


# ---------------------------------------------------------------------------------------- backends


class _Backend:
    name = ""

    def log(self, metrics: dict[str, float | None], step: int) -> None: ...

    def log_samples(self, rows: list[dict], step: int) -> None: ...

    def close(self, failed: bool) -> None: ...

    def abort(self) -> None:
        """Release what can be released after a failure; errors here are ignored."""

    def run_info(self) -> dict:
        return {}


def _open_append(path: Path):
    """``path`` opened to append rows. A torn last row (a crash mid-write) is cut off first: appended to, it would sit
    in the middle of the file, where a reader cannot skip it as the unfinished last line."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # rare: read the whole file to find where the last whole row ends
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


class _JsonlBackend(_Backend):
    """``metrics.jsonl`` and ``samples.jsonl``: appended, flushed per line, fsynced at close."""

    name = "jsonl"

    def __init__(self, run_dir: Path, info: dict, config_dict: dict):
        self.run_dir = run_dir
        self.file = _open_append(run_dir / "metrics.jsonl")
        self.samples = None
        if not (run_dir / "config.yaml").exists() and config_dict:
            from hybrid_rl.config import dump_yaml

            _atomic_write(run_dir / "config.yaml", dump_yaml(config_dict))

    def log(self, metrics, step):
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()

    def log_samples(self, rows, step):
        if self.samples is None:
            self.samples = _open_append(self.run_dir / "samples.jsonl")
        for row in rows:
            self.samples.write(json.dumps({"step": step, **row}, default=str) + "\n")
        self.samples.flush()

    def close(self, failed):
        for f in (self.file, self.samples):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()


class _ConsoleBackend(_Backend):
    """A compact line every ``console_every`` steps (and at every eval), printed above progress bars."""

    name = "console"
    max_fields = 8  # a line that fits a terminal; everything else is in metrics.jsonl

    def __init__(self, owner: MetricsLogger):
        self.every = owner.cfg.console_every

    def log(self, metrics, step):
        if step % self.every and not any(k.startswith("eval/") for k in metrics):
            return
        from hybrid_rl.log import echo

        fields = [(k, v) for k, v in metrics.items() if not k.startswith("moe/")][: self.max_fields]
        echo(f"step {step:>6} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in fields))


def _fmt(v: float | None) -> str:
    if v is None:
        return "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


class _TensorBoardBackend(_Backend):
    """Scalars, the config and run info as text, samples as a markdown table; under ``run_dir/tensorboard``."""

    name = "tensorboard"

    def __init__(self, owner: MetricsLogger):
        from torch.utils.tensorboard import SummaryWriter

        from hybrid_rl.config import dump_yaml

        self.dir = owner.run_dir / owner.cfg.tensorboard_dir
        self.dir.mkdir(parents=True, exist_ok=True)  # fails here, not in tensorboard's writer thread
        probe = self.dir / ".write-probe"
        probe.write_text("")
        probe.unlink()
        # a crashed run loses at most 10 s of events; a resumed one purges what the stopped run logged past its step
        purge = owner.resume_step + 1 if owner.resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=10, purge_step=purge)
        info = owner.info
        self.writer.add_text("run", f"name: {info['name']}  \ngroup: {info['group']}  \ntags: {', '.join(info['tags'])}  \n"
                                    f"git commit: {info['git_commit']}", 0)
        self.writer.add_text("config", "```\n" + dump_yaml(owner.config_dict) + "```", 0)

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, float("nan") if value is None else value, step)

    def log_samples(self, rows, step):
        columns = [c for c in rows[0] if c != "messages"]
        lines = ["| " + " | ".join(columns + ["conversation"]) + " |", "|" + " --- |" * (len(columns) + 1)]
        for row in rows:
            cells = [str(row.get(c, "")) for c in columns] + [_render_conversation(row).replace("\n", "<br>")]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self, failed):
        self.writer.close()

    def abort(self):
        self.writer.close()

    def run_info(self):
        return {"tensorboard_dir": str(self.dir)}


class _WandbBackend(_Backend):
    """wandb, online with an API key and offline otherwise, its files under ``run_dir/wandb``."""

    name = "wandb"

    def __init__(self, owner: MetricsLogger):
        cfg = owner.cfg
        mode = resolve_wandb_mode(cfg.wandb_mode)
        if mode == "disabled":
            self.name = ""
            return
        import wandb  # ImportError -> warned once by MetricsLogger, run goes on

        settings = wandb.Settings(
            silent=True,  # our own line below says where the run is; wandb's banner repeats it
            console="off",  # no stdout wrapping: it fights progress bars and pytest; console lines are in metrics.jsonl
            x_disable_stats=not cfg.wandb_system_metrics,
            x_disable_meta=True,  # skips host/GPU/git probing at init (we send the git commit ourselves)
            x_disable_machine_info=True,
            x_save_requirements=False,  # no `pip freeze`-like scan at start
            save_code=False,
            init_timeout=60,
        )
        info = owner.info
        previous = owner.previous_info.get("wandb_id") if owner.previous_info.get("wandb_mode") == mode else None
        resume = {"id": previous, "resume": "allow"} if previous else {}  # a resumed run goes on in the same wandb run
        self.run = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=info["name"], group=info["group"] or None,
            tags=info["tags"] or None, config={**owner.config_dict, "git_commit": info["git_commit"]},
            dir=str(owner.run_dir), mode=mode, settings=settings, reinit="create_new", **resume,
        )
        self.wandb = wandb
        self.mode = mode
        self.files_dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>
        where = self.run.url if mode == "online" else f"{self.files_dir} (upload later: wandb sync {self.files_dir})"
        logger.info("wandb %s run %s: %s", mode, self.run.id, where)

    def log(self, metrics, step):
        self.run.log({k: (float("nan") if v is None else v) for k, v in metrics.items()}, step=step)

    def log_samples(self, rows, step):
        columns = sorted({c for r in rows for c in r if c != "messages"})
        data = [[_table_cell(r.get(c)) for c in columns] + [_render_conversation(r)] for r in rows]
        self.run.log({"samples/episodes": self.wandb.Table(columns=columns + ["conversation"], data=data)}, step=step)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)

    def abort(self):
        self.run.finish(exit_code=1)

    def run_info(self):
        return {"wandb_mode": self.mode, "wandb_id": self.run.id, "wandb_dir": str(self.files_dir)}


def _table_cell(v):
    return v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, default=str)


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> WANDB_MODE if set, else online with an API key (env or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode in ("dryrun",):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


# ----------------------------------------------------------------------------------------- readers


@dataclass
class WandbRun:
    """What wandb stored for one run, read back from its ``.wandb`` transaction log."""

    run_id: str
    name: str
    project: str
    group: str
    tags: list[str]
    config: dict
    history: list[dict]  # one dict per step, wandb's own keys (_step, _runtime, _timestamp) included
    summary: dict
    path: Path  # the run-<id>.wandb file


def read_wandb_offline_run(run_dir: str | Path) -> WandbRun:
    """Read an offline wandb run from its files in ``run_dir`` with wandb's own reader.

    wandb 0.31 has no Python-level reader for ``.wandb`` files any more (the old
    ``wandb.sdk.internal.datastore`` went with the move to the ``wandb-core`` service) and
    ``wandb.Api`` needs the server; the supported way is ``wandb leet inspect --json FILE``, which
    prints one JSON record per line. ``run_dir`` may be our run directory, wandb's ``wandb/`` folder
    or one ``offline-run-*`` folder; the latest run is read when there are several.
    """
    path = _find_wandb_file(Path(run_dir))
    config, history, summary, run = {}, [], {}, {}
    for part in _wandb_parts(path):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(part)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_SILENT": "true"})
        if proc.returncode != 0:
            raise RuntimeError(f"`wandb leet inspect --json {part}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        rows: list[dict] = []
        _read_wandb_records(proc.stdout, config, rows, summary, run)
        by_step = {r["_step"]: r for r in history if "_step" in r}
        for row in rows:  # a resumed start logs steps again: its values win, the stopped run's others stay
            if "_step" in row and row["_step"] in by_step:
                by_step[row["_step"]].update(row)
            else:
                history.append(row)
                if "_step" in row:
                    by_step[row["_step"]] = row
        history.sort(key=lambda r: r.get("_step", -1))
    config.pop("_wandb", None)
    return WandbRun(run_id=run.get("run_id", ""), name=run.get("display_name", ""), project=run.get("project", ""),
                    group=run.get("run_group", ""), tags=list(run.get("tags") or []), config=config,
                    history=history, summary=summary, path=path)


def _wandb_parts(path: Path) -> list[Path]:
    """The run file ``path`` and, before it, those of the earlier folders of the same run id (a resumed run writes
    one offline folder per start, ``offline-run-<time>-<id>``; ``wandb sync`` joins them), oldest first."""
    folder = path.parent
    if not folder.name.startswith(("offline-run-", "run-")):
        return [path]
    run_id = folder.name.rpartition("-")[2]
    parts = sorted(folder.parent.glob(f"*-run-*-{run_id}/run-*.wandb"), key=lambda p: p.parent.name)
    return [p for p in parts if p.parent.name <= folder.name] or [path]


def _read_wandb_records(text: str, config: dict, history: list, summary: dict, run: dict) -> None:
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            run.update(rec["run"])
            config.update((rec["run"].get("config") or {}).get("update") or {})
        elif kind == "config":
            config.update((rec["config"] or {}).get("update") or {})
        elif kind == "history":
            history.append(rec["history"].get("item") or {})
        elif kind == "summary":
            summary.update((rec["summary"] or {}).get("update") or {})


def _find_wandb_file(root: Path) -> Path:
    if root.is_file():
        return root
    candidates = sorted(root.glob("run-*.wandb")) or sorted(root.glob("*-run-*/run-*.wandb")) or sorted(root.glob("wandb/*-run-*/run-*.wandb"))
    if not candidates:
        raise FileNotFoundError(f"no wandb run file (run-*.wandb) under {root}; was the wandb backend on for this run?")
    return max(candidates, key=lambda p: p.parent.name)  # folder names start with the start time


def read_tensorboard_scalars(run_dir: str | Path, subdir: str = "tensorboard") -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard event files, read with tensorboard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / subdir
    if not folder.is_dir():
        raise FileNotFoundError(f"no TensorBoard folder {folder}; was the tensorboard backend on for this run?")
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

