"""Leakage and duplicates: do training prompts contain evaluation problems, do files repeat prompts?

Texts are compared after one normalisation (`normalize_text`): Unicode NFKC, case folded,
every run of whitespace made one space, ends stripped. A chat is compared by its user turns.
An evaluation problem overlaps a training prompt when the normalised texts are equal
("identical") or the problem's text occurs inside the prompt's ("contained": training sets
wrap problems in instructions, e.g. DAPO-Math-17k's "Solve the following math problem ..."),
the latter only for problems of at least `min_contained_chars` characters, so that a short
text ("1+1") does not match everywhere.
"""

from __future__ import annotations

import bisect
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from megatron_lopd.datasets.columns import Example
from megatron_lopd.datasets.source import DataSource, iter_examples
from megatron_lopd.errors import ArtifactError

NORMALIZATION = "Unicode NFKC, case-folded, whitespace runs collapsed to one space, ends stripped"
MIN_CONTAINED_CHARS = 20
_LISTED = 5  # ids listed per duplicate group


def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _preview(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@dataclass(frozen=True)
class DuplicateGroup:
    """Rows of one file whose prompts are the same after normalisation."""

    file: str
    count: int
    ids: tuple[str, ...]  # the first few
    first_where: str
    preview: str


@dataclass(frozen=True)
class Overlap:
    """An evaluation problem found in a training prompt."""

    eval_set: str
    eval_id: str
    eval_where: str
    prompt_id: str
    prompt_where: str
    kind: str  # "identical" | "contained"
    preview: str


@dataclass
class LeakageReport:
    """What `check_leakage` found. `leaked`: some evaluation problem occurs in the training prompts."""

    prompts: str
    prompt_rows: int
    eval_rows: dict[str, int]
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    overlaps: list[Overlap] = field(default_factory=list)
    normalization: str = NORMALIZATION

    @property
    def leaked(self) -> bool:
        return bool(self.overlaps)

    def duplicate_rows(self, file: str) -> int:
        """Rows of `file` that repeat an earlier row's prompt."""
        return sum(g.count - 1 for g in self.duplicates if g.file == file)

    def lines(self, shown: int = 10) -> list[str]:
        out = [f"compared after normalisation: {self.normalization}"]
        for file, rows in [(self.prompts, self.prompt_rows), *self.eval_rows.items()]:
            groups = [g for g in self.duplicates if g.file == file]
            dup = f"{self.duplicate_rows(file):,} rows repeat an earlier prompt ({len(groups):,} prompts)" if groups else "no repeated prompts"
            out.append(f"{file}: {rows:,} rows, {dup}")
            out += [f"  x{g.count} {', '.join(g.ids)}{' ...' if g.count > len(g.ids) else ''} (first {g.first_where}): {g.preview}"
                    for g in groups[:shown]]
            if len(groups) > shown:
                out.append(f"  ... {len(groups) - shown:,} more")
        by_set: dict[str, list[Overlap]] = defaultdict(list)
        for o in self.overlaps:
            by_set[o.eval_set].append(o)
        for name, rows in self.eval_rows.items():
            found = by_set.get(name, [])
            problems = len({o.eval_id for o in found})
            out.append(f"{name} vs {self.prompts}: " + (f"LEAKED: {problems} of {rows} problems occur in the training prompts" if found else "no overlap"))
            out += [f"  {o.kind}: {name} {o.eval_id} ({o.eval_where}) in prompt {o.prompt_id} ({o.prompt_where}): {o.preview}" for o in found[:shown]]
            if len(found) > shown:
                out.append(f"  ... {len(found) - shown} more")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "leaked": self.leaked}


def _duplicates(file: str, examples: Sequence[Example], texts: Sequence[str]) -> list[DuplicateGroup]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        groups[text].append(i)
    return [DuplicateGroup(file, len(rows), tuple(examples[i].id for i in rows[:_LISTED]), examples[rows[0]].where, _preview(examples[rows[0]].text))
            for rows in groups.values() if len(rows) > 1]


def _examples(source: DataSource, what: str, flag: str) -> list[Example]:
    examples = list(iter_examples(source, with_answer=False, what=what, flag=flag))
    if not examples:
        raise ArtifactError(f"{what} {source.path} holds no rows", f"check {flag} (and its format)")
    return examples


def check_leakage(prompts: DataSource, evals: Mapping[str, DataSource], *, min_contained_chars: int = MIN_CONTAINED_CHARS) -> LeakageReport:
    """Repeated prompts within the training prompts and within each evaluation set, and every
    evaluation problem that occurs in a training prompt (see the module's docstring)."""
    train = _examples(prompts, "training prompts", "--opd-prompts")
    train_texts = [normalize_text(e.text) for e in train]
    report = LeakageReport(prompts=str(prompts.path), prompt_rows=len(train), eval_rows={},
                           duplicates=_duplicates(str(prompts.path), train, train_texts))
    exact: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(train_texts):
        exact[text].append(i)
    # One string of every prompt, separated by a character no normalised text holds: a problem's
    # occurrences are then found by the C-speed str.find, and mapped back to prompts by offset.
    joined = "\x00".join(train_texts)
    starts = [0]
    for text in train_texts[:-1]:
        starts.append(starts[-1] + len(text) + 1)
    for name, source in evals.items():
        problems = _examples(source, f"evaluation set {name}", "--eval")
        report.eval_rows[name] = len(problems)
        texts = [normalize_text(p.text) for p in problems]
        report.duplicates += _duplicates(name, problems, texts)
        for problem, text in zip(problems, texts):
            hits = {i: "identical" for i in exact.get(text, [])}
            if len(text) >= min_contained_chars:
                at = joined.find(text)
                while at != -1:
                    hits.setdefault(bisect.bisect_right(starts, at) - 1, "contained")
                    at = joined.find(text, at + 1)
            for i, kind in sorted(hits.items()):
                report.overlaps.append(Overlap(name, problem.id, problem.where, train[i].id, train[i].where, kind, _preview(problem.text)))
    return report
