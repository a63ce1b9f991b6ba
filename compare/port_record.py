"""The agreement record of one port (``compare.port.check_port``, ``compare.port_hf.check_hf_port``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from compare.tolerance import Agreement


@dataclass
class PortRecord:
    """The agreement record of one port: every comparison, and whether all agree."""

    module: str
    kind: str
    dtype: str
    config: dict
    round_trip_bit_exact: bool
    agreements: dict[str, list[Agreement]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.round_trip_bit_exact and all(a.ok for rows in self.agreements.values() for a in rows)

    def as_dict(self) -> dict:
        return {
            "module": self.module,
            "kind": self.kind,
            "dtype": self.dtype,
            "config": self.config,
            "round_trip_bit_exact": self.round_trip_bit_exact,
            "ok": self.ok,
            "agreements": {pair: [a.as_dict() for a in rows] for pair, rows in self.agreements.items()},
        }

    def table(self):
        from rich.table import Table

        t = Table(title=f"port check: {self.module} ({self.dtype}) → jax_attn")
        for col in ("pair", "quantity", "max abs", "tol", "ok"):
            t.add_column(col)
        for pair, rows in self.agreements.items():
            for a in rows:
                t.add_row(pair, a.quantity, f"{a.max_abs:.2e}", f"{a.tol:.1e}", "ok" if a.ok else "FAIL")
        t.caption = f"weights round trip torch → jax → torch bit-exact: {self.round_trip_bit_exact}"
        return t
