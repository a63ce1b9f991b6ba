"""What the port-check tests of every family share (``tests/test_hf_port*.py``): the tiny layer's check and
the assertions that a record agrees completely."""

from attn_spec import hf as spec
from compare import port, port_hf


def post_ln(family: str) -> bool:
    """BERT and the families sharing its block: the port stops at ``output.dense``."""
    return spec.entry(family).causal == "bert"


def bad(record) -> list:
    """``(pair, quantity, error, tolerance)`` of every disagreeing row."""
    return [
        (p, a.quantity, a.max_abs, a.tol) for p, rows in record.agreements.items() for a in rows if not a.ok
    ]


def check(family: str, layer: int = 0, dtype: str = "float32", seed: int | None = None, **overrides):
    """``(module, record)``: layer ``layer`` of a tiny random ``family`` model through ``check_port``."""
    module, _ = port_hf.tiny_module(family, layer, dtype, seed=layer if seed is None else seed, **overrides)
    kw = {"post_norm_outside": True} if post_ln(family) else {}
    return module, port.check_port(module, print_table=False, **kw)


def assert_agrees(module, record, family: str):
    """Everything agrees and round-trips bit-exactly; every parameter's gradient and (decoders) the decode
    were judged; the JAX port is within 1e-5 relative of the float64 reference (or its tolerance)."""
    assert record.ok and record.round_trip_bit_exact, bad(record)
    assert record.kind == f"hf:{family}"
    quantities = {a.quantity for a in record.agreements["jax_attn vs transformers"]}
    c = spec.describe_module(module, post_ln(family))[1]
    params = {f"grad_{k}" for k in spec.state_dict_shapes(c)}
    assert {"out", "grad_x"} | params <= quantities
    assert ("decode_out" in quantities) == (family not in spec.ENCODERS)
    for a in record.agreements["jax_attn vs reference"]:
        assert a.max_abs <= 1e-5 * max(1.0, abs(a.worst_expected)) or a.max_abs <= a.tol
    return c
