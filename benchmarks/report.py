"""The shape every ``benchmarks/bench_*.py`` reports its targets in.

``--json`` prints one object with the raw figures under ``results`` and, under
``targets``, one entry per target: ``{"measured", "target", "better": "higher" |
"lower", "met"}`` (``met`` is None when the run did not measure it).
"""

from __future__ import annotations


def entry(measured: float | None, target: float, better: str) -> dict:
    met = None if measured is None else (measured >= target if better == "higher" else measured <= target)
    return {"measured": measured, "target": target, "better": better, "met": met}


def print_targets(title: str, targets: dict, name_width: int = 30, digits: int = 3) -> None:
    print(title)
    for name, t in targets.items():
        op = ">=" if t["better"] == "higher" else "<="
        meas = "n/a" if t["measured"] is None else f"{t['measured']:.{digits}f}"
        verdict = {True: "MET", False: "not met", None: "not measured"}[t["met"]]
        print(f"  {name:<{name_width}} measured {meas:>9}  target {op} {t['target']:<7}  {verdict}")


def print_list(title: str, items: list[str]) -> None:
    """A titled list after a blank line (a run's errors or problems); nothing if empty."""
    if items:
        print()
        print(title)
        for item in items:
            print(f"  {item}")
