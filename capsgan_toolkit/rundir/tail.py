"""Follow a run's ``metrics.jsonl`` as it grows: the rows an observer has not seen yet.

The experiment-tracker plugins (TensorBoard, MLflow, Weights & Biases) log the training rows of
``metrics.jsonl`` through the run events rather than through engine code. The file is appended
to, and rewritten twice over a run's life: by a resume (the rows after the checkpoint's step are
cut) and by the divergence guard's rollback (the abandoned steps are cut, then trained again,
with other values). :class:`MetricsTail` reads only what was appended since its last read,
starts over when the file was rewritten, and tells rows apart by their text, so a row trained
again after a rollback (same step, other values) is new, while a row an earlier attempt already
logged before a resume is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NewRows:
    """What :meth:`MetricsTail.read` found.

    ``rows``: the rows not seen before, in file order. ``rewound``: the run went back (their
    first step is at or before the last step read earlier); the rows after ``kept``, the last
    step still in the file that was seen before, were abandoned and are now logged again.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    rewound: bool = False
    kept: int = -1


class MetricsTail:
    """The rows of kind ``kinds`` of one run's ``metrics.jsonl`` not read yet.

    ``resumed_at``: the step a resumed run continues from: the rows already in the file are
    taken as logged by the earlier attempt (``None``: a new run, every row is new).
    """

    def __init__(self, metrics_file: str | Path, *, kinds: tuple[str, ...] = ("train",),
                 resumed_at: int | None = None):
        self.metrics_file = Path(metrics_file)
        self.kinds = set(kinds)
        self.seen: set[int] = set()
        self.last_step = -1
        self.inode: int | None = None
        self.offset = 0
        if resumed_at is not None:
            self.read()
            self.last_step = resumed_at

    def read(self) -> NewRows:
        """Return the rows appended (or rewritten) since the last read; whole lines only."""
        try:
            stat = self.metrics_file.stat()
            if stat.st_ino != self.inode or stat.st_size < self.offset:  # rewritten (a resume or a rollback)
                self.inode, self.offset = stat.st_ino, 0
            with open(self.metrics_file, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return NewRows()
        end = data.rfind(b"\n") + 1
        self.offset += end
        found = NewRows()
        for line in data[:end].splitlines():
            digest = hash(line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") not in self.kinds:
                continue
            if digest in self.seen:
                found.kept = max(found.kept, int(row.get("step", 0)))
            else:
                self.seen.add(digest)
                found.rows.append(row)
        if found.rows:
            found.rewound = int(found.rows[0].get("step", 0)) <= self.last_step
            self.last_step = int(found.rows[-1].get("step", 0))
        return found


def numbers(values: dict[str, Any], skipped: frozenset[str] = frozenset({"kind", "epoch", "step"})) -> dict[str, float]:
    """The numeric entries of a metrics row (booleans and text left out), as floats."""
    return {key: float(value) for key, value in values.items()
            if key not in skipped and isinstance(value, (int, float)) and not isinstance(value, bool)}
