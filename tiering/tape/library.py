"""Tape libraries: cartridges in slots, one drive, and the drive lock every drive operation holds.

- ``VirtualLibrary`` (mode "virtual"): a folder of cartridge files (drive.py FileDrive) with barcode labels and
  slots; which cartridge is in the drive and where its head is are kept in ``drive.json`` under the flock of
  ``drive.lock``, so that the server's recaller and ``appliance tier run`` (two processes) share the drive.
- ``StLibrary`` (mode "st"): ``/dev/nstN`` and, when there is one, a changer driven with ``mtx``. NOT TESTED ON
  HARDWARE (the mtx output parser is tested on real sample text).
- ``LtfsLibrary`` (mode "ltfs"): one cartridge, mounted by hand as a folder.

Every cartridge carries a label as tape file 0: an 80-byte ANSI ``VOL1`` record (volume serial, our
implementation id, the tier that owns it, the full barcode) padded to one block; archives are tape files 1, 2, ...
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ConfigError, NotFound
from tiering.tape.drive import BLOCK_BYTES, FileDrive, LtfsDrive, Sleep, StDrive, TapeDrive, TapeError

LABEL_IMPLEMENTATION = "DICOMAPPLIANC"  # 13 characters, VOL1 columns 25-37
LABEL_RE = re.compile(r"^[A-Z0-9]{6}(L[5-9T]|M8)?$")


@dataclass(frozen=True)
class VolumeLabel:
    barcode: str  # e.g. VTL001L6
    tier: str  # the tier that owns the cartridge (VOL1 owner identifier, 14 characters at most)

    def encode(self) -> bytes:
        record = ("VOL1" + self.barcode[:6].ljust(6) + " " + " " * 13 + LABEL_IMPLEMENTATION.ljust(13)
                  + self.tier[:14].ljust(14) + self.barcode[:28].ljust(28) + "4")
        assert len(record) == 80
        return record.encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> VolumeLabel | None:
        """The label a tape file 0 holds, or None when it is not one of ours (blank, foreign, data)."""
        try:
            text = raw[:80].decode("ascii")
        except UnicodeDecodeError:
            return None
        if len(text) < 80 or not text.startswith("VOL1") or text[24:37].strip() != LABEL_IMPLEMENTATION:
            return None
        return cls(text[51:79].strip(), text[37:51].strip())


def check_barcode(label: str) -> str:
    if not LABEL_RE.match(label):
        raise ConfigError(f"cartridge label {label!r}: 6 capitals or digits, then the LTO generation (e.g. L6)")
    return label


@dataclass(frozen=True)
class Cartridge:
    """One cartridge as ``tape list`` shows it."""

    label: str
    slot: int | None  # its home slot (None: no changer)
    loaded: bool
    capacity_bytes: int
    used_bytes: int  # -1: unknown without reading the tape (st, not loaded)
    archives: int  # tape files after the label (the last may be open: no filemark yet)
    labelled: bool
    open_archive: bool | None = None  # data after the last filemark (a crash); None: unknown without the tape
    owner: str | None = None  # the tier its label names; None: unknown without reading the tape


class TapeLibrary(ABC):
    """Cartridges and one drive. ``session`` is the only way to the drive: it holds the drive lock (across
    processes) for one operation; the head position is never assumed across sessions (each positions first)."""

    name: str
    block_bytes: int = BLOCK_BYTES

    @abstractmethod
    def cartridges(self) -> list[Cartridge]: ...

    @abstractmethod
    def session(self, label: str | None) -> AbstractContextManager[TapeDrive]:
        """The drive with cartridge ``label`` loaded (None: whatever is loaded), under the drive lock."""

    @abstractmethod
    def load(self, label: str) -> None: ...

    @abstractmethod
    def eject(self) -> str | None:
        """Move the cartridge in the drive back to its slot; returns its label (None: the drive was empty)."""

    def capacity_of(self, label: str) -> int:
        for c in self.cartridges():
            if c.label == label:
                return c.capacity_bytes
        raise NotFound(f"tape tier {self.name}: no cartridge {label}")

    def read_label(self, drive: TapeDrive) -> VolumeLabel | None:
        drive.position_file(0)
        try:
            return VolumeLabel.decode(drive.read(self.block_bytes))
        except TapeError:
            return None

    def write_label(self, drive: TapeDrive, label: VolumeLabel) -> None:
        """Tape file 0 = the label; everything after it is erased (the cartridge starts blank)."""
        drive.rewind()
        drive.erase_from_head()  # LTFS: files are never rewritten, so the old ones go first
        drive.write(label.encode().ljust(drive.block_bytes, b"\x00"))
        drive.write_filemarks(1)


class _FlockMixin:
    lock_path: Path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A new open file description per call: flock excludes other threads of this process too.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# ---- virtual -------------------------------------------------------------------------------------------------

LIBRARY_FILE = "library.json"
DRIVE_STATE_FILE = "drive.json"
DRIVE_STATE_BYTES = 256  # labels are 8 characters, positions numbers: the JSON always fits


class VirtualLibrary(_FlockMixin, TapeLibrary):
    """Cartridge files ``<barcode>.tape`` (+ ``.marks``) in ``folder``; ``library.json`` lists them with their slot
    and capacity (a cartridge keeps the capacity it was created with)."""

    def __init__(self, folder: Path, name: str, block_bytes: int = BLOCK_BYTES, load_s: float = 0.0,
                 seek_s_per_gib: float = 0.0, sleep: Sleep = time.sleep, fsync: bool = True) -> None:
        self.folder, self.name, self.block_bytes = folder, name, block_bytes
        self.load_s, self.seek_s_per_gib, self.sleep, self.fsync = load_s, seek_s_per_gib, sleep, fsync
        self.lock_path = folder / "drive.lock"

    @staticmethod
    def barcode(number: int) -> str:
        return f"VTL{number:03d}L6"

    def exists(self) -> bool:
        return (self.folder / LIBRARY_FILE).exists()

    def _catalog(self) -> dict[str, dict[str, int]]:
        try:
            raw = json.loads((self.folder / LIBRARY_FILE).read_text())
            return {str(c["label"]): {"slot": int(c["slot"]), "capacity_bytes": int(c["capacity_bytes"])}
                    for c in raw["cartridges"]}
        except FileNotFoundError:
            raise NotFound(f"tape tier {self.name}: no virtual library at {self.folder} "
                           "(run `appliance tier init`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise TapeError(f"tape tier {self.name}: {self.folder / LIBRARY_FILE} is damaged: {exc}") from None

    def create(self, cartridges: int, capacity_bytes: int) -> list[str]:
        """Add cartridges up to ``cartridges`` (existing ones are kept as they are), each labelled for this tier.
        Returns the labels created."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            try:
                known = self._catalog()
            except NotFound:
                known = {}
            created = []
            for number in range(1, cartridges + 1):
                label = self.barcode(number)
                if label in known:
                    continue
                path = self.folder / f"{label}.tape"
                path.touch()
                drive = self._drive(label, capacity_bytes)
                drive.attach(0, 0)
                try:
                    self.write_label(drive, VolumeLabel(label, self.name))
                finally:
                    drive.close()
                known[label] = {"slot": number, "capacity_bytes": capacity_bytes}
                created.append(label)
            body = {"tier": self.name, "cartridges": [{"label": k, **v} for k, v in sorted(known.items())]}
            self._write_json(LIBRARY_FILE, body)
        return created

    def _write_json(self, name: str, body: object) -> None:
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "w") as fh:
            json.dump(body, fh)
            # The drive state is only a hint (every user positions the head itself; a lost state only costs a
            # simulated load), so only the cartridge list is flushed.
            if self.fsync and name == LIBRARY_FILE:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
        if self.fsync and name == LIBRARY_FILE:
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _save_state(self, state: dict[str, object]) -> None:
        """The drive state, rewritten in place as one small padded write (a rename per drive operation costs
        milliseconds on some filesystems). A torn or lost state is only a hint lost: see ``_write_json``."""
        raw = json.dumps(state).encode().ljust(DRIVE_STATE_BYTES)
        fd = os.open(self.folder / DRIVE_STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, raw, 0)
        finally:
            os.close(fd)

    def _state(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads((self.folder / DRIVE_STATE_FILE).read_text())
            return state
        except (FileNotFoundError, ValueError):
            return {"loaded": None, "file_number": 0, "offset": 0}

    def _drive(self, label: str, capacity_bytes: int) -> FileDrive:
        return FileDrive(self.folder / f"{label}.tape", capacity_bytes, self.block_bytes, self.load_s,
                         self.seek_s_per_gib, self.sleep, self.fsync)

    def loaded(self) -> str | None:
        with self._locked():
            loaded = self._state()["loaded"]
        return str(loaded) if loaded else None

    @contextmanager
    def session(self, label: str | None) -> Iterator[TapeDrive]:
        with self._locked():
            catalog = self._catalog()
            state = self._state()
            loaded = str(state["loaded"]) if state["loaded"] else None
            label = label or loaded
            if label is None:
                raise TapeError(f"tape tier {self.name}: no cartridge in the drive")
            if label not in catalog:
                raise NotFound(f"tape tier {self.name}: no cartridge {label}")
            drive = self._drive(label, catalog[label]["capacity_bytes"])
            try:
                if loaded == label:
                    drive.attach(int(str(state["file_number"])), int(str(state["offset"])))
                else:
                    if loaded is not None and loaded in catalog:  # rewind and unload the other one first
                        other = self._drive(loaded, catalog[loaded]["capacity_bytes"])
                        other.attach(int(str(state["file_number"])), int(str(state["offset"])))
                        other.unload()
                    self._save_state({"loaded": None, "file_number": 0, "offset": 0})
                    drive.load()
                yield drive
            finally:
                self._save_state({"loaded": label, "file_number": drive.file_number,
                                                    "offset": drive.offset})
                drive.close()

    def load(self, label: str) -> None:
        with self.session(label):
            pass

    def eject(self) -> str | None:
        with self._locked():
            catalog = self._catalog()
            state = self._state()
            loaded = str(state["loaded"]) if state["loaded"] else None
            if loaded is not None and loaded in catalog:
                drive = self._drive(loaded, catalog[loaded]["capacity_bytes"])
                drive.attach(int(str(state["file_number"])), int(str(state["offset"])))
                drive.unload()
            self._save_state({"loaded": None, "file_number": 0, "offset": 0})
        return loaded

    def cartridges(self) -> list[Cartridge]:
        catalog = self._catalog()
        # Read without the drive lock (a hint, and callable inside a session of this thread without a deadlock).
        state_loaded = self._state()["loaded"]
        loaded = str(state_loaded) if state_loaded else None
        result = []
        for label, info in sorted(catalog.items()):
            path = self.folder / f"{label}.tape"
            used = path.stat().st_size if path.exists() else 0
            try:
                marks = [int(x) for x in path.with_suffix(".marks").read_text().split()]
            except (FileNotFoundError, ValueError):
                marks = []
            files = len(marks) + (1 if used > (marks[-1] if marks else 0) else 0)
            volume = None
            if path.exists() and marks:
                with open(path, "rb") as fh:
                    volume = VolumeLabel.decode(fh.read(80))
            labelled = volume is not None
            result.append(Cartridge(label, info["slot"], label == loaded, info["capacity_bytes"], used,
                                    max(0, files - 1) if labelled else files, labelled,
                                    used > (marks[-1] if marks else 0), volume.tier if volume else None))
        return result


# ---- st + mtx ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangerElement:
    kind: str  # "drive", "slot", "mail" (import/export)
    number: int
    full: bool
    label: str | None  # the barcode (VolumeTag), when the changer read one
    source_slot: int | None = None  # drives: the slot the cartridge was loaded from


# The formats of mtx.c Status(): "Data Transfer Element %d:" + "Full (Storage Element %d Loaded)" or "Full (Unknown
# Storage Element Loaded)" or "Empty", then ":VolumeTag = %s" and ":AlternateVolumeTag = %s"; "      Storage Element
# %d%s:%s" with " IMPORT/EXPORT" and "Full " or "Empty", then ":VolumeTag=%s" and ":AlternateVolumeTag=%s".
_MTX_DRIVE = re.compile(r"^\s*Data Transfer Element (\d+):(Full|Empty)"
                        r"(?: \((?:Storage Element (\d+)|Unknown Storage Element) Loaded\))?"
                        r"(?::VolumeTag\s*=\s*([^:\s]+))?")
_MTX_SLOT = re.compile(r"^\s*Storage Element (\d+)( IMPORT/EXPORT)?:(Full|Empty)(?:\s*:VolumeTag\s*=\s*([^:\s]+))?")


def parse_mtx_status(text: str) -> list[ChangerElement]:
    """``mtx -f DEV status`` output -> its drives and slots. Lines it does not know are skipped."""
    elements = []
    for line in text.splitlines():
        if m := _MTX_DRIVE.match(line):
            elements.append(ChangerElement("drive", int(m[1]), m[2] == "Full", m[4],
                                           int(m[3]) if m[3] else None))
        elif m := _MTX_SLOT.match(line):
            elements.append(ChangerElement("mail" if m[2] else "slot", int(m[1]), m[3] == "Full", m[4]))
    return elements


class MtxChanger:
    """A SCSI medium changer through the ``mtx`` command (``mtx -f /dev/sgN status|load|unload``)."""

    def __init__(self, device: Path, timeout_s: float = 600.0) -> None:
        self.device, self.timeout_s = device, timeout_s

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(["mtx", "-f", str(self.device), *args], capture_output=True, text=True,
                                  timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TapeError(f"changer {self.device}: mtx {' '.join(args)}: {exc}") from None
        if done.returncode != 0:
            raise TapeError(f"changer {self.device}: mtx {' '.join(args)} failed: {done.stderr.strip()[:200]}")
        return done.stdout

    def status(self) -> list[ChangerElement]:
        return parse_mtx_status(self._run("status"))

    def load(self, slot: int, drive: int = 0) -> None:
        self._run("load", str(slot), str(drive))

    def unload(self, slot: int, drive: int = 0) -> None:
        self._run("unload", str(slot), str(drive))


def _lock_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_TAPE_LOCK_DIR", tempfile.gettempdir()))


class StLibrary(_FlockMixin, TapeLibrary):
    """``/dev/nstN`` plus an optional mtx changer (without one, cartridges are loaded by hand and the loaded one is
    known by its label). The drive lock is a file in $APPLIANCE_TAPE_LOCK_DIR (default: the temp folder)."""

    def __init__(self, device: Path, changer: Path | None, name: str, capacity_bytes: int,
                 block_bytes: int = BLOCK_BYTES) -> None:
        self.drive = StDrive(device, block_bytes)
        self.changer = MtxChanger(changer) if changer else None
        self.name, self.capacity_bytes, self.block_bytes = name, capacity_bytes, block_bytes
        self.lock_path = _lock_dir() / f"appliance-tape-{device.name}.lock"
        self.state_path = self.lock_path.with_suffix(".json")

    def _loaded_label(self) -> str | None:
        """Asked of the changer (or the tape's label) once, then remembered next to the lock: only holders of the
        lock move cartridges (an admin moving one by hand deletes the state file, or runs `appliance tape eject`)."""
        try:
            state = json.loads(self.state_path.read_text())
            return str(state["loaded"]) if state.get("loaded") else None
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        if self.changer is not None:
            drives = [e for e in self.changer.status() if e.kind == "drive" and e.number == 0]
            loaded = drives[0].label if drives and drives[0].full else None
        else:
            label = self.read_label(self.drive)
            loaded = label.barcode if label else None
        self._remember(loaded)
        return loaded

    def _remember(self, loaded: str | None) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"loaded": loaded}))
        os.replace(tmp, self.state_path)

    @contextmanager
    def session(self, label: str | None) -> Iterator[TapeDrive]:
        with self._locked():
            loaded = self._loaded_label()
            if label is not None and loaded != label:
                if self.changer is None:
                    raise TapeError(f"tape tier {self.name}: cartridge {label} is needed in {self.drive.device} "
                                    f"(loaded: {loaded or 'none'}); load it by hand")
                self._swap(label)
            try:
                yield self.drive
            finally:
                self.drive.close()

    def _swap(self, label: str) -> None:
        assert self.changer is not None
        elements = self.changer.status()
        drive = next((e for e in elements if e.kind == "drive" and e.number == 0), None)
        if drive is not None and drive.full:
            self.drive.unload()
            self.changer.unload(drive.source_slot or self._empty_slot(elements), 0)
        slot = next((e.number for e in elements if e.kind == "slot" and e.label == label), None)
        if slot is None:
            raise NotFound(f"tape tier {self.name}: cartridge {label} is not in the library")
        self._remember(None)  # while the robot moves, nothing is known to be in the drive
        self.changer.load(slot, 0)
        self.drive.load()
        self._remember(label)

    @staticmethod
    def _empty_slot(elements: list[ChangerElement]) -> int:
        for e in elements:
            if e.kind == "slot" and not e.full:
                return e.number
        raise TapeError("no empty slot to put the loaded cartridge back in")

    def load(self, label: str) -> None:
        with self.session(label):
            pass

    def eject(self) -> str | None:
        with self._locked():
            loaded = self._loaded_label()
            if loaded is None:
                return None
            self.drive.unload()
            if self.changer is not None:
                elements = self.changer.status()
                drive = next(e for e in elements if e.kind == "drive" and e.number == 0)
                self.changer.unload(drive.source_slot or self._empty_slot(elements), 0)
            self.state_path.unlink(missing_ok=True)
            return loaded

    def cartridges(self) -> list[Cartridge]:
        if self.changer is None:
            loaded = self._loaded_label()
            return [Cartridge(loaded, None, True, self.capacity_bytes, -1, -1, True)] if loaded else []
        result = []
        for e in self.changer.status():
            if e.full and e.label:
                result.append(Cartridge(e.label, e.source_slot if e.kind == "drive" else e.number,
                                        e.kind == "drive", self.capacity_bytes, -1, -1, True))
        return sorted(result, key=lambda c: c.label)


# ---- LTFS ----------------------------------------------------------------------------------------------------


class LtfsLibrary(_FlockMixin, TapeLibrary):
    """One LTFS cartridge mounted at ``mount`` (loaded and mounted by the admin: ``ltfs /mnt/ltfs``)."""

    block_bytes = 512

    def __init__(self, mount: Path, name: str, capacity_bytes: int, fsync: bool = True) -> None:
        self.mount, self.name, self.capacity_bytes = mount, name, capacity_bytes
        self.drive = LtfsDrive(mount, fsync)
        self.lock_path = _lock_dir() / f"appliance-ltfs-{name}.lock"

    def _volume(self) -> VolumeLabel | None:
        try:
            return VolumeLabel.decode((self.mount / "VOL1.label").read_bytes())
        except OSError:
            return None

    def _label(self) -> str | None:
        volume = self._volume()
        return volume.barcode if volume else None

    @contextmanager
    def session(self, label: str | None) -> Iterator[TapeDrive]:
        with self._locked():
            self.drive.load()
            mounted = self._label()
            if label is not None and mounted != label:
                raise TapeError(f"tape tier {self.name}: cartridge {label} is needed at {self.mount} "
                                f"(mounted: {mounted or 'none'})")
            try:
                yield self.drive
            finally:
                self.drive.close()

    def load(self, label: str) -> None:
        with self.session(label):
            pass

    def eject(self) -> str | None:
        return self._label()  # unmounting is the admin's (`umount`, then `ltfs` on the next cartridge)

    def cartridges(self) -> list[Cartridge]:
        volume = self._volume()
        if volume is None:
            return []
        label = volume.barcode
        files = [n for n in self.drive.files() if n > 0]
        sizes = [self.drive.path_of(n).stat().st_size for n in files]
        used = sum(sizes)
        archives = len(files) - (1 if sizes and sizes[-1] == 0 else 0)  # the empty file after the last filemark
        return [Cartridge(label, None, True, self.capacity_bytes, used, archives, True, bool(sizes and sizes[-1]),
                          volume.tier)]
