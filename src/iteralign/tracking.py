"""Experiment trackers (TensorBoard, MLflow, W&B): one tracker run per experiment.

``tracking.trackers`` in the config names them (none by default). Every job of an
experiment logs into the same tracker run: the first job that logs creates it and
keeps its id in ``<results>/<experiment>/tracking/run.json``; later jobs resume it.
What is logged, on two axes:

- ``train/<metric>``: each line of ``train_r{n}.jsonl``, at its global ``step``;
- ``eval/<metric>`` (``eval_r{n}.json``), ``feedback/<count>`` (the feedback
  file's kept/dropped counts) and ``time/<step>_seconds`` (each job's wall time),
  at the round;
- the config (URLs without their credentials), whenever its hash is new to the run.

Tracker libraries are imported only when the config names a tracker. A tracker
that fails (not installed, a bad URI, a server that refuses) costs one warning line
and the job goes on: artefacts never depend on a tracker. Only the main process of
a multi-process job logs. Jobs of one experiment log one at a time (a file lock), so
that the run's id and W&B's step counter are shared safely.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
# The axis of each metric family: the global optimizer step, or the round.
ROUND_FAMILIES = ("eval", "feedback", "time")
# Settings recorded beside the round's numbers (the axis itself, decoding, the asked threshold): not metrics.
NOT_METRICS = ("round", "decoding", "threshold_setting")
_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


# ---------------------------------------------------------------- what is logged
def numeric_items(values: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a (nested) dict as ``prefix/key`` -> float.

    Nested dicts become ``prefix/key/sub``; a ``[lo, hi]`` pair under a key ending in
    ``ci95`` becomes ``key_lo`` and ``key_hi``; text, None, NaN and other lists are left out.
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(numeric_items(value, name))
        elif key.endswith("ci95") and isinstance(value, list | tuple) and len(value) == 2:
            out.update(numeric_items({f"{key}_lo": value[0], f"{key}_hi": value[1]}, prefix))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def redact_url_credentials(text: str) -> str:
    """``https://user:key@host/x`` -> ``https://***@host/x``: a URL's credentials never reach a tracker."""
    return _CREDENTIALS_IN_URL.sub(lambda m: f"{m['scheme']}***@", text)


def public_config(config):
    """The config as trackers may see it: every string with URL credentials redacted."""
    if isinstance(config, dict):
        return {key: public_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [public_config(value) for value in config]
    return redact_url_credentials(config) if isinstance(config, str) else config


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool | None]:
    """``{"training": {"lr": 1e-6}}`` -> ``{"training.lr": 1e-6}`` (lists as JSON text)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------- the trackers
class TensorBoard:
    """Event files in ``tracking/tensorboard``: one folder, so one TensorBoard run per experiment.

    Written with TensorBoard's own event file writer (what torch's SummaryWriter wraps,
    without importing torch: a job that samples with vLLM need not load it twice).
    """

    name = "tensorboard"

    def __init__(self, folder: Path, settings: dict, state: dict, run_name: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(folder / "tensorboard"))

    def _write(self, summary, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def log(self, values: dict[str, float], axis: str, index: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in values.items()]),
                    index)

    def log_config(self, config: dict, text: str, config_hash: str, round_n: int) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._write(text_pb("config", "    " + text.replace("\n", "\n    ")), round_n)  # markdown code block

    def close(self, state: dict) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run; by default in a SQLite store under ``tracking/`` (no server)."""

    name = "mlflow"

    def __init__(self, folder: Path, settings: dict, state: dict, run_name: str):
        from mlflow.tracking import MlflowClient

        local = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        uri = settings["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or local
        self.client = MlflowClient(tracking_uri=uri)
        where = redact_url_credentials(uri)
        self.created = state.get("tracking_uri") != where or not state.get("run_id")
        if self.created:
            artifacts = (folder / "mlflow-artifacts").resolve().as_uri() if uri == local else None
            experiment = self.client.get_experiment_by_name(settings["experiment_name"])
            experiment_id = experiment.experiment_id if experiment else \
                self.client.create_experiment(settings["experiment_name"], artifact_location=artifacts)
            state.update(tracking_uri=where, run_id=self.client.create_run(experiment_id, run_name=run_name).info.run_id)
        else:
            self.client.update_run(state["run_id"], status="RUNNING")
        self.run_id = state["run_id"]

    def log(self, values: dict[str, float], axis: str, index: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, index) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_config(self, config: dict, text: str, config_hash: str, round_n: int) -> None:
        from mlflow.entities import Param

        if self.created:  # parameters cannot change once logged; later configs are artifacts
            params = [Param(key, str(value)[:6000]) for key, value in flat_config(config).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.set_tag(self.run_id, "config_hash", config_hash)
        self.client.log_text(self.run_id, text, f"config/config_{config_hash}.yaml")

    def close(self, state: dict) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """One W&B run (offline by default); its step counter continues across jobs.

    Each job's offline run folder holds the same run id; ``wandb sync --id <id>`` uploads
    them in order. W&B's own step only grows (the count is kept in ``run.json``), while
    the metrics are plotted against ``train/global_step`` and ``round``.
    """

    name = "wandb"

    def __init__(self, folder: Path, settings: dict, state: dict, run_name: str):
        import wandb

        if settings["mode"] == "offline":
            os.environ["WANDB_MODE"] = "offline"
        run_id = state.get("run_id") or uuid.uuid4().hex[:16]
        self.run = wandb.init(
            project=settings["project"], entity=settings["entity"], id=run_id, name=run_name, resume="allow",
            dir=str(folder), mode=settings["mode"], settings=wandb.Settings(console="off", quiet=True),
        )
        state["run_id"] = run_id
        self.run.define_metric("train/global_step", hidden=True)
        self.run.define_metric("train/*", step_metric="train/global_step")
        self.run.define_metric("round", hidden=True)
        for family in ROUND_FAMILIES:
            self.run.define_metric(f"{family}/*", step_metric="round")
        self.step = max(state.get("next_step", 0), self.run.step)

    def log(self, values: dict[str, float], axis: str, index: int) -> None:
        self.run.log({**values, "train/global_step" if axis == "step" else "round": index}, step=self.step)
        self.step += 1

    def log_config(self, config: dict, text: str, config_hash: str, round_n: int) -> None:
        self.run.config.update({**config, "config_hash": config_hash}, allow_val_change=True)

    def close(self, state: dict) -> None:
        state["next_step"] = self.step
        self.run.finish()


TRACKER_CLASSES = {cls.name: cls for cls in (TensorBoard, MLflow, WandB)}


# ---------------------------------------------------------------- one job's session
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact_url_credentials(f"{type(exc).__name__}: {text[0] if text else ''}")[:300]


class Session:
    """The trackers of one job, from its first metric to its end, holding the experiment's lock."""

    def __init__(self, config: dict):
        import fcntl

        from iteralign.config import experiment_dir

        self.folder = experiment_dir(config) / "tracking"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.folder / ".lock", "a")  # held until close()
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            state_path = self.folder / "run.json"
            self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        except (OSError, ValueError):
            self.lock.close()  # closing the file releases the lock
            raise
        settings = config["tracking"]
        run_name = settings["run_name"] or config["experiment"]
        self.trackers = []
        for name in settings["trackers"]:
            tracker = self._guarded(name, "start", TRACKER_CLASSES[name], self.folder, settings.get(name, {}),
                                    self.state.setdefault(name, {}), run_name)
            if tracker is not None:
                self.trackers.append(tracker)
        self._log_config(config)

    def _guarded(self, name: str, action: str, function, *args):
        """Call ``function``; on failure warn once and drop the tracker for the rest of the job."""
        try:
            return function(*args)
        except Exception as exc:  # a tracker never takes a job down with it
            log.warning("tracker %s failed to %s (%s); this job goes on without it", name, action, _first_line(exc))
            self.trackers = [t for t in self.trackers if t.name != name]
            return None

    def _log_config(self, config: dict) -> None:
        from iteralign.config import config_hash, dump

        shown = public_config(config)
        text, digest = dump(shown), config_hash(config)
        for tracker in list(self.trackers):
            logged = self.state[tracker.name].setdefault("config_hashes", [])
            if digest not in logged:
                self._guarded(tracker.name, "log the config", tracker.log_config, shown, text, digest, len(logged))
                logged.append(digest)

    def log(self, values: dict[str, float], axis: str, index: int) -> None:
        if values:
            for tracker in list(self.trackers):
                self._guarded(tracker.name, "log", tracker.log, values, axis, index)

    def close(self) -> None:
        import fcntl

        from iteralign.artifacts import atomic_path

        try:
            for tracker in list(self.trackers):
                self._guarded(tracker.name, "finish", tracker.close, self.state[tracker.name])
            with atomic_path(self.folder / "run.json") as tmp:
                tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("could not write %s (%s)", self.folder / "run.json", _first_line(exc))
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()


_session: Session | None = None
_failed = False  # the session could not open (e.g. the results folder is not writable): not retried


def _open(config: dict) -> Session | None:
    global _session, _failed
    if _session is not None or _failed or not config.get("tracking", {}).get("trackers"):
        return _session
    from iteralign.cluster import is_main_process

    if not is_main_process():
        return None
    try:
        _session = Session(config)
    except Exception as exc:
        _failed = True
        log.warning("could not open the experiment's tracker run (%s); this job goes on without it",
                    _first_line(exc))
        return None
    atexit.register(close)
    return _session


# ---------------------------------------------------------------- what the steps call
def log_train_steps(config: dict, rows: list[dict]) -> None:
    """Each ``train_r{n}.jsonl`` line as ``train/<key>`` at its global step."""
    session = _open(config)
    for row in rows if session else []:
        session.log(numeric_items({k: v for k, v in row.items() if k != "step"}, "train"), "step", row["step"])


def log_round(config: dict, family: str, round_n: int, values: dict) -> None:
    """The numbers of ``values`` as ``<family>/<key>`` at the round (``eval``, ``feedback``, ``time``)."""
    session = _open(config)
    if session:
        session.log(numeric_items({k: v for k, v in values.items() if k not in NOT_METRICS}, family), "round", round_n)


def log_job_seconds(config: dict, step: str, round_n: int, seconds: float) -> None:
    """A job's wall time as ``time/<step>_seconds`` at its round."""
    log_round(config, "time", round_n, {f"{step.replace('-', '_')}_seconds": seconds})


def close() -> None:
    """Finish this job's tracker runs and release the experiment's lock (the CLI calls it at a job's end)."""
    global _session
    session, _session = _session, None
    if session is not None:
        session.close()
