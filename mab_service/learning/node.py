"""The node's loop state: the arm table and the held events, in shared memory that every worker maps.

One process owns a node: the one that runs ``serve`` (the supervisor under ``--workers N``, else the server
itself), or an app's lifespan when no node is open in its process (tests, embedding). The owner

1. takes the state directory's lock (``node.lock``): one node serves from one state directory;
2. builds both tables in files under ``/dev/shm``: the catalogue streamed from its CSV into the arm table, then the
   counts of the checkpoint and of every journal file not yet folded into it, then the events of the last reward
   window with the rewards they got (so that a duplicate is still a duplicate after a restart);
3. folds journal files older than the window into the checkpoint every ``checkpoint_interval_s`` (a thread);
4. deletes the shared files when it closes.

Workers map the same files (``Node.attach``) from the ``NodeHandle`` the owner gives them, so an impression or a
reward that one worker counts is in every worker's next answer. Only the journal (``journal.py``) is durable; the
shared files are rebuilt from it at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.features.factory import parse_spec
from mab_service.learning import journal
from mab_service.learning._arms import ArmTable
from mab_service.learning._events import EventRing

logger = logging.getLogger("mab_service.learning")

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "mab-service-"
CHECKPOINT = "checkpoint.json"
#: Bytes of id text reserved per arm first seen at run time.
NEW_ARM_ID_BYTES = 32


@dataclass(frozen=True)
class NodeHandle:
    """What a worker needs to map the node's tables (picklable, passed to spawned workers)."""

    state_dir: str
    arms_path: str
    events_path: str


class Node:
    """The node's arm table and held events, owned (built, folded, deleted) or attached (mapped)."""

    def __init__(self, handle: NodeHandle, arms: ArmTable, events: EventRing, maps: list[mmap.mmap]) -> None:
        self.handle = handle
        self.arms = arms
        self.events = events
        self.state_dir = Path(handle.state_dir)
        self._maps = maps
        self._lock_fd = -1
        self._folder: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    @property
    def decisions_dir(self) -> Path:
        return self.state_dir / "decisions"

    @classmethod
    def open(cls, settings: Settings) -> Node:
        """Own a node: lock the state directory, build the tables, start folding the journal.

        Raises:
            FeatureSourceError: the state directory is in use or unusable, or the catalogue does not load.
        """
        state_dir = settings.state_path()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = _lock(state_dir)
        except OSError as exc:
            raise FeatureSourceError(f"cannot use state directory {state_dir}: {exc.strerror or exc}") from None
        try:
            node = cls._build(settings, state_dir)
        except BaseException:
            os.close(lock_fd)
            raise
        node._lock_fd = lock_fd
        node._folder = threading.Thread(target=node._fold_every, args=(settings,), name="mab-checkpoint", daemon=True)
        node._folder.start()
        return node

    @classmethod
    def attach(cls, handle: NodeHandle) -> Node:
        """Map the tables of a node another process owns."""
        arms_map, events_map = _map(Path(handle.arms_path)), _map(Path(handle.events_path))
        return cls(handle, ArmTable.attach(arms_map), EventRing.attach(events_map), [arms_map, events_map])

    def close(self) -> None:
        """Unmap; the owner also stops folding, deletes the shared files and unlocks the state directory."""
        owner = self._lock_fd >= 0
        if self._folder is not None:
            self._stop.set()
            self._folder.join()
        self.events.close()
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a numpy view still alive: the mapping goes with the process
                m.close()
        self._maps = []
        if owner:
            for path in (self.handle.arms_path, self.handle.events_path):
                Path(path).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def _build(cls, settings: Settings, state_dir: Path) -> Node:
        started = time.perf_counter()
        _remove_stale_shared_files()
        checkpoint = _read_checkpoint(state_dir)
        catalogue = _catalogue(settings)
        with contextlib.ExitStack() as stack:
            rows, id_bytes = 0, 0
            path = None
            if catalogue is not None:
                path = stack.enter_context(catalogue)
                rows, id_bytes = ArmTable.csv_rows_upper_bound(str(path))
            learned = len(checkpoint.arms)
            capacity = rows + settings.max_new_arms + learned
            id_bytes += (settings.max_new_arms + learned) * NEW_ARM_ID_BYTES
            token = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            shm = SHM_DIR if SHM_DIR.is_dir() else state_dir
            arms_path, events_path = shm / f"{token}-arms", shm / f"{token}-events"
            arms_map = _create(arms_path, ArmTable.bytes_needed(capacity, id_bytes), reserve=False)
            arms = ArmTable.create(arms_map, capacity, id_bytes)
            if path is not None:
                try:
                    arms.load_csv(str(path))
                except (OSError, ValueError) as exc:
                    arms_path.unlink(missing_ok=True)  # the mapping goes with the table object
                    raise FeatureSourceError(str(exc)) from None
            size = EventRing.bytes_needed(settings.max_held_events, settings.max_held_members)
            try:
                events_map = _create(events_path, size, reserve=True)
            except BaseException:
                arms_path.unlink(missing_ok=True)  # the mapping goes with the table object
                raise
            events = EventRing.create(
                events_map, settings.max_held_events, settings.max_held_members, settings.reward_window_s
            )
        handle = NodeHandle(str(state_dir), str(arms_path), str(events_path))
        node = cls(handle, arms, events, [arms_map, events_map])
        replayed = node._replay(settings, checkpoint)
        _prune(node.decisions_dir, settings.decision_log_max_bytes)
        logger.info(
            "loop state ready in %.1f s: %d arms (%d MB shared), %d events held, %d journal records replayed",
            time.perf_counter() - started,
            len(arms),
            arms.memory_bytes // 2**20,
            events.stats(time.time())["held"],
            replayed,
        )
        return node

    def _replay(self, settings: Settings, checkpoint: Checkpoint) -> int:
        """Counts from the checkpoint and the journal; the events of the last window, with their rewards."""
        prior = settings.prior_alpha, settings.prior_beta
        paths = [p for p in journal_files(self.journal_dir) if p.name not in checkpoint.folded]
        tally = Tally.of(paths, horizon=time.time() - settings.reward_window_s)
        for arm_id, (shown, got) in checkpoint.arms.items():
            tally.impressions[arm_id] += shown
            tally.rewards[arm_id] = tally.rewards.get(arm_id, 0.0) + got
        for arm_id in tally.impressions.keys() | tally.rewards.keys():
            shown = tally.impressions.get(arm_id, 0)
            got = tally.rewards.get(arm_id, 0.0)
            # A reward always follows a counted impression; after a power loss the impression may be the part that
            # was not yet synced. Count it then, so beta never falls below the arm's beta0.
            shown = max(shown, int(np.ceil(got)))
            if not self.arms.add(arm_id, shown, got, *prior):
                logger.warning("arm table full: the counts of %r are not restored", arm_id)
        for event_id, (t, ids) in tally.recent.items():
            self.events.restore(event_id, ids, t, tally.rewarded.get(event_id, []))
        return tally.records

    # -- folding the journal into the checkpoint ----------------------------------------------------------------

    def _fold_every(self, settings: Settings) -> None:
        while not self._stop.wait(settings.checkpoint_interval_s):
            try:
                fold(self.state_dir, time.time() - settings.reward_window_s * 1.5 - settings.checkpoint_interval_s)
            except Exception:
                logger.exception("checkpoint failed; the journal files stay and are tried again")


@dataclass
class Checkpoint:
    folded: set[str]
    """Journal files already counted here (deleted after the checkpoint is written; listed in case that failed)."""
    arms: dict[str, tuple[int, float]]
    """Per arm: impressions and rewards of the folded files."""


@dataclass
class Tally:
    """What journal files add up to: per arm, impressions and rewards (each (event, id) rewarded once), and, for
    the events written after ``horizon``, their ids and the ids rewarded."""

    impressions: Counter[str] = field(default_factory=Counter)
    rewards: dict[str, float] = field(default_factory=dict)
    recent: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    rewarded: dict[str, list[str]] = field(default_factory=dict)
    records: int = 0

    @classmethod
    def of(cls, paths: list[Path], horizon: float | None = None) -> Tally:
        tally = cls()
        seen: set[tuple[str, str]] = set()
        for path in paths:
            for record in journal.read_records(path):
                tally.records += 1
                if record[0] == "e":
                    _, t, event_id, ids = record
                    tally.impressions.update(ids)
                    if horizon is not None and t >= horizon:
                        tally.recent[event_id] = (t, ids)
                elif record[0] == "r":
                    _, t, event_id, arm_id, value = record
                    if (event_id, arm_id) in seen:
                        continue
                    seen.add((event_id, arm_id))
                    tally.rewards[arm_id] = tally.rewards.get(arm_id, 0.0) + value
                    tally.rewarded.setdefault(event_id, []).append(arm_id)
        return tally


def journal_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{journal.SUFFIX}"))


def fold(state_dir: Path, older_than: float) -> int:
    """Fold the journal files last written before ``older_than`` (unix time) into the checkpoint; delete them.

    A file is folded only when every event in it is past the reward window, so the events a restart must hold
    again are always in unfolded files. Returns how many files were folded.
    """
    directory = state_dir / "journal"
    ripe = [p for p in journal_files(directory) if p.stat().st_mtime < older_than]
    if not ripe:
        return 0
    checkpoint = _read_checkpoint(state_dir)
    tally = Tally.of([p for p in ripe if p.name not in checkpoint.folded])
    counts = {arm_id: [shown, got] for arm_id, (shown, got) in checkpoint.arms.items()}
    for arm_id, shown in tally.impressions.items():
        counts.setdefault(arm_id, [0, 0.0])[0] += shown
    for arm_id, got in tally.rewards.items():
        counts.setdefault(arm_id, [0, 0.0])[1] += got
    present = {p.name for p in journal_files(directory)}
    folded = {name for name in checkpoint.folded if name in present} | {p.name for p in ripe}
    document = {"version": 1, "folded": sorted(folded), "arms": [[k, v[0], v[1]] for k, v in counts.items()]}
    _write_atomically(state_dir / CHECKPOINT, orjson.dumps(document))
    for path in ripe:
        path.unlink(missing_ok=True)
    logger.info("checkpoint: folded %d journal files; %d arms with feedback", len(ripe), len(counts))
    return len(ripe)


def _read_checkpoint(state_dir: Path) -> Checkpoint:
    path = state_dir / CHECKPOINT
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return Checkpoint(set(), {})
    except (OSError, orjson.JSONDecodeError) as exc:
        raise FeatureSourceError(f"cannot read the checkpoint {path}: {exc}") from None
    arms = {str(arm_id): (int(shown), float(got)) for arm_id, shown, got in document["arms"]}
    return Checkpoint(set(document["folded"]), arms)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _catalogue(settings: Settings) -> contextlib.AbstractContextManager[Path] | None:
    """The CSV file the arm table starts from: the demo catalogue, ``csv:PATH``, or none (a Vertex source)."""
    spec = parse_spec(settings.features)
    if spec.kind == "demo":
        return resources.as_file(resources.files("mab_service.data").joinpath("demo.csv"))
    if spec.kind == "csv":
        path = Path(spec.target)
        if not path.is_file():
            raise FeatureSourceError(f"cannot read feature table {path}: no such file")
        return contextlib.nullcontext(path)
    return None


def _prune(directory: Path, max_bytes: int) -> None:
    """Delete the oldest decision log files of earlier runs until they hold at most ``max_bytes`` (each running
    worker bounds its own files; this bounds what the workers of earlier runs left)."""
    if not directory.is_dir():
        return
    files = sorted(directory.glob("*.dlog"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for path in files:
        if total <= max_bytes:
            break
        total -= path.stat().st_size
        path.unlink(missing_ok=True)


def _lock(state_dir: Path) -> int:
    fd = os.open(state_dir / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FeatureSourceError(
            f"state directory {state_dir} is in use by pid {holder}; give each node its own --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _create(path: Path, size: int, *, reserve: bool) -> mmap.mmap:
    """A zero-filled shared file of ``size`` bytes, mapped. ``reserve`` takes its memory now, so that a /dev/shm too
    small for it fails here with a clear error instead of a SIGBUS when a page is first touched under load."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)  # zero-filled; tmpfs gives pages only as they are touched
        if reserve:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise FeatureSourceError(
                    f"cannot take {size / 2**20:.0f} MiB in {path.parent} for the loop's tables ({exc.strerror}): "
                    "give it more room (Docker: --shm-size; Kubernetes: a memory emptyDir) or lower "
                    "--max-held-events / --max-held-members"
                ) from None
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _map(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _remove_stale_shared_files() -> None:
    """Delete the shared files of owners that died without closing (kill -9): they hold memory until deleted."""
    if not SHM_DIR.is_dir():
        return
    for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        pid = path.name[len(SHM_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The nodes this process has open or attached, by state directory, with how many users each has.
_open: dict[Path, list[Any]] = {}


@contextlib.contextmanager
def using(settings: Settings) -> Iterator[Node]:
    """The node of ``settings``' state directory: the one this process already has (from ``serve``, a worker's
    attach, or another app in the process), else one opened here and closed when the last user leaves."""
    key = settings.state_path().resolve()
    entry = _open.get(key)
    if entry is None:
        entry = _open[key] = [Node.open(settings), 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _open[key]
            entry[0].close()


def adopt(node: Node) -> None:
    """Make ``node`` (opened or attached by ``serve`` or a worker) the one ``using`` gives for its directory; it
    stays open for as long as the process runs."""
    _open[Path(node.handle.state_dir).resolve()] = [node, 1]
