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

    def verdict(self) -> str:
        """One line: ``ALL AGREE`` or ``DISAGREE`` with what failed, and the scope."""
        checks = [(pair, a) for pair, rows in self.agreements.items() for a in rows]
        failed = [(pair, a) for pair, a in checks if not a.ok]
        scope = f"{len(checks)} checks of {self.module.rsplit('.', 1)[-1]} ({self.dtype})"
        if not failed and self.round_trip_bit_exact:
            return f"ALL AGREE: {scope}, weights round trip bit-exact"
        parts = []
        if failed:
            pair, a = max(failed, key=lambda f: f[1].max_abs / f[1].tol if f[1].tol > 0 else float("inf"))
            impls = sorted({p.split(" vs ")[0] for p, _ in failed})
            parts.append(
                f"{len(failed)} checks outside tolerance ({', '.join(impls)}; worst {pair} {a.quantity} "
                f"{a.max_abs:.2e} > tol {a.tol:.1e})"
            )
        if not self.round_trip_bit_exact:
            parts.append("weights round trip NOT bit-exact")
        return f"DISAGREE: {' and '.join(parts)}; {scope}"

    def table(self):
        """One row per quantity, one column per pair: max abs error / tolerance (<= 1 agrees; ✗ fails)."""
        from rich.table import Table

        pairs = list(self.agreements)
        t = Table(
            title=f"port check of {self.module.rsplit('.', 1)[-1]} ({self.dtype}): max abs error / tolerance "
            "(≤ 1 agrees)",
            title_justify="left",
        )
        t.add_column("quantity", no_wrap=True)
        short = {"transformers": "hf", "jax_attn": "jax", "torch_attn": "torch", "reference": "f64"}
        for pair in pairs:
            a, _, b = pair.partition(" vs ")
            t.add_column(f"{short.get(a, a)}\nvs {short.get(b, b)}", justify="right", no_wrap=True)
        quantities = list(dict.fromkeys(a.quantity for rows in self.agreements.values() for a in rows))
        cells = {(pair, a.quantity): a for pair, rows in self.agreements.items() for a in rows}
        for q in quantities:
            row = [q]
            for pair in pairs:
                a = cells.get((pair, q))
                if a is None:
                    row.append("–")
                    continue
                ratio = a.max_abs / a.tol if a.tol > 0 else float("inf")
                text = f"{ratio:.2f}" if ratio >= 0.01 or ratio == 0 else f"{ratio:.0e}"
                row.append(text if a.ok else f"[bold red]{text} ✗[/bold red]")
            t.add_row(*row)
        t.caption = (
            "hf: transformers' module, jax: jax_attn's port (jitted), torch: torch_attn's port, f64: the "
            "float64 reference. Weights round trip torch → jax → torch bit-exact: "
            f"{self.round_trip_bit_exact}."
        )
        t.caption_justify = "left"
        return t
