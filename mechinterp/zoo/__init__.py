"""Small trained models shipped inside the package, for demos and tests.

``zoo_path(name)`` gives the folder of a model, which loads offline with
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import pathlib
from importlib.resources import files

# Model name -> folder inside this package.
ZOO: dict[str, str] = {
    # 2-layer GPT-2 trained on repeated random spans: layer 0 has a previous-token head and
    # layer 1 an induction head (see train_induction.py and the folder's training_report.json).
    "induction-2l": "induction-2l",
}


def zoo_path(name: str) -> pathlib.Path:
    """The folder of the shipped model ``name``; ``LookupError`` for a name not in ``ZOO``."""
    try:
        folder = ZOO[name]
    except KeyError:
        raise LookupError(
            f"no zoo model named {name!r}; valid names: {', '.join(sorted(ZOO))}"
        ) from None
    return pathlib.Path(str(files("mechinterp.zoo") / folder))
