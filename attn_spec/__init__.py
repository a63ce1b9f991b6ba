"""Framework-neutral specification shared by the twins `jax_attn` and `torch_attn`.

Nothing here imports a tensor library: the checks take shapes (tuples of ints) and dtype names
(``"float32"``, ``"bfloat16"``, ``"bool"``…) so that both twins raise the *same* ``ValueError``, with the
same wording, for the same bad input.

Dimension key (used in names across the project, as in ``q_BNTH`` or ``logits_BNTS``):

    B  batch                    T  query length (torch's L)
    N  query heads              S  key/value length
    K  key/value heads (GQA)    H  query/key head width (torch's E in SDPA)
    G  query heads per KV head  V  value head width (torch's Ev)
    E  model (embedding) width  ...  any leading batch dimensions
"""

from attn_spec.checks import (
    FLOAT_DTYPES,
    SDPA_IMPLEMENTATIONS,
    SdpaShapes,
    check_causal_mask_args,
    check_implementation,
    check_lengths,
    check_sdpa,
    fmt_shape,
)
from attn_spec.dispatch import AUTO, Choice

__all__ = [
    "AUTO",
    "Choice",
    "FLOAT_DTYPES",
    "SDPA_IMPLEMENTATIONS",
    "SdpaShapes",
    "check_causal_mask_args",
    "check_implementation",
    "check_lengths",
    "check_sdpa",
    "fmt_shape",
]
