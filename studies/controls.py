"""Controls of an experiment: the variants that measure whether its run could tell anything apart.

Two fields of a variant mark it as a control (``studies.experiments`` reads them):

- ``twin_of: NAME`` -- the *negative control*: the very configuration of variant ``NAME``
  under a second name, trained on its own seeds (seed ``k`` of a twin is seed
  ``TWIN_SEED_OFFSET + k``: other initial weights, data order and synthetic images).
  Its accuracy must not separate from its twin's (the 95% intervals overlap).
- ``positive_control_of: NAME`` -- the *positive control*: what the experiment studies
  taken away (e.g. attention that lets a token see only itself: Swin with a window of
  1), set against variant ``NAME`` (full attention, or the experiment's reference). Its
  accuracy must fall below ``NAME``'s with non-overlapping 95% intervals.

The verdict (``reports.controls``) is computed from the stored rows alone.
"""

from __future__ import annotations

import copy
from typing import Any

# Seed k of a twin trains as seed TWIN_SEED_OFFSET + k: far from any seed count a run asks for.
TWIN_SEED_OFFSET = 1000

# Controls of the matching task (attnbench match), named MECHANISM.CONTROL in --mechanism (an experiment
# declares its own with twin_of and positive_control_of):
# "twin" is the negative control (the mechanism again on its own seeds, 1000 + k); two positive ones take
# attention away: "isolated" (every block's attention lets a token read only itself: no token mixing at all,
# the quick run's control) and "self-only" (every cross block replaced by a self block of the same mechanism:
# as deep, as many parameters, but the two images never see each other before the dual softmax).
MATCH_CONTROLS = ("twin", "isolated", "self-only")
POSITIVE_CONTROLS = ("isolated", "self-only")

CONTROL_FIELDS = ("twin_of", "positive_control_of")
# What a twin takes from the variant it repeats (it may set none of these itself).
TWIN_TAKES = ("model", "config", "knobs", "stages", "quick", "full")


def resolve(variants: list[Any], where: str, error: type[Exception]) -> None:
    """Check the control fields of ``variants`` (``studies.experiments.Variant``) and give every twin its
    twin's configuration; raises ``error`` naming the field."""
    by_name = {v.name: v for v in variants}
    for i, v in enumerate(variants):
        at = f"{where}: variants[{i}] ({v.name})"
        for field in CONTROL_FIELDS:
            ref = v.spec.get(field)
            if ref is None:
                continue
            if ref not in by_name or ref == v.name:
                names = ", ".join(n for n in by_name if n != v.name)
                raise error(f"{at}.{field}: {ref!r} is not another variant of this file; one of {names}")
            if by_name[ref].spec.get("twin_of") is not None:
                raise error(f"{at}.{field}: {ref!r} is itself a twin; name the variant it repeats")
        if v.spec.get("twin_of") is not None and v.spec.get("positive_control_of") is not None:
            raise error(f"{at}: a variant is a twin (negative control) or a positive control, not both")
    for i, v in enumerate(variants):
        ref = v.spec.get("twin_of")
        if ref is None:
            continue
        own = [k for k in TWIN_TAKES if k in v.spec]
        if own:
            raise error(
                f"{where}: variants[{i}] ({v.name}).{own[0]}: a twin takes {ref!r}'s configuration; "
                "leave model, config, knobs, stages, quick and full out"
            )
        v.spec.update(copy.deepcopy({k: by_name[ref].spec[k] for k in TWIN_TAKES if k in by_name[ref].spec}))


def train_seed(variant: Any, k: int) -> int:
    """The seed the ``k``-th training of ``variant`` runs with: ``k``, or ``TWIN_SEED_OFFSET + k`` for a twin."""
    return TWIN_SEED_OFFSET + k if variant.spec.get("twin_of") is not None else k


def declared(raw_variants: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """(twin -> the variant it repeats, positive control -> the variant it is set against) from a file's
    variants as written (``experiment.json`` keeps them so)."""
    twins = {str(v["name"]): str(v["twin_of"]) for v in raw_variants if v.get("twin_of") is not None}
    positives = {
        str(v["name"]): str(v["positive_control_of"]) for v in raw_variants if v.get("positive_control_of") is not None
    }
    return twins, positives
