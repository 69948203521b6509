"""Hyper-parameter schedules as pure functions of the training step.

Each constructor returns a callable `step -> float`; the trainer evaluates it at the global step
(docs/method.md counts D and G steps together). The reference `ot_scale` is
`cosine(0.2, 0.005, 1_000_000)`: a cosine decay over one million steps, then constant.

Config files describe a schedule with `parse_schedule`: a number, or a dict such as
`{"type": "cosine", "start": 0.2, "end": 0.005, "steps": 1000000}` or
`{"type": "sequence", "parts": [{"type": "constant", "value": 0.2, "duration": 1000}, {...}]}`.
"""

import math
import numbers
from typing import Callable, Mapping, Sequence, Tuple, Union

Schedule = Callable[[int], float]

SCHEDULE_TYPES = ("constant", "linear", "cosine", "sequence")


def _progress(step: int, steps: int) -> float:
    """The fraction of the schedule done at `step`, clamped to [0, 1] (so the end value is held)."""
    return min(max(step / steps, 0.0), 1.0)


def _check_positive_int(value: int, name: str, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{where}: field " if where else ""
        raise ValueError(f"{prefix}`{name}` must be a positive integer, got {value!r}.")


def constant(value: float) -> Schedule:
    """`value` at every step."""
    return lambda step: float(value)


def linear(start: float, end: float, steps: int) -> Schedule:
    """From `start` at step 0 to `end` at `steps` in a straight line, then `end`."""
    _check_positive_int(steps, "steps")
    return lambda step: start + (end - start) * _progress(step, steps)


def cosine(start: float, end: float, steps: int) -> Schedule:
    """Half a cosine from `start` at step 0 down (or up) to `end` at `steps`, then `end`."""
    _check_positive_int(steps, "steps")
    return lambda step: end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, steps)))


def ema_warmup(decay: float) -> Schedule:
    """EMA decay `min(decay, (1 + n) / (10 + n))` after n updates (diffusers' `EMAModel` rule).

    Early in a run the generator changes fast, and a fixed 0.999 would average in weights from
    long ago; short runs (the digits default) use this, the paper's runs a constant decay.
    """
    return lambda step: min(float(decay), (1.0 + step) / (10.0 + step))


def sequence(pieces: Sequence[Tuple[Schedule, int]]) -> Schedule:
    """Chain `(schedule, steps)` pieces; each sees its own local step, and the last one continues.

    The last piece's `steps` is not used (it runs forever) but must still be given.
    """
    if not pieces:
        raise ValueError("`pieces` must hold at least one (schedule, steps) pair.")
    for _, steps in pieces:
        _check_positive_int(steps, "steps")

    def schedule(step: int) -> float:
        for piece, steps in pieces[:-1]:
            if step < steps:
                return piece(step)
            step -= steps
        return pieces[-1][0](step)

    return schedule


def _field(spec: Mapping, name: str, where: str):
    if name not in spec:
        raise ValueError(f"{where}: missing field `{name}`.")
    return spec[name]


def _number(spec: Mapping, name: str, where: str) -> float:
    value = _field(spec, name, where)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: field `{name}` must be a number, got {value!r}.")
    return float(value)


def parse_schedule(spec: Union[float, Mapping], where: str = "schedule") -> Schedule:
    """Build a schedule from a number (a constant) or a dict with a `type` (see the module docstring).

    Fields: `constant`: `value`; `linear` / `cosine`: `start`, `end`, `steps`; `sequence`: `parts`, a
    list of schedule dicts, each with a `duration` (optional on the last). `where` names the spec in
    error messages.
    """
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return constant(float(spec))
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a schedule must be a number or a dict, got {spec!r}.")
    kind = _field(spec, "type", where)
    if kind == "constant":
        return constant(_number(spec, "value", where))
    if kind in ("linear", "cosine"):
        steps = _field(spec, "steps", where)
        _check_positive_int(steps, "steps", where)
        build = linear if kind == "linear" else cosine
        return build(_number(spec, "start", where), _number(spec, "end", where), steps)
    if kind == "sequence":
        parts = _field(spec, "parts", where)
        if isinstance(parts, (str, Mapping)) or not isinstance(parts, Sequence) or not parts:
            raise ValueError(f"{where}: field `parts` must be a non-empty list of schedules, got {parts!r}.")
        pieces = []
        for index, part in enumerate(parts):
            part_where = f"{where}.parts[{index}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{part_where}: a sequence part must be a dict, got {part!r}.")
            is_last = index == len(parts) - 1
            # The last part runs forever, so its duration may be left out.
            duration = part.get("duration", 1) if is_last else _field(part, "duration", part_where)
            _check_positive_int(duration, "duration", part_where)
            body = {name: value for name, value in part.items() if name != "duration"}
            pieces.append((parse_schedule(body, part_where), duration))
        return sequence(pieces)
    raise ValueError(f"{where}: field `type` must be one of {SCHEDULE_TYPES}, got {kind!r}.")
