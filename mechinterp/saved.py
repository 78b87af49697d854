"""Results on disk: one safetensors file holding the tensors, with the rest as JSON strings in
its metadata and a format tag, so a result is one file that a reader can recognise."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mechinterp.errors import InputError


def write_result(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str], *, format: str) -> None:
    """Write ``tensors`` and ``metadata`` (plus ``format``) to ``path``, atomically: a
    temporary file renamed into place, so an interrupted write never leaves a broken file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()},
              str(tmp), metadata={**metadata, "format": format})
    tmp.replace(path)


def read_result(path: str | Path, *, format: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file written by :func:`write_result` with ``format``.

    Raises:
        InputError: the file is missing or not safetensors, or holds another format.
    """
    from safetensors import SafetensorError, safe_open

    kind = format.split("/")[0]
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (FileNotFoundError, SafetensorError, OSError) as error:
        msg = f"path must name a safetensors file written by {kind}.save: {error}"
        raise InputError(msg) from None
    if metadata.get("format") != format:
        msg = f"{path} is not a {kind} (format {metadata.get('format')!r})"
        raise InputError(msg)
    return tensors, metadata
