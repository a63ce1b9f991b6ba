"""What the vector tests share: the assertion that every agreement passed, each failure in full."""

from __future__ import annotations


def assert_all_ok(agreements, label: str, nonempty: bool = False) -> None:
    """Assert every :class:`compare.tolerance.Agreement` is ok; ``nonempty``: something must be compared."""
    if nonempty:
        assert agreements, f"{label}: nothing compared"
    bad = [a for a in agreements if not a.ok]
    assert not bad, f"{label}: " + "; ".join(
        f"{a.quantity} max_abs={a.max_abs:.3e} tol={a.tol:.3e} nonfinite={a.nonfinite} at {a.worst_index}"
        for a in bad
    )
