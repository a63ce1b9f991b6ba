"""Attention on a JAX device mesh: tensor parallel over heads, data parallel over the batch.

JAX's SPMD partitioner does the work; this module only says where things live. A
:class:`AttentionSharding` names a ``jax.sharding.Mesh`` and its two axes; :func:`shard_module` places a
module's parameters with ``NamedSharding`` and sets the module's ``sharding`` hook, after which the module
constrains its activations (``jax.lax.with_sharding_constraint``: batch on ``data``, heads on ``model``)
and ``jax.jit`` partitions the computation.

Layout (the porting guide's "Sharding" section has the table):

- Projections into heads (``in_proj``, ``q_proj``, ``k_proj``, ``v_proj``, torch ``(out, in)``) are split
  by output rows, i.e. by heads, on ``model`` ("column-parallel"); the output projection is split by its
  input columns on ``model`` ("row-parallel"), so each device multiplies only its own heads and one
  all-reduce (or reduce-scatter) sums the partial outputs. Output biases are replicated.
- Activations ``(B, …)`` are split by batch on ``data``; per-head tensors ``(B, N, T, H)`` also by heads
  on ``model``. The KV cache ``(B, K, L, H)`` is split like the key/value heads that fill it.
- torch packs q, k, v into ``in_proj_weight (3E, E)``. A contiguous row split of that matrix would give
  device 0 all of q's rows and none of v's, so a sharded ``MultiheadAttention`` holds the same numbers as
  the row-major view ``(3, E, E)`` (``in_proj_bias`` as ``(3, E)``), split on the middle axis: every
  device owns q, k and v rows of its own heads. ``torch_state_dict()`` returns torch's ``(3E, E)``.
- Key/value heads (GQA) are split on ``model`` when ``K`` is a multiple of the model axis size: query
  head ``n`` uses key/value head ``n // G`` and both are split contiguously, so each device's query heads
  find their key/value heads on the same device. When ``K`` is not (e.g. multi-query, ``K = 1``), the
  key/value projections and the cache are replicated over ``model`` (each device computes them; nothing
  is gathered).

Multi-host: call ``jax.distributed.initialize()`` first in every process; :func:`make_mesh` uses
``jax.devices()`` (all processes' devices), and parameters are placed with
``jax.make_array_from_callback``, which every process calls with the same global value. Nothing here
assumes a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` of ``devices`` (default ``jax.devices()``,
    every process's devices).

    Raises:
      ValueError: when fewer devices exist than ``data * model``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(
            f"make_mesh: data={data} x model={model} needs {data * model} devices, "
            f"JAX has {len(devices)} ({jax.default_backend()}); on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model} before JAX starts"
        )
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))


@dataclass(frozen=True)
class AttentionSharding:
    """Where attention lives on a mesh.

    Attributes:
      mesh: the device mesh (see :func:`make_mesh`).
      data_axis: mesh axis the batch is split over.
      model_axis: mesh axis the heads are split over.
    """

    mesh: Mesh
    data_axis: str = DATA
    model_axis: str = MODEL

    @property
    def data_size(self) -> int:
        return self.mesh.shape[self.data_axis]

    @property
    def model_size(self) -> int:
        return self.mesh.shape[self.model_axis]

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def heads_axis(self, num_heads: int) -> str | None:
        """``model`` when ``num_heads`` splits evenly over it, else None (replicated)."""
        return self.model_axis if num_heads % self.model_size == 0 else None

    def batch_spec(self, ndim: int, batch_axis: int = 0) -> P:
        """Batch on ``data``, everything else replicated (inputs and outputs ``(B, T, E)``)."""
        spec = [None] * ndim
        spec[batch_axis] = self.data_axis
        return P(*spec)

    def heads_spec(self, num_heads: int | None = None) -> P:
        """``(B, N, T, H)`` per-head tensors: batch on ``data``, heads on ``model``."""
        heads = self.model_axis if num_heads is None else self.heads_axis(num_heads)
        return P(self.data_axis, heads, None, None)

    def constrain(self, x: jax.Array, spec: P) -> jax.Array:
        """``with_sharding_constraint`` on this mesh."""
        return jax.lax.with_sharding_constraint(x, self.named(spec))

    def check(self, batch: int | None = None) -> None:
        """Raise ``ValueError`` when ``batch`` does not split over ``data``."""
        if batch is not None and batch % self.data_size:
            raise ValueError(
                f"sharding: batch {batch} is not divisible by the {self.data_axis!r} axis ({self.data_size})"
            )

    # The hooks a sharded module calls on the ``sharding`` object it was given (:func:`shard_module`), so
    # that the modules never import this file (it imports them: one direction only).

    def mha_hook(self, module, query, key, value, params: dict, batch_first: bool):
        """Called by a sharded ``MultiheadAttention`` before its forward: constrains the inputs to batch on
        ``data`` and hands the head-split ``(3, E, E)`` projection over as three ``(E, E)`` weights, each
        split by heads (``jnp.split`` of a packed ``(3E, E)`` would cut across the shards)."""
        batch_axis = 0 if batch_first or query.ndim == 2 else 1
        if query.ndim == 3:
            query, key, value = (
                self.constrain(x, self.batch_spec(3, batch_axis)) for x in (query, key, value)
            )
        params = dict(params)
        w = params.pop("in_proj_weight", None)
        if w is not None:
            m = self.heads_axis(module.num_heads)
            w = self.constrain(w, P(None, m, None))
            params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"] = w[0], w[1], w[2]
        # in_proj_bias (3, E) splits into three (1, E) rows that broadcast like (E,) in the projections.
        return query, key, value, params

    def causal_constrain(self, module, name: str, x: jax.Array) -> jax.Array:
        """Called by a sharded ``CausalSelfAttention``: ``name`` is ``"x"`` (``(B, T, E)``, batch on
        ``data``), ``"q"`` (``(B, N, T, H)``) or ``"kv"`` (``(B, K, ·, H)``, split like the key/value
        projections)."""
        if name == "x":
            return self.constrain(x, self.batch_spec(x.ndim))
        if name == "q":
            return self.constrain(x, self.heads_spec(module.config.N))
        return self.constrain(x, cache_spec(module, self))

    def shard_cache(self, cache, module):
        """``cache`` (a ``KVCache``) placed like ``module``'s key/value heads; ``index`` replicated."""
        kv = self.named(cache_spec(module, self))
        return type(cache)(
            k=place(cache.k, kv), v=place(cache.v, kv), index=place(cache.index, self.named(P()))
        )


# --- PartitionSpecs per module -------------------------------------------------------------------------


def sdpa_specs(config: AttentionSharding, num_heads: int, num_kv_heads: int | None = None) -> dict[str, P]:
    """Specs of ``scaled_dot_product_attention``'s ``query (B, N, T, H)``, ``key``/``value``
    ``(B, K, S, H)`` and output ``(B, N, T, V)``."""
    kv = config.heads_spec(num_heads if num_kv_heads is None else num_kv_heads)
    if config.heads_axis(num_heads) is None:
        kv = P(config.data_axis, None, None, None)
    q = config.heads_spec(num_heads)
    return {"query": q, "key": kv, "value": kv, "output": q}


def mha_param_specs(module, config: AttentionSharding) -> dict[str, P]:
    """Specs of a ``MultiheadAttention``'s parameters, by torch ``state_dict`` name, for the layout
    :func:`shard_module` stores (packed ``in_proj_weight`` as ``(3, E, E)``, ``in_proj_bias`` ``(3, E)``)."""
    m = config.heads_axis(module.num_heads)
    specs = {
        "in_proj_weight": P(None, m, None),
        "in_proj_bias": P(None, m),
        "q_proj_weight": P(m, None),
        "k_proj_weight": P(m, None),
        "v_proj_weight": P(m, None),
        # bias_k / bias_v (1, 1, E) are appended as one more key per head: split by heads too.
        "bias_k": P(None, None, m),
        "bias_v": P(None, None, m),
        "out_proj.weight": P(None, m),
        "out_proj.bias": P(None),
    }
    return {k: specs[k] for k in module._params()}


def causal_param_specs(module, config: AttentionSharding) -> dict[str, P]:
    """Specs of a ``CausalSelfAttention``'s parameters, by ``torch_state_dict()`` name."""
    c = module.config
    m = config.heads_axis(c.N)
    kv = m if m is not None and c.K % config.model_size == 0 else None
    specs = {"q_proj": (P(m, None), P(m)), "k_proj": (P(kv, None), P(kv)), "v_proj": (P(kv, None), P(kv))}
    specs["out_proj"] = (P(None, m), P(None))
    out = {}
    for proj, (w, b) in specs.items():
        out[f"{proj}.weight"] = w
        if getattr(module, proj).bias is not None:
            out[f"{proj}.bias"] = b
    return out


def cache_spec(module, config: AttentionSharding) -> P:
    """Spec of a ``KVCache``'s ``k``/``v`` ``(B, K, L, H)``: split like the key/value projections."""
    c = module.config
    kv = config.heads_axis(c.N) is not None and c.K % config.model_size == 0
    return P(config.data_axis, config.model_axis if kv else None, None, None)


def param_specs(module, config: AttentionSharding) -> dict[str, P]:
    """Specs of ``module``'s parameters by torch name (``MultiheadAttention`` or ``CausalSelfAttention``)."""
    from jax_attn.causal import CausalSelfAttention
    from jax_attn.mha import MultiheadAttention

    if isinstance(module, MultiheadAttention):
        return mha_param_specs(module, config)
    if isinstance(module, CausalSelfAttention):
        return causal_param_specs(module, config)
    raise ValueError(f"param_specs: no sharding layout for {type(module).__name__}")


# --- placement -----------------------------------------------------------------------------------------


def place(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same global value in every process) as a global array with ``sharding``.

    ``make_array_from_callback`` asks each process only for the shards of its own devices, so this works
    unchanged under ``jax.distributed.initialize()`` with many processes.
    """
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _param(module, name: str) -> nnx.Param:
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def shard_module(module, config: AttentionSharding):
    """Place ``module``'s parameters on ``config.mesh`` (:func:`param_specs`) and set its ``sharding``
    attribute to ``config``, whose hooks (:meth:`AttentionSharding.mha_hook`, ``causal_constrain``,
    ``shard_cache``) the module's calls use to constrain activations to the mesh. Modifies ``module`` in
    place and returns it.

    A ``MultiheadAttention`` with packed q/k/v stores ``in_proj_weight`` as ``(3, E, E)`` and
    ``in_proj_bias`` as ``(3, E)`` from then on (same numbers, row-major view; see the module docstring);
    load a ``state_dict`` before sharding, not after.
    """
    from jax_attn.mha import MultiheadAttention

    specs = param_specs(module, config)
    for name, spec in specs.items():
        param = _param(module, name)
        value = param[...]
        if isinstance(module, MultiheadAttention) and name in ("in_proj_weight", "in_proj_bias"):
            value = value.reshape(3, -1, *value.shape[1:])
        param.set_value(place(value, config.named(spec)))
    module.sharding = config
    return module
