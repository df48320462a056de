"""The search space of a sweep: which PurifyConfig settings vary, and how they are drawn.

Written in YAML (or as ``--space NAME=KIND:ARGS`` flags), one line per setting of
:class:`fip.purify.PurifyConfig`::

    eta_f: {loguniform: [1.0e-5, 1.0e-3]}
    eta_kl: {uniform: [0.0, 1.5]}
    iterations: {choice: [150, 300]}
    method: {choice: [fip, fast-fip]}
    lr: 0.01                                 # a fixed value

Every value a space can produce is checked against PurifyConfig before the sweep starts, so a typo
fails in one line, not in the tenth trial.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fip.purify import PurifyConfig

KINDS = ("loguniform", "uniform", "choice", "randint")


@dataclass(frozen=True)
class Dimension:
    """One setting's distribution: loguniform/uniform over [low, high], randint over [low, high], or a choice."""

    kind: str
    args: tuple

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown distribution {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "choice":
            if not self.args:
                raise ValueError("a choice needs at least one value")
            return
        if len(self.args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in self.args):
            raise ValueError(f"{self.kind} needs [low, high] numbers, got {list(self.args)}")
        low, high = self.args
        if not low < high:
            raise ValueError(f"{self.kind} needs low < high, got {low} and {high}")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")
        if self.kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"randint needs integer bounds, got {low} and {high}")

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this dimension can draw (a choice's, or within [low, high])."""
        if self.kind == "choice":
            return value in self.args
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if self.kind == "randint" and not float(value).is_integer():
            return False
        return self.args[0] <= value <= self.args[1]

    def values_to_check(self) -> list:
        return list(self.args) if self.kind != "randint" else [int(a) for a in self.args]

    def to_tune(self):
        from ray import tune

        low_high = self.args
        if self.kind == "loguniform":
            return tune.loguniform(*low_high)
        if self.kind == "uniform":
            return tune.uniform(*low_high)
        if self.kind == "randint":
            return tune.randint(int(low_high[0]), int(low_high[1]) + 1)
        return tune.choice(list(self.args))

    def sample(self, rng: random.Random):
        low_high = self.args
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low_high[0]), math.log(low_high[1])))
        if self.kind == "uniform":
            return rng.uniform(*low_high)
        if self.kind == "randint":
            return rng.randint(int(low_high[0]), int(low_high[1]))
        return rng.choice(list(self.args))


def _value(text: str):
    """A flag's value: int, float (``1e-4`` too, which YAML 1.1 reads as a string), bool/none, or text."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


# The default space for an image classifier: the paper's two strengths, our eta_kl, the learning rate and the
# crop phase, at 300 iterations of FIP. Ranges bracket every setting docs/calibration.md tried; the run length
# and the method are fixed by the lab's sweeps (docs/tuning.md, "Round 2"): 150-iteration and Fast FIP trials
# were the weak ones. `--space iterations=choice:150,300 --space method=choice:fip,fast-fip` searches them again.
DEFAULT_SPACE_IMAGES = {
    "eta_f": {"loguniform": [1.0e-5, 1.0e-3]},
    "eta_r": {"loguniform": [0.05, 5.0]},
    "eta_kl": {"uniform": [0.0, 1.5]},
    "lr": {"loguniform": [0.002, 0.03]},
    "crop_until": {"uniform": [0.3, 1.0]},
    "iterations": 300,
    "method": "fip",
}
# The default space for a causal language model, around the settings the text objective chose on the language lab
# (docs/language-models.md, "Tuned by the text objective": lr 0.1, eta_r 100, eta_kl 1-2, 200 steps); the image
# space's lrs left those backdoors in. Sequences are never cropped, so there is no crop phase to search. The batch
# and momentum are the ones those lrs were found with: PurifyConfig's own (128, 0.95) make each step 4 times as
# costly and its momentum's reach twice as long, so the same lr would be another step. eta_f spans ten times the
# image range: these models' Tr(F) is about a tenth of the image models' (68 against about 600), so the image range
# left FIP's trace term at under 6 % of the loss (docs/language-models.md, "The trace term's weight").
DEFAULT_SPACE_LANGUAGE = {
    "eta_f": {"loguniform": [1.0e-4, 1.0e-2]},
    "eta_r": {"loguniform": [30.0, 300.0]},
    "eta_kl": {"uniform": [0.5, 2.0]},
    "lr": {"loguniform": [0.05, 0.15]},
    "iterations": 200,
    "batch_size": 32,
    "momentum": 0.9,
    "method": "fip",
}
DEFAULT_SPACES = {"classification": DEFAULT_SPACE_IMAGES, "causal-lm": DEFAULT_SPACE_LANGUAGE}  # by fip.tasks name


@dataclass
class SearchSpace:
    """Varied settings (:class:`Dimension`) and fixed ones, all names of PurifyConfig fields."""

    dims: dict[str, Dimension]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str = "search space") -> SearchSpace:
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{where}: expected a mapping of PurifyConfig settings to distributions")
        known = {f.name for f in dataclasses.fields(PurifyConfig)}
        dims, fixed = {}, {}
        for name, spec in data.items():
            if name not in known:
                raise ValueError(f"{where}: {name!r} is not a purify setting; known: {', '.join(sorted(known))}")
            if isinstance(spec, dict):
                if len(spec) != 1:
                    raise ValueError(f"{where}: {name} needs exactly one of {', '.join(KINDS)}, got {sorted(spec)}")
                (kind, args), = spec.items()
                try:
                    args = args if isinstance(args, list | tuple) else [args]
                    dims[name] = Dimension(kind, tuple(_value(a) if isinstance(a, str) else a for a in args))
                except ValueError as e:
                    raise ValueError(f"{where}: {name}: {e}") from e
            else:
                fixed[name] = spec
        space = cls(dims, fixed)
        space.check()
        return space

    @classmethod
    def default(cls, task: str = "classification") -> SearchSpace:
        """The default space for the suspect's task (a :data:`fip.tasks.TASKS` name)."""
        if task not in DEFAULT_SPACES:
            raise ValueError(f"no default search space for task {task!r}; known: {', '.join(DEFAULT_SPACES)}")
        return cls.from_dict(DEFAULT_SPACES[task], f"default search space ({task})")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read search space {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ValueError(f"search space {path} is not valid YAML: {str(e).splitlines()[0]}") from e
        return cls.from_dict(data, str(path))

    def with_flags(self, flags: list[str]) -> SearchSpace:
        """``NAME=KIND:A:B`` (``choice:a,b,c``) or ``NAME=VALUE`` flags on top of this space."""
        data = {**{k: {d.kind: list(d.args)} for k, d in self.dims.items()}, **self.fixed}
        for flag in flags:
            name, eq, text = flag.partition("=")
            if not eq or not name:
                raise ValueError(f"--space {flag!r}: expected NAME=KIND:LOW:HIGH, NAME=choice:A,B or NAME=VALUE")
            kind, colon, rest = text.partition(":")
            if colon and kind in KINDS:
                parts = rest.split(",") if kind == "choice" else rest.split(":")
                data[name] = {kind: [_value(p) for p in parts]}
            else:
                data[name] = _value(text)
        return SearchSpace.from_dict(data, "--space")

    def under_flags(self, given: dict[str, Any]) -> tuple[SearchSpace, list[str]]:
        """This space with the purify settings the user gave as job flags (`given`) pinned to the flags' values,
        and one line for each searched setting a flag pinned. ``--iterations 10`` runs 10 steps, not the
        default space's 300; ``--lr 0.01`` stops the search over lr. ``--space`` flags come after, and win."""
        pinned = [f"--{k.replace('_', '-')} {given[k]} pins purify.{k}, which the search space would search "
                  f"({self.dims[k].kind} {list(self.dims[k].args)})" for k in sorted(set(given) & set(self.dims))]
        space = SearchSpace({k: d for k, d in self.dims.items() if k not in given},
                            {k: v for k, v in self.fixed.items() if k not in given})
        return space, pinned

    def check(self) -> None:
        """Every bound and choice, with the fixed settings, must make a valid PurifyConfig."""
        for name, dim in self.dims.items():
            for value in dim.values_to_check():
                try:
                    PurifyConfig(**{**self.fixed, name: value})
                except (TypeError, ValueError) as e:
                    raise ValueError(f"search space: {name}={value!r} is not a valid purify setting: {e}") from e
        try:
            PurifyConfig(**self.fixed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"search space: fixed settings {self.fixed} are invalid: {e}") from e

    def base_point(self, settings: dict) -> tuple[dict | None, str]:
        """The job's own purify `settings` as a point of this space (a sweep's first trial: the sweep then never
        leaves out what the job alone would have run), or None and why, when one lies outside its dimension."""
        point = {}
        for name, dim in self.dims.items():
            value = settings.get(name)
            if not dim.contains(value):
                return None, f"{name}={value!r} is outside {dim.kind} {list(dim.args)}"
            point[name] = value
        return point, ""

    def own_point(self) -> tuple[dict | None, str]:
        """:meth:`base_point` of PurifyConfig's own settings under this space's fixed ones (a job at its defaults)."""
        return self.base_point(dataclasses.asdict(PurifyConfig(**self.fixed)))

    def to_tune(self) -> dict:
        return {**{k: d.to_tune() for k, d in self.dims.items()}, **self.fixed}

    def sample(self, rng: random.Random) -> dict:
        return {**{k: d.sample(rng) for k, d in self.dims.items()}, **self.fixed}

    def describe(self) -> dict:
        return {**{k: {d.kind: list(d.args)} for k, d in self.dims.items()}, **self.fixed}
