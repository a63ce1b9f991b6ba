"""The kinds of shared vectors, by name. Each kind lives in its own module under ``compare/kinds/``
(cases, input builder, oracle expectations, tolerance magnitudes, implementations), which ends with
``KIND = Kind(...)``.

To add a kind: write ``compare/kinds/<kind>.py`` and add its ``KIND`` to the tuple below.
"""

from __future__ import annotations

from compare.kinds import attention, causal, flex, mha, mla, sdpa
from compare.kinds.base import Kind

KINDS: dict[str, Kind] = {
    k.name: k for k in (sdpa.KIND, mha.KIND, causal.KIND, flex.KIND, attention.KIND, mla.KIND)
}
