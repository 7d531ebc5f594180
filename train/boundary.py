"""Where user input meets the libraries that read or check it: their failures become one UserError.

A user's file (data, evaluation sets, a model folder, a DeepSpeed JSON, a checkpoint) is read by
json, csv, pyarrow, safetensors, transformers or torch, and a user's value (a learning rate, betas)
is checked by torch. Each raises its own exception with its own wording and a traceback; at these
boundaries the failure is reported as one line naming the file (and line) or key, and what was
expected (`error: data/train.jsonl:2: not UTF-8 text ...`).
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Iterator

from train.errors import UserError, at

# What a library raises for a file it cannot read or a value it refuses. Narrow on purpose: a bug
# of ours (an AttributeError, an IndexError) must keep its traceback.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, UnicodeDecodeError, ValueError, EOFError)


def library_errors() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        extra.append(SafetensorError)
    with contextlib.suppress(ImportError):
        import pyarrow

        extra.append(pyarrow.ArrowException)
    return (*READ_ERRORS, *extra)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def utf8_message(path: Path | str, line_no: int, raw: bytes, e: UnicodeDecodeError) -> str:
    return (f"{at(path, line_no)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "expected a UTF-8 encoded file")


def not_utf8(path: Path) -> str | None:
    """`file:line: not UTF-8 text (...)` for the first line that does not decode, if any."""
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return utf8_message(path, line_no, raw, e)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def reading(what: str, path: str | Path | None = None, expected: str = "") -> Iterator[None]:
    """Run a read of `what` (a file, a folder, a key); a library's failure becomes one UserError.
    `path`: the local file, to find the line of a UTF-8 error."""
    try:
        yield
    except UserError:
        raise
    except library_errors() as e:
        if isinstance(e, UnicodeDecodeError) and path is not None and Path(path).is_file():
            located = not_utf8(Path(path))
            if located:
                raise UserError(located) from e
        raise UserError(f"{what}: {first_line(e)}{'; expected ' + expected if expected else ''}") from e


def check_safetensors(folder: Path, what: str) -> None:
    """Every `*.safetensors` file in `folder` holds the bytes its header describes: a truncated copy
    is named here instead of failing deep inside transformers."""
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        problem = ""
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or 8 + n > size:
                problem = f"its header needs {8 + (n or 0)} bytes, the file has {size}"
            else:
                try:
                    header = json.loads(f.read(n))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    problem = f"its header is not valid ({type(e).__name__})"
                else:
                    if 8 + n + end > size:
                        problem = f"{size} bytes, its header describes {8 + n + end}"
        if problem:
            raise UserError(f"{what}: {file} is truncated or corrupt ({problem}); expected a complete "
                            "safetensors file (copy or download it again)")


# torch.optim's wording -> the optim key it is about
_OPTIM_WORDS = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "weight_decay": "weight_decay",
                "momentum": "momentum", "dampening": "dampening", "alpha": "alpha", "lr_decay": "lr_decay"}


def optimizer_error(e: BaseException, cls_name: str, kwargs: dict) -> UserError:
    """torch's `Invalid learning rate: -1.0` -> `optim.lr=-1.0: refused by torch.optim.AdamW (...)`."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    keys = [k for word, k in _OPTIM_WORDS.items() if word in message and k in kwargs]
    named = ", ".join(f"optim.{k}={kwargs[k]}" for k in keys[:1]) or "optim"
    return UserError(f"{named}: refused by {cls_name} ({message}); expected a value that optimizer accepts")
