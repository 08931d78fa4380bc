"""What a checkpoint file that flowgen cannot use actually is, told from its bytes.

This module owns the diagnosis behind ``flowgen.checkpoints.reading.load_checkpoint``'s errors. It runs
only after ``torch.load(weights_only=True)`` has failed, or has returned something that is not a
Lightning checkpoint, so a good checkpoint costs nothing extra. It names the real cause in one
sentence: a directory, an unreadable or empty file, a zip archive or a pickle cut short, text,
binary data that is neither a zip nor a pickle, a zip that is not a torch checkpoint, a pickle of
plain data, a bare state dict. Only a pickle that names callables torch's weights-only unpickler
refuses is reported as carrying code.

Nothing is unpickled here: the file's first bytes are compared with the zip and pickle signatures,
and pickle streams are listed opcode by opcode (``pickletools.genops``), with the stack each opcode
needs checked the way ``pickletools.dis`` does (random bytes fail that within a few opcodes), never executed.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from flowgen.errors import one_line

ZIP_MAGIC = b"PK\x03\x04"  # a local file header: torch.save's default format is a zip archive
EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # an archive with no members (only its end record)
PROTO = 0x80  # the opcode that opens a pickle of protocol 2 or later
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch.save(..., _use_new_zipfile_serialization=False)
HEAD_BYTES = 64 * 1024  # how much of a file is read to tell text from binary data
SCAN_LIMIT = 256 * 1024 * 1024  # pickle streams longer than this are not listed to their end

USE_ANOTHER = "pass a checkpoint train.py wrote (<run>/checkpoints/*.ckpt) or its run directory"
NOT_A_PICKLE = "cannot be read: it holds binary data that is neither a zip archive (torch.save's format) nor a pickle"
COPY_AGAIN = "copy it again, or pass another checkpoint of the run (train.py never leaves last.ckpt cut short)"

# opcodes whose argument is a string the pickle pushes (a STACK_GLOBAL takes its module and name from two of them)
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_EXT_OPS = {"EXT1", "EXT2", "EXT4"}  # the copyreg extension registry: a callable named by a number


def why_unreadable(path: Path, error: BaseException) -> str:
    """The one-line message for a checkpoint ``torch.load(weights_only=True)`` could not load: what the
    file is and what to do. ``error`` is torch's exception, quoted only when the bytes look like a
    checkpoint that should have loaded."""
    where = f"checkpoint {path}"
    if path.is_dir():
        return (f"{where} is a directory, not a checkpoint file; pass a .ckpt file, or the run directory "
                "that holds checkpoints/last.ckpt")
    try:
        with _open(path) as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(HEAD_BYTES)
            cause = _cause(f, head, size)
    except PermissionError:
        return f"{where} cannot be read: permission denied; make it readable (chmod u+r) or use a copy"
    except OSError as exc:
        return f"{where} cannot be read: {exc.strerror or one_line(exc, 200)}"
    if cause is not None:
        return f"{where} {cause}"
    return (f"{where} cannot be read by torch {torch.__version__} although it looks like a torch checkpoint "
            f"({type(error).__name__}: {one_line(error, 200)}); {USE_ANOTHER}")


def why_not_a_checkpoint(loaded: Any) -> str | None:
    """What a successfully loaded object is when it is not a Lightning checkpoint (a dictionary whose
    ``state_dict`` maps names to tensors); None when it is one."""
    if isinstance(loaded, Mapping):
        state = loaded.get("state_dict")
        if isinstance(state, Mapping):
            odd = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
            if not odd:
                return None
            return (f"is not a Lightning checkpoint: its state_dict holds entries that are not named tensors "
                    f"({_names(odd)}); {USE_ANOTHER}")
        if state is not None:
            return (f"is not a Lightning checkpoint: its state_dict is a {type(state).__name__}, not a mapping of "
                    f"tensors; {USE_ANOTHER}")
        tensors = [k for k, v in loaded.items() if isinstance(v, torch.Tensor)]
        if tensors and len(tensors) == len(loaded):
            return (f"is a bare state dict ({_count(len(tensors), 'tensor')}, e.g. {_names(tensors, 1)}), not a "
                    "Lightning checkpoint: it has no state_dict entry, training state or run configuration; "
                    f"{USE_ANOTHER}")
        if not loaded:
            return f"is an empty dictionary, not a Lightning checkpoint: it holds no model weights; {USE_ANOTHER}"
        return (f"is a dictionary without model weights (no state_dict entry; keys {_names(list(loaded))}), not a "
                f"Lightning checkpoint; {USE_ANOTHER}")
    if isinstance(loaded, torch.Tensor):
        return (f"is a single tensor of shape {tuple(loaded.shape)}, not a Lightning checkpoint; {USE_ANOTHER}")
    return f"is a torch file holding a {type(loaded).__name__}, not a Lightning checkpoint; {USE_ANOTHER}"


def is_zip(path: Path) -> bool:
    """The file starts like a zip archive (torch.save's format; the only one torch can memory-map)."""
    try:
        with _open(path) as f:
            return f.read(len(ZIP_MAGIC)) in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)
    except OSError:
        return False


# ---- the causes ------------------------------------------------------------------------------------

def _open(path: Path) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - closed by the caller's with


def _cause(f: BinaryIO, head: bytes, size: int) -> str | None:
    """The file's nature from its bytes (``f`` positioned anywhere), or None when it looks like a
    checkpoint that should have loaded."""
    if size == 0:
        return f"cannot be read: it is empty (0 bytes); {COPY_AGAIN}"
    if head.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)) or (len(head) < 4 and ZIP_MAGIC.startswith(head)
                                                          and len(head) >= 2):
        return _zip_cause(f, head, size)
    if head[0] == PROTO:
        return _pickle_cause(f, head, size)
    # no PROTO opcode: a protocol 0/1 pickle (text-like opcodes) is still possible, else text or binary data
    f.seek(0)
    scan = _scan_pickle(f, size)
    if scan.complete and scan.refused:
        return _refused(scan)
    if scan.complete and not f.read(HEAD_BYTES).strip():  # "N." is a pickle, "N. Smith wrote" is text
        return _plain_pickle(scan)
    if _is_text(head):
        return ("cannot be read: it is a text file, not a checkpoint (checkpoints are binary files written by "
                f"torch.save); {USE_ANOTHER}")
    return f"{NOT_A_PICKLE}, so it is not a checkpoint (or it is damaged from its first byte); {USE_ANOTHER}"


def _zip_cause(f: BinaryIO, head: bytes, size: int) -> str | None:
    first = _first_member_name(head)
    if not zipfile.is_zipfile(f):
        what = ("a torch checkpoint (torch.save's zip archive)" if first.endswith("data.pkl")
                else "a zip archive")
        return (f"cannot be read: it is truncated, {what} cut short at {size:,} bytes (the zip directory "
                f"at its end is missing), e.g. by an interrupted copy or a full disk; {COPY_AGAIN}")
    f.seek(0)
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        return f"cannot be read: it is a damaged zip archive ({one_line(exc, 200)}); {COPY_AGAIN}"
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            listed = f" (e.g. {_names(names, 1)})" if names else ""
            return (f"cannot be read: it is a zip archive of {_count(len(names), 'file')}{listed}, not a torch "
                    f"checkpoint (a checkpoint holds <archive>/data.pkl); {USE_ANOTHER}")
        try:
            data_pkl = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            return f"cannot be read: it is a damaged torch checkpoint ({one_line(exc, 200)}); {COPY_AGAIN}"
        scan = _scan_pickle(_Reader.of_bytes(data_pkl), len(data_pkl))
        if not scan.complete:
            return (f"cannot be read: it is a damaged torch checkpoint (its {pickles[0]} is not a whole pickle); "
                    f"{COPY_AGAIN}")
        if scan.refused:
            return _refused(scan)
        try:
            damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            damaged = f"? ({one_line(exc, 200)})"
        if damaged is not None:
            return (f"cannot be read: it is a damaged torch checkpoint (the archive is whole but {damaged} fails "
                    f"its checksum); {COPY_AGAIN}")
    return None


def _pickle_cause(f: BinaryIO, head: bytes, size: int) -> str | None:
    if len(head) < 2:
        return f"cannot be read: it is truncated, a pickle cut short after its first byte; {COPY_AGAIN}"
    if head[1] > pickle.HIGHEST_PROTOCOL:
        return f"{NOT_A_PICKLE} (its second byte is no pickle protocol), so it is not a checkpoint; {USE_ANOTHER}"
    f.seek(0)
    scan = _scan_pickle(f, size)
    if not scan.complete:
        return _incomplete_pickle_cause(scan, "a pickle")
    if scan.refused:
        return _refused(scan)
    if scan.first_int == TORCH_LEGACY_MAGIC:
        # torch.save's format before the zip: pickles of its magic number, protocol, system info, the object
        for _ in range(4):  # and of its storages' keys, then their bytes
            scan = _scan_pickle(f, size)
            if not scan.complete:
                return _incomplete_pickle_cause(scan, "a torch checkpoint in the older non-zip format")
            if scan.refused:
                return _refused(scan)
        return (f"cannot be read: it is truncated or damaged, a torch checkpoint in the older non-zip format "
                f"whose pickles are whole but whose tensor data is not; {COPY_AGAIN}")
    if f.read(1):
        return f"{NOT_A_PICKLE} (bytes follow the end of its pickle), so it is not a checkpoint; {USE_ANOTHER}"
    return _plain_pickle(scan)


def _plain_pickle(scan: _Scan) -> str:
    what = "of plain data" if not scan.globals else "of data"
    return (f"cannot be read: it is a Python pickle {what} (as pickle.dump writes), not a torch checkpoint; "
            f"{USE_ANOTHER}")


def _incomplete_pickle_cause(scan: _Scan, what: str) -> str | None:
    """A pickle that ran out of bytes is truncated; one that met a byte no pickle has is not a pickle
    (random bytes rarely make more than a couple of valid opcodes, and never name code here)."""
    if scan.exhausted and scan.ops >= 3:
        return (f"cannot be read: it is truncated, {what} cut short at {scan.size:,} bytes, e.g. by an "
                f"interrupted copy or a full disk; {COPY_AGAIN}")
    if scan.too_long:
        return None
    return f"{NOT_A_PICKLE} (its opcodes make no sense), so it is not a checkpoint; {USE_ANOTHER}"


def _refused(scan: _Scan) -> str:
    return (f"was refused: it carries pickled Python objects that could run code when loaded "
            f"({_names(scan.refused, quote=False)}), and flowgen only loads tensors and plain data; "
            "use a checkpoint that flowgen wrote")


# ---- reading bytes ---------------------------------------------------------------------------------

class _Reader:
    """A file for ``pickletools.genops`` that never reads past the end (a length read from damaged bytes
    may be huge) and remembers whether the pickle ran out of bytes."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.exhausted = f, size, False

    @classmethod
    def of_bytes(cls, data: bytes) -> _Reader:
        return cls(io.BytesIO(data), len(data))

    def tell(self) -> int:
        return self.f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(self.size - self.f.tell(), 0)
        data = self.f.read(left if n is None or n < 0 else min(n, left))
        if n is not None and len(data) < n:
            self.exhausted = True
        return data

    def readline(self) -> bytes:
        left = max(self.size - self.f.tell(), 0)
        line = self.f.readline(left) if left else b""
        if not line.endswith(b"\n"):
            self.exhausted = True
        return line


class _Scan:
    def __init__(self, size: int):
        self.size = size
        self.complete = self.exhausted = self.too_long = False
        self.globals: list[str] = []  # module.name of every callable the pickle names
        self.refused: list[str] = []  # those torch's weights-only unpickler does not allow
        self.first_int: int | None = None
        self.ops = 0  # opcodes listed


def _scan_pickle(f: BinaryIO | _Reader, size: int) -> _Scan:
    """List one pickle's opcodes from ``f``'s position to its STOP, collecting the callables it names."""
    scan = _Scan(size)
    reader = f if isinstance(f, _Reader) else _Reader(f, min(size, f.tell() + SCAN_LIMIT))
    pushed: list[Any] = []  # what the last opcodes pushed (strings, else None): enough to resolve STACK_GLOBAL
    memo: dict[int, Any] = {}
    stack: list[Any] = []  # the kinds of object on the unpickler's stack, to check that each opcode finds its own
    try:
        for op, arg, _ in pickletools.genops(reader):
            name = op.name
            scan.ops += 1
            _take_and_push(stack, op)
            if name in _STRING_OPS:
                pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name in _PUT_OPS:
                memo[arg] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _GET_OPS:
                if arg not in memo:
                    raise ValueError("a memo entry read before it was written: these bytes are not a pickle")
                pushed.append(memo[arg])
            elif name in ("GLOBAL", "INST"):
                _named(scan, *str(arg).split(" ", 1))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, qualname = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                _named(scan, module, qualname)
                pushed.append(None)
            elif name in _EXT_OPS:
                scan.globals.append(f"extension {arg}")
                scan.refused.append(f"extension {arg}")
                pushed.append(None)
            elif name in ("LONG1", "LONG4", "INT", "LONG", "BININT", "BININT1", "BININT2") and scan.first_int is None:
                scan.first_int = arg
                pushed.append(None)
            elif name not in ("PROTO", "FRAME", "STOP"):
                pushed.append(None)
            del pushed[:-2]
            if name == "STOP":
                if stack:
                    raise ValueError("objects left over at the end: these bytes are not a pickle")
                scan.complete = True
    except Exception:  # noqa: BLE001 - genops raises ValueError and kin on bytes that are no pickle
        pass
    scan.exhausted = reader.exhausted and not scan.complete
    if scan.exhausted and reader.size < size:
        scan.exhausted, scan.too_long = False, True
    return scan


def _take_and_push(stack: list[Any], op: pickletools.OpcodeInfo) -> None:
    """What ``op`` does to the stack's shape (as ``pickletools.dis`` checks it); ValueError where it needs
    objects that are not there, which random bytes soon do."""
    before = op.stack_before
    if pickletools.markobject in before:  # takes everything down to the last MARK, and what lies below it
        if pickletools.markobject not in stack:
            raise ValueError(f"{op.name} without a MARK: these bytes are not a pickle")
        last_mark = len(stack) - 1 - stack[::-1].index(pickletools.markobject)
        del stack[last_mark:]
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if len(stack) < below or pickletools.markobject in stack[len(stack) - below:]:
        raise ValueError(f"{op.name} on a stack too short: these bytes are not a pickle")
    del stack[len(stack) - below:]
    stack.extend(op.stack_after)


def _named(scan: _Scan, module: Any, qualname: Any) -> None:
    if not (isinstance(module, str) and isinstance(qualname, str)):
        full = "a callable named at run time"
    elif not all(part.isidentifier() for part in (*module.split("."), *qualname.split("."))):
        raise ValueError("a global whose name is no Python name: these bytes are not a pickle")
    else:
        if (module, qualname) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as the unpicklers map them
            module, qualname = _compat_pickle.NAME_MAPPING[(module, qualname)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{qualname}"
    scan.globals.append(full)
    if full not in _allowed_globals():
        scan.refused.append(full)


def _allowed_globals() -> set[str]:
    """The callables torch.load(weights_only=True) accepts (its own list, plus any the program added)."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - a private list; without it, what torch.save writes for tensors
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                "torch.FloatStorage", "torch.serialization._get_layout", "torch.Size", "torch.device"}


def _first_member_name(head: bytes) -> str:
    """The name in the zip's first local file header (torch.save writes <archive>/data.pkl first)."""
    if len(head) < 30 or not head.startswith(ZIP_MAGIC):
        return ""
    length = int.from_bytes(head[26:28], "little")
    return head[30:30 + length].decode("utf-8", errors="replace")


def _is_text(head: bytes) -> bool:
    """Printable characters and whitespace in UTF-8 (a character cut at the end of ``head`` allowed) or an 8-bit
    encoding."""
    if b"\x00" in head:
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:  # an 8-bit encoding: mostly ASCII, where binary data is not
        text = head.decode("latin-1")
        if sum(c < 0x80 for c in head) < 0.75 * len(head):
            return False
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text.lstrip("\ufeff"))


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _names(items: list[Any], most: int = 3, quote: bool = True) -> str:
    shown = [(repr(str(i)[:60]) if quote else str(i)[:60]) for i in dict.fromkeys(items)]
    return ", ".join(shown[:most]) + (", ..." if len(shown) > most else "")
