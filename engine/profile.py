"""The profile: everything fitted, in one versioned directory.

    PROFILE_DIR/
      profile.toml   human-readable: version, model shape, temperatures, thresholds, rules,
                     audit strata and rates, fit metrics, and the configuration it came from
      bank/          the k-NN reference bank (written by ``hitl_triage.engine.bank.save_bank``)
      watch/         the watch list, when feedback made one (``hitl_triage.engine.watchlist``)

A profile's ``version`` is ``"<generation>-<hash>"``: the generation counts refits (feedback makes
generation + 1 with ``parent`` pointing back), the hash is the first 12 hex digits of a BLAKE2b of
the profile's content and the bank's vectors, so two replicas holding the same version hold the
same profile. Loading checks the format and every field; ``check_shape`` checks a batch's M, C, D
against the profile with messages that name both values.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tomli_w

from .config import TriageConfig, from_dict, to_dict
from .decode import BatchValueError, check_bank_schema, check_schema
from .policy import Thresholds

if TYPE_CHECKING:
    from hitl_triage.kernels.knn import KnnIndex

    from .watchlist import WatchList

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMAT = 1
PROFILE_FILE = "profile.toml"
BANK_DIR = "bank"


class ProfileError(ValueError):
    """A profile directory is missing, malformed, or does not fit the input."""


@dataclasses.dataclass
class Profile:
    """A fitted triage policy. Build with :meth:`fit`, persist with :meth:`save` / :meth:`load`."""

    members: int
    classes: int
    dim: int | None
    temperature: float
    thresholds: Thresholds
    config: TriageConfig
    source_temperatures: dict[str, float] = dataclasses.field(default_factory=dict)
    class_names: list[str] = dataclasses.field(default_factory=list)
    fit_report: dict = dataclasses.field(default_factory=dict)
    bank: KnnIndex | None = None
    watch: WatchList | None = None
    generation: int = 1
    parent: str = ""
    created: str = ""
    version: str = ""
    path: Path | None = None

    def __post_init__(self):
        if not self.class_names:
            self.class_names = [str(c) for c in range(self.classes)]
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if not self.version:
            self.version = f"{self.generation}-{self.content_hash()}"

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def fit(cls, calibration, *, bank=None, config: TriageConfig | None = None, progress=None) -> "Profile":
        """Fit a profile from labelled calibration data and, optionally, bank embeddings.

        ``calibration``: an Arrow table/batch (or mapping of arrays) in the data contract with a
        ``label`` column; ``bank``: a table with an ``embedding`` column, or an array [N, D].
        ``progress(stage, done, total)`` is called as the fit advances. See ``engine.fit``.
        """
        from .fit import fit_profile

        config = (config or TriageConfig()).check_fit()
        _check_calibration_classes(calibration)
        _check_bank(calibration, bank)
        return fit_profile(calibration, bank=bank, config=config, progress=progress)

    # -- checks -----------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self.config.bank.k

    def check_shape(self, members: int, classes: int, dim: int | None) -> None:
        """Raise ProfileError when a batch's M, C or D differs from the profile's."""
        if members != self.members:
            raise ProfileError(f"logits: the profile expects M={self.members} ensemble members, the input has M={members}")
        if classes != self.classes:
            raise ProfileError(f"logits: the profile expects C={self.classes} classes, the input has C={classes}")
        if dim is not None and self.dim is not None and dim != self.dim:
            raise ProfileError(f"embedding: the profile's bank expects D={self.dim}, the input has D={dim}")

    # -- persistence ------------------------------------------------------------------------------

    def to_toml_dict(self) -> dict:
        thresholds = {k: v for k, v in to_dict(self.thresholds).items() if v is not None}
        body = {
            "profile": {
                "format": FORMAT,
                "version": self.version,
                "generation": self.generation,
                "parent": self.parent,
                "created": self.created,
            },
            "model": {
                "members": self.members,
                "classes": self.classes,
                "class_names": list(self.class_names),
                "dim": self.dim if self.dim is not None else 0,
            },
            "temperature": {"global": self.temperature, "per_source": dict(self.source_temperatures)},
            "thresholds": thresholds,
            "bank": _bank_entry(self.bank),
            "fit": _toml_safe(self.fit_report),
            "config": self.config.to_dict(),
        }
        if self.watch is not None:  # absent otherwise, so a profile without one hashes as before
            from .watchlist import WATCH_DIR

            body["watch"] = {"present": True, "rows": len(self.watch), "dim": self.watch.dim, "path": WATCH_DIR}
        return body

    def content_hash(self) -> str:
        """BLAKE2b of the profile's content (all but the [profile] identity), the bank vectors and
        the watched vectors."""
        return _content_hash(self.to_toml_dict(), self.bank, self.watch)

    def save(self, directory: str | Path) -> Path:
        """Write ``profile.toml`` (and the bank) into ``directory``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.bank is not None:
            from .bank import save_bank

            save_bank(self.bank, directory / BANK_DIR)
        if self.watch is not None:
            self.watch.save(directory)
        tmp = directory / (PROFILE_FILE + ".tmp")
        tmp.write_text(
            f"# hitl-triage profile {self.version}; written by `triage fit`. Safe to read; edit the\n"
            "# [config] tables and refit rather than editing thresholds by hand.\n" + tomli_w.dumps(self.to_toml_dict())
        )
        tmp.replace(directory / PROFILE_FILE)  # atomic: a reader sees the old file or the new one
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> "Profile":
        """Read a profile directory written by :meth:`save`, checking every field."""
        directory = Path(directory)
        path = directory / PROFILE_FILE
        if not path.is_file():
            raise ProfileError(f"profile: expected {path} to exist (a directory written by `triage fit`), found nothing")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"profile: {path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(f"profile: expected {path} to be UTF-8 text, found bytes that are not "
                               f"({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ProfileError(f"profile: expected {path} to be readable, found {exc.strerror or exc}") from None
        fmt = data.get("profile", {}).get("format")
        if fmt != FORMAT:
            raise ProfileError(f"profile.format: expected {FORMAT}, found {fmt!r} in {path}")
        try:
            ident, model, temp, bank = data["profile"], data["model"], data["temperature"], data["bank"]
            thresholds = from_dict(Thresholds, data["thresholds"], "thresholds")
            config = TriageConfig.from_dict(data["config"])
            members, classes = int(model["members"]), int(model["classes"])
        except KeyError as exc:
            raise ProfileError(f"profile: {path} lacks the entry {exc.args[0]!r}") from exc
        missing = _missing_keys(data["config"], config.to_dict(), "config")
        if missing:
            raise ProfileError(
                f"profile: {path} lacks {', '.join(missing[:5])}: the file is truncated or was not written by `triage fit`"
            )
        index = None
        if bank.get("present"):
            index = _load_bank(directory / bank["path"], mmap=mmap)
            if index.kind == "ivf" and "nprobe" in bank:
                index.nprobe = int(bank["nprobe"])
        watch = None
        entry = data.get("watch", {})
        if entry.get("present"):
            from .watchlist import WatchList

            try:
                watch = WatchList.load(directory, int(entry["rows"]), int(entry["dim"]))
            except (ValueError, OSError, KeyError) as exc:
                raise ProfileError(f"profile: the watch list in {directory} cannot be read ({exc}): the profile "
                                   "directory is truncated or damaged") from None
        profile = cls(
            members=members,
            classes=classes,
            dim=int(model.get("dim") or 0) or None,
            temperature=float(temp["global"]),
            source_temperatures={str(k): float(v) for k, v in temp.get("per_source", {}).items()},
            thresholds=thresholds,
            config=config,
            class_names=list(model.get("class_names", [])),
            fit_report=data.get("fit", {}),
            bank=index,
            watch=watch,
            generation=int(ident["generation"]),
            parent=str(ident.get("parent", "")),
            created=str(ident["created"]),
            version=str(ident["version"]),
            path=directory,
        )
        # The hash of the file as read (not as this code would write it again), so a newer
        # release that writes a profile differently still loads the old one unchanged.
        expected = f"{profile.generation}-{_content_hash(data, index, watch)}"
        if expected != profile.version:
            raise ProfileError(
                f"profile.version: the content of {directory} hashes to {expected}, the file says "
                f"{profile.version}: it was edited by hand or the bank changed; refit with `triage fit`"
            )
        return profile


def _load_bank(directory: Path, mmap: bool):
    """``load_bank``, its errors raised as ProfileError naming the file that cannot be read."""
    from .bank import load_bank

    try:
        return load_bank(directory, mmap=mmap)
    except (ValueError, OSError, EOFError) as exc:
        # numpy's messages for a short or damaged .npy ("mmap length is greater than file size")
        # name no file: find the first one whose size disagrees with its header.
        where = _damaged_npy(directory) or directory
        raise ProfileError(f"profile: the bank file {where} cannot be read ({exc}): the profile directory "
                           "is truncated or damaged; refit with `triage fit`") from None


def _damaged_npy(directory: Path) -> Path | None:
    """The first ``.npy`` file in ``directory`` that is shorter than its header says, or unreadable."""
    for path in sorted(directory.glob("*.npy")):
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(handle)
                needed = handle.tell() + int(np.prod(shape)) * dtype.itemsize
        except (ValueError, OSError, EOFError):
            return path
        if path.stat().st_size < needed:
            return path
    return None


def _check_bank(calibration, bank) -> None:
    """The bank has an ``embedding`` column (a table) and the calibration data's D (table or
    array [N, D]), refused naming the bank before anything is fitted."""
    dim = None
    if isinstance(calibration, (pa.Table, pa.RecordBatch)) and "embedding" in calibration.schema.names:
        dim = check_schema(calibration.schema, embedding="required", label="ignore").dim
    elif isinstance(calibration, Mapping) and len(getattr(calibration.get("embedding"), "shape", ())) == 2:
        dim = int(calibration["embedding"].shape[1])
    if isinstance(bank, (pa.Table, pa.RecordBatch)):
        check_bank_schema(bank.schema, dim=dim)
    elif dim is not None and len(getattr(bank, "shape", ())) == 2 and int(bank.shape[1]) != dim:
        raise BatchValueError("embedding", f"expected the bank's vectors to have the calibration data's D={dim}, "
                                           f"found D={int(bank.shape[1])} (an array of shape {list(bank.shape)})")


def _check_calibration_classes(calibration) -> None:
    """Refuse calibration data whose known labels (>= 0) are of fewer than two classes: a
    temperature and thresholds fitted on one class say nothing of the others (such a profile
    scored 10.7% holdout accuracy on a 10-class fleet). Labels that are absent or of the wrong
    type are left to the decoder, which names them."""
    if isinstance(calibration, (pa.Table, pa.RecordBatch)):
        if "label" not in calibration.schema.names or not pa.types.is_integer(calibration.schema.field("label").type):
            return
        classes = check_schema(calibration.schema, embedding="ignore", label="required").classes
        labels = calibration.column("label")
        known = pc.unique(pc.filter(labels, pc.greater_equal(labels, 0))).to_pylist()
    elif isinstance(calibration, Mapping) and calibration.get("label") is not None:
        label, logits = calibration["label"], calibration.get("logits")
        if logits is None or not hasattr(logits, "shape"):
            return
        try:
            values = np.asarray(label.cpu() if hasattr(label, "cpu") else label)
            classes = int(logits.shape[-1])
        except (TypeError, ValueError, RuntimeError, IndexError):
            return
        if values.dtype.kind not in "iu":
            return
        known = np.unique(values[values >= 0]).tolist()
    else:
        return
    if any(k >= classes for k in known):
        return  # labels out of range: the decoder names them
    if len(known) < 2:
        found = f"only class {known[0]}" if known else "no known label at all"
        raise BatchValueError("label", f"expected known labels of at least 2 classes in the calibration data "
                                       f"(a profile fitted on one class cannot tell right from wrong), found {found}")


def _content_hash(toml_dict: dict, bank, watch=None) -> str:
    body = {key: value for key, value in toml_dict.items() if key not in ("profile", "fit")}
    # [fit] holds metrics: they describe the fit and change no decision.
    digest = hashlib.blake2b(tomli_w.dumps(body).encode(), digest_size=16)
    if bank is not None:
        # The vectors decide every k-NN distance; the index parameters are in the body.
        digest.update(np.ascontiguousarray(bank.vectors).data)
    if watch is not None:
        digest.update(np.ascontiguousarray(watch.vectors).data)
    return digest.hexdigest()[:12]


def _bank_entry(bank) -> dict:
    if bank is None:
        return {"present": False, "rows": 0, "kind": "", "path": ""}
    entry = {"present": True, "rows": int(bank.ntotal), "dim": int(bank.dim), "kind": str(bank.kind), "path": BANK_DIR}
    if bank.kind == "ivf":
        entry.update(nlist=int(bank.nlist), nprobe=int(bank.nprobe))
    return entry


def _missing_keys(saved: dict, complete: dict, where: str) -> list[str]:
    """Keys of ``complete`` (nested) that ``saved`` lacks: a profile file is machine-written and
    whole, so a missing key means truncation or another writer, never "use the default"."""
    missing = []
    for key, value in complete.items():
        if key not in saved:
            missing.append(f"{where}.{key}")
        elif isinstance(value, dict) and value and isinstance(saved[key], dict):
            missing += _missing_keys(saved[key], value, f"{where}.{key}")
    return missing


def _toml_safe(value):
    """Fit reports hold numpy scalars and None; TOML wants plain values and no nulls."""
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_safe(v) for v in value if v is not None]
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    return value
