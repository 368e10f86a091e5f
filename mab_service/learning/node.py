"""The node's loop state: the arm table and the held events, in shared memory that every worker maps.

One process owns a node: the one that runs ``serve`` (the supervisor under ``--workers N``, else the server
itself), or an app's lifespan when no node is open in its process (tests, embedding). The owner

1. takes the state directory's lock (``node.lock``): one node serves from one state directory;
2. builds both tables in files under ``/dev/shm``: the catalogue streamed from its CSV into the arm table, then the
   counts of the checkpoint and of every journal file not yet folded into it, then the events of the last reward
   window with the rewards they got (so that a duplicate is still a duplicate after a restart);
3. folds closed journal files whose records are all older than the window into the checkpoint every
   ``checkpoint_interval_s``, and keeps the decision log files within the node's budget (a thread);
4. deletes the shared files when it closes.

Workers map the same files (``Node.attach``) from the ``NodeHandle`` the owner gives them, so an impression or a
reward that one worker counts is in every worker's next answer. Only the journal (``journal.py``) is durable; the
shared files are rebuilt from it at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import mmap
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.features.factory import parse_spec
from mab_service.ids import KEY_SEPARATOR, pair_key, segment_key
from mab_service.learning import decisions, journal
from mab_service.learning._arms import ArmTable
from mab_service.learning._events import EventRing

logger = logging.getLogger("mab_service.learning")

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "mab-service-"
CHECKPOINT = "checkpoint.bin"
#: The checkpoint's earlier format, read once (when no CHECKPOINT exists) and replaced by the next fold.
LEGACY_CHECKPOINT = "checkpoint.json"
#: The checkpoint's header: magic, version, rows, bytes of keys, bytes of folded file names; version 2 adds the
#: half-life and the landmark its counts are weighted to.
_CHECKPOINT_HEAD_V1 = struct.Struct("<4sIQQQ")
_CHECKPOINT_HEAD = struct.Struct("<4sIQQQdd")
_CHECKPOINT_MAGIC = b"MABK"
_CHECKPOINT_VERSION = 2
#: Most seconds between two prunes of the decision log (folds come every ``checkpoint_interval_s``).
PRUNE_S = 10.0
#: Bytes of id text reserved per arm first seen at run time.
NEW_ARM_ID_BYTES = 32
#: Bytes of key text reserved per segment row ("\0" + segment + "\0" + arm id).
NEW_SEGMENT_KEY_BYTES = 48


@dataclass(frozen=True)
class NodeHandle:
    """What a worker needs to map the node's tables (picklable, passed to spawned workers)."""

    state_dir: str
    arms_path: str
    events_path: str
    journal_max_bytes: int = 0
    """The node's journal budget (``Budget``), 0 for none."""
    journal_min_free_bytes: int = 0


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
        self._finished: frozenset[str] = frozenset()  # journal writers of earlier runs: none of them appends any more

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"

    @property
    def decisions_dir(self) -> Path:
        return self.state_dir / "decisions"

    @property
    def journal_budget(self) -> journal.Budget | None:
        """The disk the journals of the node's workers may take together."""
        handle = self.handle
        if not handle.journal_max_bytes:
            return None
        return journal.Budget(handle.journal_max_bytes, handle.journal_min_free_bytes)

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
        # Taken before any worker of this run writes: the writers of the files present now are all finished.
        finished = frozenset(journal.segment_of(p)[0] for p in journal_files(state_dir / "journal"))
        checkpoint = read_checkpoint(state_dir)
        catalogue = _catalogue(settings)
        with contextlib.ExitStack() as stack:
            rows, id_bytes = 0, 0
            path = None
            if catalogue is not None:
                path = stack.enter_context(catalogue)
                rows, id_bytes = ArmTable.csv_rows_upper_bound(str(path))
            segment_keys = [key for key in checkpoint.arms if key.startswith(KEY_SEPARATOR)]
            learned = len(checkpoint.arms) - len(segment_keys)
            # Segment rows have room of their own (the table keeps them apart): a flood of segments fills only it.
            segment_rows = settings.max_segment_rows + len(segment_keys)
            segment_id_bytes = settings.max_segment_rows * NEW_SEGMENT_KEY_BYTES + sum(
                len(key.encode()) for key in segment_keys
            )
            capacity = rows + settings.max_new_arms + learned + segment_rows
            id_bytes += (settings.max_new_arms + learned) * NEW_ARM_ID_BYTES + segment_id_bytes
            token = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            shm = SHM_DIR if SHM_DIR.is_dir() else state_dir
            arms_path, events_path = shm / f"{token}-arms", shm / f"{token}-events"
            arms_map = _create(arms_path, ArmTable.bytes_needed(capacity, id_bytes, segment_rows), reserve=False)
            arms = ArmTable.create(
                arms_map, capacity, id_bytes, segment_rows, segment_id_bytes, settings.half_life_s, time.time()
            )
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
        handle = NodeHandle(
            str(state_dir),
            str(arms_path),
            str(events_path),
            settings.journal_max_bytes,
            settings.journal_min_free_bytes,
        )
        node = cls(handle, arms, events, [arms_map, events_map])
        node._finished = finished
        replayed = node._replay(settings, checkpoint)
        prune_decisions(node.decisions_dir, settings.decision_log_max_bytes * settings.workers)
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
        """Counts from the checkpoint and the journal; the events of the last window, with their rewards.

        With a half-life, the journal's records are weighed by their own times against the table's landmark, and
        the checkpoint's sums are moved from its landmark to the table's: the same sums the live table would hold.
        """
        prior = settings.prior_alpha, settings.prior_beta
        half_life = settings.half_life_s
        landmark = self.arms.landmark
        paths = [p for p in journal_files(self.journal_dir) if p.name not in checkpoint.folded]
        horizon = time.time() - settings.reward_window_s
        tally = Tally.of(paths, horizon, half_life_s=half_life, landmark=landmark)
        if checkpoint.half_life_s != half_life and checkpoint.arms:
            logger.warning(
                "the checkpoint's counts were weighted with a half-life of %g s, the node's is %g s: they are taken "
                "as made at %.0f",
                checkpoint.half_life_s,
                half_life,
                checkpoint.landmark,
            )
        scale = tally.weight(checkpoint.landmark)
        for key, (shown, got) in checkpoint.arms.items():
            tally.impressions[key] = tally.impressions.get(key, 0.0) + shown * scale
            tally.rewards[key] = tally.rewards.get(key, 0.0) + got * scale
        for key in tally.impressions.keys() | tally.rewards.keys():
            shown = tally.impressions.get(key, 0.0)
            got = tally.rewards.get(key, 0.0)
            # A reward always follows a counted impression; after a power loss the impression may be the part that
            # was not yet synced. Count it then, so beta never falls below the arm's beta0.
            shown = max(shown, got if half_life else math.ceil(got))
            if not self.arms.add(key, shown, got, *prior, landmark):
                logger.warning("arm table full: the counts of %r are not restored", key)
        for event_id, (t, ids, segment) in tally.recent.items():
            tag = 0
            if segment is not None:
                tag = self.arms.find_or_insert(segment_key(segment), *prior) + 1
            self.events.restore(event_id, ids, t, tally.rewarded.get(event_id, []), tag=tag)
        return tally.records

    # -- folding the journal into the checkpoint ----------------------------------------------------------------

    def _fold_every(self, settings: Settings) -> None:
        interval_s = settings.checkpoint_interval_s
        folded_at = time.monotonic()
        while not self._stop.wait(min(interval_s, PRUNE_S)):
            # With a half-life, the decay's landmark moves on long before its weights could overflow.
            if self.arms.rebase():
                logger.info("the counts' landmark moved on to %.0f", self.arms.landmark)
            try:
                prune_decisions(self.decisions_dir, settings.decision_log_max_bytes * settings.workers)
            except Exception:
                logger.exception("pruning the decision log failed; it is tried again")
            if time.monotonic() - folded_at < interval_s:
                continue
            folded_at = time.monotonic()
            try:
                older_than = time.time() - settings.reward_window_s * 1.5 - interval_s
                fold(self.state_dir, older_than, finished=self._finished, half_life_s=settings.half_life_s)
            except Exception:
                logger.exception("checkpoint failed; the journal files stay and are tried again")


@dataclass
class Checkpoint:
    folded: set[str]
    """Journal files already counted here (deleted after the checkpoint is written; listed in case that failed)."""
    arms: dict[str, tuple[float, float]]
    """Per arm and segment key with counts: impressions and rewards of the folded files, weighted to ``landmark``
    with ``half_life_s`` (plain sums without a half-life)."""
    half_life_s: float = 0.0
    landmark: float = 0.0


@dataclass
class Tally:
    """What journal files add up to: per arm and segment key, impressions and rewards (each (event, id) rewarded
    once), each weighing 2 ** ((t - landmark) / half_life_s) with a half-life, 1 without; and, for the events written
    after ``horizon``, their ids, segment and the ids rewarded."""

    half_life_s: float = 0.0
    landmark: float = 0.0
    impressions: dict[str, float] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    recent: dict[str, tuple[float, list[str], str | None]] = field(default_factory=dict)
    rewarded: dict[str, list[str]] = field(default_factory=dict)
    records: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def of(
        cls, paths: list[Path], horizon: float | None = None, *, half_life_s: float = 0.0, landmark: float = 0.0
    ) -> Tally:
        tally = cls(half_life_s, landmark)
        for path in paths:
            tally.add(journal.read_records(path), horizon)
        return tally

    def weight(self, t: float) -> float:
        """What a count made at ``t`` adds: forward decay's 2 ** ((t - landmark) / half_life_s), or 1."""
        return 2.0 ** ((t - self.landmark) / self.half_life_s) if self.half_life_s else 1.0

    def add(self, records: Iterable[list[Any]], horizon: float | None = None) -> None:
        impressions, rewards = self.impressions, self.rewards
        for record in records:
            self.records += 1
            if record[0] == "e":
                _, t, event_id, ids, *rest = record
                segment = rest[0] if rest else None
                w = self.weight(t)
                for arm_id in ids:
                    impressions[arm_id] = impressions.get(arm_id, 0.0) + w
                if segment is not None:
                    for arm_id in ids:
                        key = pair_key(segment, arm_id)
                        impressions[key] = impressions.get(key, 0.0) + w
                    key = segment_key(segment)
                    impressions[key] = impressions.get(key, 0.0) + w * len(ids)
                if horizon is not None and t >= horizon:
                    self.recent[event_id] = (t, ids, segment)
            elif record[0] == "r":
                _, t, event_id, arm_id, value, *rest = record
                if (event_id, arm_id) in self.seen:
                    continue
                self.seen.add((event_id, arm_id))
                value *= self.weight(t)
                keys = [arm_id] if not rest else [arm_id, pair_key(rest[0], arm_id), segment_key(rest[0])]
                for key in keys:
                    rewards[key] = rewards.get(key, 0.0) + value
                self.rewarded.setdefault(event_id, []).append(arm_id)


def journal_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{journal.SUFFIX}"))


def closed_files(paths: list[Path], finished: Collection[str] = ()) -> list[Path]:
    """The journal files nobody appends to any more: each followed by a newer file of its writer (a writer never
    goes back to a file), or ending in ``journal.CLOSED``, or of a writer in ``finished`` (present when the node
    started) or whose process is gone. Names and contents decide, never clocks."""
    writers: dict[str, list[tuple[int, Path]]] = {}
    for path in paths:
        writer, seq = journal.segment_of(path)
        writers.setdefault(writer, []).append((seq, path))
    done: list[Path] = []
    for writer, segments in writers.items():
        segments.sort()
        done += [path for _, path in segments[:-1]]
        last = segments[-1][1]
        if writer in finished or journal.closed(last) or not _writer_alive(writer):
            done.append(last)
    return sorted(done)


def fold(state_dir: Path, older_than: float, *, finished: Collection[str] = (), half_life_s: float = 0.0) -> int:
    """Fold the closed journal files whose records are all older than ``older_than`` (unix time, the records' own)
    into the checkpoint; delete them.

    A file is folded only when every event in it is past the reward window, so the events a restart must hold
    again are always in unfolded files; and only when it is closed (``closed_files``), so no record can still be
    added to it. The file's mtime only lets a file written since ``older_than`` be skipped unread. Returns how
    many files were folded.

    With a half-life, every fold weighs the counts to a new landmark, ``older_than``: no record folded is newer, so
    no weight exceeds 1, and counts that decayed to nothing leave the checkpoint.
    """
    directory = state_dir / "journal"
    files = journal_files(directory)
    checkpoint = read_checkpoint(state_dir)
    leftovers = [p for p in files if p.name in checkpoint.folded]  # counted; their deletion failed last time
    tally = Tally(half_life_s, older_than if half_life_s else 0.0)
    ripe: list[Path] = []
    for path in closed_files([p for p in files if p.name not in checkpoint.folded], finished):
        try:
            if path.stat().st_mtime >= older_than:
                continue
            records = list(journal.read_records(path))
        except FileNotFoundError:
            continue
        newest = max((r[1] for r in records if r[0] in ("e", "r")), default=-math.inf)
        if newest < older_than:
            tally.add(records)
            ripe.append(path)
    if not ripe and not leftovers and not (state_dir / LEGACY_CHECKPOINT).exists():
        return 0
    scale = tally.weight(checkpoint.landmark)
    counts = {key: [shown * scale, got * scale] for key, (shown, got) in checkpoint.arms.items()}
    for key, shown in tally.impressions.items():
        counts.setdefault(key, [0.0, 0.0])[0] += shown
    for key, got in tally.rewards.items():
        counts.setdefault(key, [0.0, 0.0])[1] += got
    arms = {key: (float(shown), float(got)) for key, (shown, got) in counts.items() if shown or got}
    present = {p.name for p in files}
    folded = {name for name in checkpoint.folded if name in present} | {p.name for p in ripe}
    updated = Checkpoint(folded, arms, half_life_s, tally.landmark)
    journal.write_atomically(state_dir / CHECKPOINT, encode_checkpoint(updated))
    (state_dir / LEGACY_CHECKPOINT).unlink(missing_ok=True)  # upgraded: its counts are in the new file
    for path in ripe + leftovers:
        journal.remove(path)
    if ripe:
        logger.info("checkpoint: folded %d journal files; %d arms with feedback", len(ripe), len(arms))
    return len(ripe)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The checkpoint file: a header (``_CHECKPOINT_HEAD``), per key its impressions, then per key its rewards
    (float64), then per key its length (uint32), the keys (UTF-8), the folded file names (UTF-8, one per line), and
    the CRC-32 of all that (uint32), little-endian. About 20 bytes plus the key per arm or segment key with counts, and
    nothing else that grows.

    Without a half-life the counts are whole and the file is version 1 (impressions int64, ``_CHECKPOINT_HEAD_V1``),
    which earlier releases read too; with one, version 2 adds the half-life and the landmark to the header and keeps
    impressions as float64."""
    ids = [arm_id.encode() for arm_id in checkpoint.arms]
    n = len(ids)
    values = checkpoint.arms.values()
    whole = checkpoint.half_life_s == 0
    impressions = np.fromiter((shown for shown, _ in values), "<f8", n)
    if whole:
        impressions = impressions.astype("<i8")
    rewards = np.fromiter((got for _, got in values), "<f8", n)
    lengths = np.fromiter(map(len, ids), "<u4", n)
    blob = b"".join(ids)
    folded = "\n".join(sorted(checkpoint.folded)).encode()
    if whole:
        head = _CHECKPOINT_HEAD_V1.pack(_CHECKPOINT_MAGIC, 1, n, len(blob), len(folded))
    else:
        head = _CHECKPOINT_HEAD.pack(
            _CHECKPOINT_MAGIC,
            _CHECKPOINT_VERSION,
            n,
            len(blob),
            len(folded),
            checkpoint.half_life_s,
            checkpoint.landmark,
        )
    body = b"".join((head, impressions.tobytes(), rewards.tobytes(), lengths.tobytes(), blob, folded))
    return body + struct.pack("<I", zlib.crc32(body))


def decode_checkpoint(data: bytes) -> Checkpoint:
    """The checkpoint ``encode_checkpoint`` wrote, exactly; or one of version 1 (integer impressions, no half-life).

    Raises:
        ValueError: the file is not a checkpoint of a known version, or is damaged.
    """
    if len(data) < _CHECKPOINT_HEAD_V1.size + 4:
        raise ValueError("too short")
    magic, version = struct.unpack_from("<4sI", data)
    if magic != _CHECKPOINT_MAGIC or version not in (1, _CHECKPOINT_VERSION):
        raise ValueError(f"not a version 1 or {_CHECKPOINT_VERSION} checkpoint")
    half_life_s = landmark = 0.0
    if version == 1:
        size = _CHECKPOINT_HEAD_V1.size
        _, _, n, id_bytes, folded_bytes = _CHECKPOINT_HEAD_V1.unpack_from(data)
    else:
        size = _CHECKPOINT_HEAD.size
        if len(data) < size + 4:
            raise ValueError("too short")
        _, _, n, id_bytes, folded_bytes, half_life_s, landmark = _CHECKPOINT_HEAD.unpack_from(data)
    if len(data) != size + 20 * n + id_bytes + folded_bytes + 4:
        raise ValueError("wrong length")
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise ValueError("checksum mismatch")
    if not (math.isfinite(half_life_s) and half_life_s >= 0 and math.isfinite(landmark)):
        raise ValueError(f"bad half-life {half_life_s!r} or landmark {landmark!r}")
    impressions = np.frombuffer(data, "<i8" if version == 1 else "<f8", n, size)
    rewards = np.frombuffer(data, "<f8", n, size + 8 * n)
    # Counts are read from a file: checked before they reach the table, which takes only finite counts >= 0.
    if not (np.all(np.isfinite(impressions) & (impressions >= 0)) and np.all(np.isfinite(rewards) & (rewards >= 0))):
        raise ValueError("a count is negative or not finite")
    ends = np.cumsum(np.frombuffer(data, "<u4", n, size + 16 * n), dtype=np.int64).tolist()
    at = size + 20 * n
    blob = data[at : at + id_bytes]
    arms: dict[str, tuple[float, float]] = {}
    start = 0
    for end, shown, got in zip(ends, impressions.tolist(), rewards.tolist()):
        arms[blob[start:end].decode()] = (shown, got)
        start = end
    folded = data[at + id_bytes : at + id_bytes + folded_bytes].decode()
    return Checkpoint(set(folded.split("\n")) if folded else set(), arms, half_life_s, landmark)


def read_checkpoint(state_dir: Path) -> Checkpoint:
    """The state directory's checkpoint; the earlier JSON one if the directory has no other; empty if none."""
    path = state_dir / CHECKPOINT
    try:
        return decode_checkpoint(path.read_bytes())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise FeatureSourceError(f"cannot read the checkpoint {path}: {exc}") from None
    path = state_dir / LEGACY_CHECKPOINT
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return Checkpoint(set(), {})
    except (OSError, orjson.JSONDecodeError) as exc:
        raise FeatureSourceError(f"cannot read the checkpoint {path}: {exc}") from None
    arms = {str(arm_id): (float(shown), float(got)) for arm_id, shown, got in document["arms"]}
    return Checkpoint(set(document["folded"]), arms)


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


def prune_decisions(directory: Path, max_bytes: int) -> int:
    """Delete the oldest decision log files until the node's hold at most ``max_bytes`` (``decision_log_max_bytes``
    per worker times the workers); never the newest file of a running writer, the one it may have open. Each
    running worker bounds its own files; this bounds what replaced workers and earlier runs left. Returns how many
    files were deleted."""
    if not directory.is_dir():
        return 0
    listed: list[tuple[float, str, Path, int]] = []
    for path in directory.glob(f"*{decisions.SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            listed.append((stat.st_mtime, path.name, path, stat.st_size))
    listed.sort()
    newest: dict[str, tuple[int, Path]] = {}
    for _, _, path, _ in listed:
        writer, seq = journal.segment_of(path)
        if writer not in newest or seq > newest[writer][0]:
            newest[writer] = (seq, path)
    open_files = {path for writer, (_, path) in newest.items() if _writer_alive(writer)}
    total = sum(size for *_, size in listed)
    deleted = 0
    for _, _, path, size in listed:
        if total <= max_bytes:
            break
        if path in open_files:
            continue
        path.unlink(missing_ok=True)
        total -= size
        deleted += 1
    return deleted


def _writer_alive(writer: str) -> bool:
    """Whether the process a writer's name (``{hex time}-{pid}``) names still runs; True when the name has no pid."""
    pid = writer.rpartition("-")[2]
    return not pid.isdigit() or _alive(int(pid))


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
