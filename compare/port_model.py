"""The port checked inside the real model: ``python -m compare port DIR [--prompt TEXT ...]``.

A checkpoint's own transformers model runs on the prompts (its tokenizer; several prompts of different
lengths as one padded batch: left-padded for decoders, right-padded for encoders). Then:

- **every attention layer on its real activations.** Hooks capture each attention layer's input hidden states
  and its output in that run; the layer's JAX port (``jax_attn.hf.from_hf``, default path, jitted), its torch
  twin (``torch_attn.hf.from_hf``) and transformers' own output are each judged against the float64 oracle
  (``compare.oracle_attention``) on the same inputs, with the tolerance policy (``compare.tolerance``: twice
  the naive same-dtype evaluation's error plus the dtype's slack). Pad query rows are left out (transformers
  gives them arbitrary values). A per-layer table and picture (error / tolerance against the layer index)
  and the first layer that fails, named.
- **end to end.** The whole model with every attention layer replaced by the JAX port (a thin bridge:
  torch tensor → NumPy → the jitted port → torch) and, separately, by the torch twin: the logits' error
  against the original over the real prompt positions, top-1 agreement, and ``max_new_tokens`` greedy tokens
  (recomputed from the whole sequence each step, no cache) compared with the original's; where they differ,
  the position and the original's top-1 − top-2 logit margin there. A difference where that margin is
  within the logits' own measured error is a *near tie* (reported, not a failure: the last bits of a sum
  decide it); any other is a failure. Encoders compare the last hidden state instead.

Prompts are long by default (:data:`DEFAULT_PROMPTS`, several hundred tokens for the longest): bugs that
depend on the position (rope scalings, windows, partial rotary) hide in short ones.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attn_spec import hf as spec

# Three prompts of different lengths (375, 158 and 18 tokens with SmolLM2's 49k-vocabulary BPE tokenizer).
DEFAULT_PROMPTS = (
    "The history of the lighthouse begins long before electricity. On the coasts of the ancient "
    "Mediterranean, sailors relied on fires lit on hills and towers to find their way into harbours at "
    "night. The most famous of these, the Pharos of Alexandria, stood for more than a thousand years and "
    "gave its name to the word for lighthouse in several languages. Its fire burned at the top of a tower "
    "so tall that travellers described it as a mountain of stone rising out of the sea. In the centuries "
    "that followed, towers were built along busy trade routes, and keeping the light burning became a "
    "trade of its own. Keepers carried wood, coal and later oil up narrow stairs every evening, trimmed "
    "wicks through the night, and cleaned soot from the glass each morning. The invention of the Fresnel "
    "lens in the early nineteenth century changed everything: by bending light with rings of glass prisms, "
    "a single lamp could be seen from more than twenty miles away. Each lighthouse was given its own "
    "pattern of flashes, so that a captain who counted the seconds between them could tell exactly which "
    "light he was looking at and where his ship must be. Fog signals followed, first bells and guns, then "
    "horns and sirens driven by compressed air. By the twentieth century most lights had been electrified, "
    "and one by one the keepers left as the lamps were automated. Today satellite navigation guides most "
    "ships, yet many lighthouses still shine every night, maintained as aids to navigation and as "
    "reminders of the people who once kept them. Visitors climb their spiral stairs to look out over the "
    "water, and some old keepers' cottages have become small museums where the logbooks of storms and "
    "shipwrecks can still be read, page after page, in careful handwriting. Near the end of one such "
    "logbook, a keeper wrote that the light had not failed a single night in forty years, and that",
    "A recipe for a simple loaf of bread needs only four ingredients: flour, water, salt and yeast. Mix "
    "five hundred grams of flour with ten grams of salt and seven grams of dried yeast, then add three "
    "hundred and fifty millilitres of warm water and stir until no dry flour remains. Knead the dough on a "
    "lightly floured table for about ten minutes, until it feels smooth and springs back when pressed. "
    "Place it in a bowl, cover it, and leave it somewhere warm for an hour or until it has doubled in size. "
    "Shape it into a loaf, let it rise again for half an hour, and bake it in a hot oven for thirty to "
    "thirty-five minutes. The loaf is done when it sounds hollow when tapped on the bottom. The next step is",
    "Question: What is the capital of France, and which river flows through it? Answer:",
)


@dataclass
class LayerRow:
    """One attention layer judged on its real activations: max abs error, tolerance, ok per implementation."""

    layer: int
    config: str
    errors: dict[str, float] = field(default_factory=dict)
    tols: dict[str, float] = field(default_factory=dict)
    ok: dict[str, bool] = field(default_factory=dict)

    def ratio(self, impl: str) -> float:
        return self.errors[impl] / self.tols[impl] if self.tols[impl] > 0 else float("inf")


@dataclass
class EndToEnd:
    """The model with every attention layer replaced by one port, against the original."""

    impl: str
    output_max_abs: float
    output_scale: float
    top1_agreement: float | None
    tokens_identical: bool | None
    first_difference: dict | None
    ok: bool


@dataclass
class ModelPortRecord:
    checkpoint: str
    model: str
    family: str
    dtype: str
    prompt_tokens: list[int]
    max_new_tokens: int
    layers: list[LayerRow] = field(default_factory=list)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    generated: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def first_failing_layer(self) -> int | None:
        bad = [r.layer for r in self.layers if not all(r.ok.values())]
        return min(bad) if bad else None

    @property
    def ok(self) -> bool:
        return self.first_failing_layer is None and all(e.ok for e in self.end_to_end)

    def verdict(self) -> str:
        scope = (
            f"{len(self.layers)} attention layers of {self.model} ({self.dtype}) on "
            f"{len(self.prompt_tokens)} prompts of {'/'.join(map(str, self.prompt_tokens))} tokens"
        )
        if self.ok:
            gen = (
                "greedy tokens identical" if self.max_new_tokens and self.family not in spec.ENCODERS else ""
            )
            return f"ALL AGREE: {scope}; end to end {gen or 'within tolerance'}"
        parts = []
        first = self.first_failing_layer
        if first is not None:
            row = next(r for r in self.layers if r.layer == first)
            which = [i for i, good in row.ok.items() if not good]
            n_bad = sum(not all(r.ok.values()) for r in self.layers)
            parts.append(
                f"first diverging layer {first} ({', '.join(which)}: error / tolerance "
                f"{max(row.ratio(i) for i in which):.3g}); {n_bad} layers fail"
            )
        for e in self.end_to_end:
            if not e.ok:
                where = e.first_difference or {}
                at = f" at generated token {where['step']}" if "step" in where else ""
                parts.append(f"end to end with {e.impl}: outputs differ{at}")
        return f"DISAGREE: {'; '.join(parts)}; {scope}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, first_failing_layer=self.first_failing_layer, verdict=self.verdict())
        return d


# ---------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------


def load(checkpoint_dir, dtype: str | None = None):
    """``(model, tokenizer, family)`` of a local checkpoint, transformers' own classes, eager attention."""
    import torch
    import transformers

    folder = Path(checkpoint_dir)
    if not (folder / "config.json").exists():
        raise ValueError(f"no config.json in {folder}")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    family = spec.family_of(spec.text_config(config))
    if family == "vit":
        raise ValueError(f"{family} takes images, not prompts: check one layer with --layer N instead")
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ValueError(
            f"no tokenizer in {folder} (tokenizer.json / tokenizer_config.json): the model check tokenizes "
            "prompts; check one layer on random inputs with --layer N instead"
        )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # load reports and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        cls = transformers.AutoModel if family in spec.ENCODERS else transformers.AutoModelForCausalLM
        model = cls.from_pretrained(str(folder), attn_implementation="eager")
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.eval(), tokenizer, family


def _batch(tokenizer, prompts, decoder: bool):
    """``(input_ids, mask, positions)`` as NumPy int64: left-padded for decoders, right for encoders."""
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise ValueError("a prompt tokenizes to no tokens")
    T = max(map(len, ids))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_ids = np.full((len(ids), T), pad, np.int64)
    mask = np.zeros((len(ids), T), np.int64)
    for b, seq in enumerate(ids):
        sl = slice(T - len(seq), T) if decoder else slice(0, len(seq))
        input_ids[b, sl], mask[b, sl] = seq, 1
    return input_ids, mask, [len(i) for i in ids]


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Running the model: capturing each layer, replacing the attention.
# ---------------------------------------------------------------------------------------------------------


def _layers(model) -> list:
    from compare.port_hf import attention_of

    n = spec._Cfg(spec.text_config(model.config)).get("num_hidden_layers")
    return [attention_of(model, i) for i in range(n)]


def _post_ln(family: str) -> bool:
    """BERT and the families sharing its block: the port stops at ``output.dense``, the post-LN stays."""
    return family in spec.FAMILY_TABLE and spec.FAMILY_TABLE[family].causal == "bert"


def _check_every_layer_ports(model, family) -> None:
    """ValueError naming the layers the in-model check cannot replace (a hybrid model's linear-attention
    layers, Gemma 4's KV-shared layers, a knob the reader refuses) and why, before anything runs: the
    end-to-end comparison replaces every attention layer."""
    from compare.port_hf import attention_of

    n = spec._Cfg(spec.text_config(model.config)).get("num_hidden_layers")
    refused = {}
    for i in range(n):
        try:
            spec.describe_module(attention_of(model, i), post_norm_outside=_post_ln(family))
        except ValueError as err:
            refused[i] = str(err)
            try:  # no attention module there: the reader says what the layer is
                spec.attention_config(model.config, i)
            except ValueError as why:
                refused[i] = str(why)
    if refused:
        first = next(iter(refused))
        raise ValueError(
            f"compare port: {len(refused)} of {n} layers cannot be ported (layers {sorted(refused)[:12]}"
            f"{' ...' if len(refused) > 12 else ''}), so the model cannot run on the ports end to end; "
            f"layer {first}: {refused[first]}. Check a ported layer alone with --layer N"
        )


def _hidden_in(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _run(model, family, input_ids, mask, pos, **kw):
    """The model's output: logits (decoders) or the last hidden state (encoders), float64 NumPy; ``kw``
    (a cache) is passed through, and ``(output, model output)`` returned when given."""
    import torch

    with torch.no_grad():
        args = {"input_ids": torch.from_numpy(input_ids)}
        if mask is not None:
            args["attention_mask"] = torch.from_numpy(mask)
        if family not in spec.ENCODERS:
            args["position_ids"] = torch.from_numpy(pos)
        out = model(**args, **kw)
    y = (out.logits if family not in spec.ENCODERS else out.last_hidden_state).double().numpy()
    return (y, out) if kw else y


def capture(model, family, input_ids, mask, pos):
    """Each attention layer's input hidden states and output in the model's own run: ``[(x, y)]``, float64
    (the model's dtype, widened exactly); BERT's output is its ``output.dense`` (before the post-LN)."""
    handles, xs, ys = [], {}, {}
    for i, module in enumerate(_layers(model)):

        def pre(mod, args, kwargs, i=i):
            xs[i] = _hidden_in(args, kwargs).detach().double().numpy()

        def post(mod, args, out, i=i):
            ys[i] = (out[0] if isinstance(out, tuple) else out).detach().double().numpy()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append((module.output.dense if _post_ln(family) else module).register_forward_hook(post))
    try:
        output = _run(model, family, input_ids, mask, pos)
    finally:
        for h in handles:
            h.remove()
    return [(xs[i], ys[i]) for i in sorted(xs)], output


class _Bridge:
    """A torch module that stands in for one attention layer and calls a port of it. The batch's padding
    mask and positions come from ``context`` (``mask``, ``pos``); with ``context["cache"]`` (a dict the
    greedy loop empties before its prefill) the port decodes with its own KV cache (``max_length`` slots),
    kept there under the layer's index. Key/value sharing (Gemma 4): a layer in ``context["stores"]`` also
    keeps the ``SharedKV`` of its call in ``context["kv"]`` under its index; a layer with a ``producer`` index
    (``attn_spec.hf.kv_producer``) reads it from there and keeps no cache."""

    def __new__(cls, index, original, port, context, family, producer=None):
        import torch

        class Bridge(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.original = [original]  # a list: not registered as a submodule
                self.family = family

            def forward(self, *args, **kwargs):
                x = _hidden_in(args, kwargs)
                caches = context.get("cache")
                store = index in context.get("stores", ())
                if producer is not None:  # a kv-shared layer: its producer's keys of this same call
                    y = port(x, context["mask"], context["pos"], shared_kv=context["kv"][producer])
                elif caches is None:
                    y = port(x, context["mask"], context["pos"], return_kv=store)
                else:
                    if index not in caches:
                        caches[index] = port.init_cache(x.shape[0], context["max_length"])
                    y = port(x, context["mask"], context["pos"], caches[index], return_kv=store)
                    caches[index], y = y[1], (y[0], *y[2:])
                if store:
                    y, context.setdefault("kv", {})[index] = y
                elif caches is not None and producer is None:
                    (y,) = y
                if _post_ln(self.family):  # the post-LN block around the ported self-attention + dense
                    out = self.original[0].output
                    y = out.LayerNorm(out.dropout(y) + x)
                return y, None

        return Bridge()


_JAX_FORWARD: dict = {}


def _jax_forward(cached: bool, return_kv: bool = False, shared: bool = False):
    """One jitted forward for every port of the same structure (the graph definition is a static argument:
    the layers of a model share one compile per input shape), with or without a cache, returning the
    producer's ``SharedKV`` or reading one (``shared``: its last argument)."""
    import jax
    from flax import nnx

    key = (cached, return_kv, shared)
    if key not in _JAX_FORWARD:

        def fwd(graphdef, state, x, mask, pos, extra=None):
            kw = {"return_kv": return_kv} if return_kv else {}
            if cached:
                kw["cache"] = extra
            elif shared:
                kw["shared_kv"] = extra
            return nnx.merge(graphdef, state)(x, mask, pos, **kw)

        _JAX_FORWARD[key] = jax.jit(fwd, static_argnums=0)
    return _JAX_FORWARD[key]


class _JaxPort:
    """A ``jax_attn`` port called from torch: torch in, torch out (dtype kept), jitted, with or without its
    KV cache."""

    def __init__(self, attn):
        from flax import nnx

        self.attn = attn
        self.graphdef, self.state = nnx.split(attn)
        self.dtype = attn.q_proj.weight[...].dtype

    def init_cache(self, batch: int, max_length: int):
        return self.attn.init_cache(batch, max_length)

    def __call__(self, x, mask, pos, cache=None, *, return_kv=False, shared_kv=None):
        """``y``, ``(y, cache)`` with a cache, and the ``SharedKV`` appended with ``return_kv``."""
        import jax.numpy as jnp
        import torch

        xt = x.detach()
        xj = jnp.asarray(xt.float().numpy() if xt.dtype == torch.bfloat16 else xt.numpy(), self.dtype)
        args = (self.graphdef, self.state, xj, jnp.asarray(mask), jnp.asarray(pos))
        if cache is not None:
            out = _jax_forward(True, return_kv)(*args, cache)
        elif shared_kv is not None:
            out = _jax_forward(False, False, True)(*args, shared_kv)
        else:
            out = _jax_forward(False, return_kv)(*args)
        out = out if isinstance(out, tuple) else (out,)
        y = torch.from_numpy(np.array(out[0], np.float32)).to(x.dtype)
        return y if len(out) == 1 else (y, *out[1:])


class _TorchPort:
    """A ``torch_attn`` port, called like :class:`_JaxPort`."""

    def __init__(self, attn):
        self.attn = attn

    def init_cache(self, batch: int, max_length: int):
        return self.attn.init_cache(batch, max_length)

    def __call__(self, x, mask, pos, cache=None, *, return_kv=False, shared_kv=None):
        import torch

        with torch.no_grad():
            m, p = torch.from_numpy(mask), torch.from_numpy(pos)
            kw = {"return_kv": True} if return_kv else {}
            if shared_kv is not None:
                kw["shared_kv"] = shared_kv
            return self.attn(x, m, p, **kw) if cache is None else self.attn(x, m, p, cache=cache, **kw)


def _ports(module, family, which: str):
    """The default ports of one layer (the path a user gets), in eval mode."""
    bert = _post_ln(family)
    if which == "jax_attn":
        import jax_attn.hf as jhf

        return jhf.from_hf(module, post_norm_outside=bert)
    import torch_attn.hf as thf

    return thf.from_hf(module, post_norm_outside=bert).eval()


def _greedy(model, family, input_ids, mask, steps: int, context=None):
    """The prompt's full output (prefill), then ``steps`` greedy tokens per row decoded with a KV cache:
    transformers' ``DynamicCache`` for the original model, the ports' own caches (``context``) for a model
    whose attention layers are bridges. Returns ``(prefill output, tokens (B, steps), each step's logits)``
    (``None`` for the tokens and logits of an encoder)."""
    pos = _positions(mask)
    if family in spec.ENCODERS:
        if context is not None:
            context.update(mask=mask, pos=pos, cache=None)
        return _run(model, family, input_ids, mask, pos), None, None
    if context is None:
        from transformers import DynamicCache

        cache = DynamicCache()  # filled in place
        full = _run(model, family, input_ids, mask, pos, cache=cache, use_cache=True)[0]
    else:
        context.update(mask=mask, pos=pos, cache={}, max_length=input_ids.shape[1] + steps)
        full = _run(model, family, input_ids, mask, pos, use_cache=False)[0]
    last, m, p = full[:, -1], mask, pos[:, -1:]
    tokens, logits = [], []
    for step in range(steps):
        nxt = np.argmax(last, axis=-1)
        tokens.append(nxt)
        logits.append(last)
        if step == steps - 1:
            break
        m = np.concatenate([m, np.ones((len(m), 1), np.int64)], axis=1)
        p = p + 1
        if context is None:
            y = _run(model, family, nxt[:, None], m, p, cache=cache, use_cache=True)[0]
        else:  # the bridges ignore the model's mask: theirs is the new token's (real) and their cache's
            context.update(mask=np.ones((len(m), 1), np.int64), pos=p)
            y = _run(model, family, nxt[:, None], None, p, use_cache=False)[0]
        last = y[:, -1]
    return full, np.stack(tokens, 1) if tokens else np.zeros((len(mask), 0), np.int64), logits


def _replaced(model, family, bridges):
    """Context manager: the model's attention layers replaced by ``bridges`` and put back afterwards."""
    from contextlib import contextmanager

    from compare.port_hf import attention_of

    @contextmanager
    def swap():
        base = getattr(model, "base_model", model)
        slots = []
        for i, bridge in enumerate(bridges):
            orig = attention_of(model, i)
            parent, name = _parent_of(base, orig)
            slots.append((parent, name, orig))
            setattr(parent, name, bridge)
        try:
            yield
        finally:
            for parent, name, orig in slots:
                setattr(parent, name, orig)

    return swap()


def _parent_of(root, target):
    for _, mod in root.named_modules():
        for name, child in mod.named_children():
            if child is target:
                return mod, name
    raise ValueError(f"attention module {type(target).__name__} not found in the model")


# ---------------------------------------------------------------------------------------------------------
# The check.
# ---------------------------------------------------------------------------------------------------------


def _judge_layer(i, module, family, x, y_hf, mask, pos, ports, dtype, producer=None) -> LayerRow:
    """Layer ``i`` on its real input ``x``: transformers' captured output and each port's, against the
    float64 oracle, on the real (non-pad) query rows. ``producer``: ``(its real input, its ports)`` for a
    kv-shared layer (Gemma 4): the oracle consumer on the oracle producer's keys, the ports on their own
    producer ports' ``SharedKV``."""
    import torch

    from compare import oracle_attention
    from compare.port_hf import _tolerance
    from compare.tolerance import compare_arrays

    jax_port, torch_port = ports
    c = torch_port.config
    params = {k: v.double().numpy() for k, v in torch_port.torch_state_dict().items()}
    kv = {"ref": None, "naive": None, "jax_attn": None, "torch_attn": None}
    if producer is not None:
        x_p, (jax_p, torch_p) = producer
        p_params = {k: v.double().numpy() for k, v in torch_p.torch_state_dict().items()}
        for name, rounding in (("ref", None), ("naive", dtype)):
            fp = oracle_attention.attention_forward(x_p, p_params, torch_p.config, mask, pos, dtype=rounding)
            kv[name] = (fp["k"], fp["v"])
        xt_p = torch.from_numpy(x_p).to(getattr(torch, dtype))
        kv["jax_attn"] = _JaxPort(jax_p)(xt_p, mask, pos, return_kv=True)[1]
        kv["torch_attn"] = _TorchPort(torch_p)(xt_p, mask, pos, return_kv=True)[1]
    ref = oracle_attention.attention_forward(x, params, c, mask, pos, shared_kv=kv["ref"])["out"]
    naive = np.asarray(
        oracle_attention.attention_forward(x, params, c, mask, pos, dtype=dtype, shared_kv=kv["naive"])[
            "out"
        ],
        np.float64,
    )
    real = mask.astype(bool)
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    outs = {
        "transformers": y_hf,
        "jax_attn": _JaxPort(jax_port)(xt, mask, pos, shared_kv=kv["jax_attn"]).double().numpy(),
        "torch_attn": _TorchPort(torch_port)(xt, mask, pos, shared_kv=kv["torch_attn"]).double().numpy(),
    }
    tol = _tolerance(dtype, ref[real], naive[real], 0.0)
    row = LayerRow(layer=i, config=_describe(c))
    for impl, got in outs.items():
        a = compare_arrays("out", got[real], ref[real], dtype, tol=tol)
        row.errors[impl], row.tols[impl], row.ok[impl] = a.max_abs, a.tol, a.ok
    return row


def _describe(c) -> str:
    parts = [f"{c.N}/{c.K}x{c.H}"]
    if c.rope is not None:
        parts.append(f"rope {c.rope.rope_type} θ{c.rope.rope_theta:g}")
    if c.sliding_window:
        parts.append(f"window {c.sliding_window}")
    if c.softcap:
        parts.append(f"softcap {c.softcap:g}")
    if c.qk_norm != "none":
        parts.append(f"qk-norm {c.qk_norm}")
    if c.kv_shared:
        parts.append("kv-shared")
    return ", ".join(parts)


def _end_to_end(
    impl, model, family, ported, input_ids, mask, orig, steps, orig_tokens, orig_logits, producers=None
):
    """The model with every attention layer replaced by ``ported`` (``[(module, port)]``): its prompt output
    against the original's, top-1 agreement, and its greedy tokens (cached decode) against the original's.
    ``producers``: each layer's :func:`attn_spec.hf.kv_producer` (Gemma 4's key/value sharing)."""
    producers = producers or [None] * len(ported)
    context = {"stores": {p for p in producers if p is not None}}
    real = mask.astype(bool)
    bridges = [_Bridge(i, m, port, context, family, producers[i]) for i, (m, port) in enumerate(ported)]
    with _replaced(model, family, bridges):
        got, tokens, _ = _greedy(model, family, input_ids, mask, steps, context)
    err = float(np.max(np.abs(got - orig)[real], initial=0.0))
    scale = float(np.max(np.abs(orig)[real], initial=0.0))
    if family in spec.ENCODERS:
        return EndToEnd(impl, err, scale, None, None, None, _encoder_ok(err, scale, model)), None
    top1 = float(np.mean((np.argmax(got, -1) == np.argmax(orig, -1))[real]))
    identical = bool(np.array_equal(tokens, orig_tokens))
    first, ok = None, identical
    if not identical:
        b, step = (int(v) for v in np.argwhere(tokens != orig_tokens)[0])
        top2 = np.sort(orig_logits[step][b])[-2:]
        margin = float(top2[1] - top2[0])
        near_tie = margin <= 2 * err
        first = {
            "row": b,
            "step": step,
            "original": int(orig_tokens[b, step]),
            "port": int(tokens[b, step]),
            "margin": margin,
            "near_tie": near_tie,
        }
        ok = near_tie
    return EndToEnd(impl, err, scale, top1, identical, first, ok), tokens


def _encoder_ok(err: float, scale: float, model) -> bool:
    """An encoder's last hidden state through every ported layer: within 1e-3 relative in float32, 1e-1 in
    bf16/fp16 (12 post-LN layers compound each layer's rounding; a wrong layer moves it by O(1))."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return err <= (1e-3 if dtype in ("float32", "float64") else 1e-1) * max(1.0, scale)


def check_model(
    checkpoint_dir,
    prompts=None,
    *,
    max_new_tokens: int = 16,
    dtype: str | None = None,
    ports=None,
    progress=None,
) -> ModelPortRecord:
    """Check every attention layer's ports inside the checkpoint's own model (see the module docstring).

    ``ports(layer, module, family) -> (jax_port, torch_port)`` replaces the default ports (to check a port
    made some other way, or a deliberately broken one). ``progress(message)`` is called as it goes.
    """
    from compare import env

    env.pin_precision()
    say = progress or (lambda msg: None)
    model, tokenizer, family = load(checkpoint_dir, dtype)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    decoder = family not in spec.ENCODERS
    input_ids, mask, lengths = _batch(tokenizer, list(prompts or DEFAULT_PROMPTS), decoder)
    pos = _positions(mask)
    record = ModelPortRecord(
        checkpoint=str(checkpoint_dir),
        model=type(model).__name__,
        family=family,
        dtype=dtype,
        prompt_tokens=lengths,
        max_new_tokens=max_new_tokens if decoder else 0,
    )
    say(f"running {record.model} ({dtype}) on {len(lengths)} prompts of {lengths} tokens")
    _check_every_layer_ports(model, family)
    captured, _ = capture(model, family, input_ids, mask, pos)
    modules = _layers(model)
    producers = [spec.kv_producer(model.config, i) for i in range(len(modules))]
    layer_ports = []
    for i, module in enumerate(modules):
        pair = (
            ports(i, module, family)
            if ports is not None
            else (_ports(module, family, "jax_attn"), _ports(module, family, "torch_attn"))
        )
        layer_ports.append(pair)
        x, y = captured[i]
        prod = None if producers[i] is None else (captured[producers[i]][0], layer_ports[producers[i]])
        record.layers.append(_judge_layer(i, module, family, x, y, mask, pos, pair, dtype, prod))
        say(f"layer {i + 1}/{len(modules)} judged")
    say("the original model: prefill and greedy decode")
    orig, orig_tokens, orig_logits = _greedy(model, family, input_ids, mask, record.max_new_tokens)
    if decoder:
        record.generated["transformers"] = orig_tokens.tolist()
    for impl in ("jax_attn", "torch_attn"):
        say(f"end to end with every attention layer replaced by {impl}")
        ported = [
            (m, _JaxPort(p[0]) if impl == "jax_attn" else _TorchPort(p[1]))
            for m, p in zip(modules, layer_ports)
        ]
        e2e, tokens = _end_to_end(
            impl,
            model,
            family,
            ported,
            input_ids,
            mask,
            orig,
            record.max_new_tokens,
            orig_tokens,
            orig_logits,
            producers,
        )
        record.end_to_end.append(e2e)
        if tokens is not None:
            record.generated[impl] = tokens.tolist()
    return record


# ---------------------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------------------

IMPLS = ("transformers", "jax_attn", "torch_attn")


def layer_table(record: ModelPortRecord, max_rows: int = 32):
    """Rich table: one row per layer (error / tolerance per implementation); long models show the first
    failing layer, the worst ones and the ends."""
    from rich.table import Table

    t = Table(
        title="each attention layer on its real inputs: max abs error / tolerance vs float64 "
        f"({record.dtype})",
        title_justify="left",
    )
    for col in ("layer", "hf", "jax", "torch", "attention"):
        t.add_column(col, justify="right" if col != "attention" else "left", no_wrap=col != "attention")
    rows = record.layers
    if len(rows) > max_rows:
        worst = sorted(rows, key=lambda r: -max(r.ratio(i) for i in IMPLS))[: max_rows - 4]
        keep = {rows[0].layer, rows[-1].layer, record.first_failing_layer} | {r.layer for r in worst}
        rows = [r for r in rows if r.layer in keep]
    for r in rows:
        cells = []
        for impl in IMPLS:
            text = f"{r.ratio(impl):.2f}" if r.ratio(impl) >= 0.01 else f"{r.ratio(impl):.0e}"
            cells.append(text if r.ok[impl] else f"[bold red]{text} ✗[/bold red]")
        t.add_row(str(r.layer), *cells, r.config)
    return t


def e2e_table(record: ModelPortRecord):
    from rich.table import Table

    t = Table(title="end to end: every attention layer replaced by the port", title_justify="left")
    decoder = record.family not in spec.ENCODERS
    what = "logits" if decoder else "last hidden state"
    cols = ["port", f"{what} max abs err", "scale"]
    if decoder:
        cols += ["top-1 agree", f"{record.max_new_tokens} greedy tokens"]
    for col in cols:
        t.add_column(col)
    for e in record.end_to_end:
        row = [e.impl, f"{e.output_max_abs:.2e}", f"{e.output_scale:.3g}"]
        if decoder:
            if e.tokens_identical:
                gen = "identical"
            else:
                d = e.first_difference
                kind = "near tie" if d["near_tie"] else "[bold red]DIFFER[/bold red]"
                gen = f"{kind}: row {d['row']} step {d['step']} (margin {d['margin']:.2g})"
            row += [f"{100 * e.top1_agreement:.2f}%", gen]
        t.add_row(*row)
    return t


def markdown(record: ModelPortRecord) -> str:
    lines = [
        f"# port check inside the model: {record.checkpoint} ({record.dtype})",
        "",
        f"**{record.verdict()}**",
        "",
        f"{record.model} (`{record.family}`), prompts of {record.prompt_tokens} tokens. "
        "Each attention layer's "
        "captured real input through transformers (its own output in the run), the JAX port (jitted) and the "
        "torch twin, each judged against the float64 oracle on the same input (max abs error over the real "
        "query rows / tolerance; ≤ 1 agrees).",
        "",
        "| layer | attention | transformers | jax_attn | torch_attn | tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for r in record.layers:
        cells = [f"{r.errors[i]:.2e} ({r.ratio(i):.2f}){'' if r.ok[i] else ' FAIL'}" for i in IMPLS]
        lines.append(f"| {r.layer} | {r.config} | {' | '.join(cells)} | {r.tols['jax_attn']:.1e} |")
    lines += [
        "",
        "## End to end",
        "",
        "| port | max abs error | scale | top-1 | greedy tokens |",
        "|---|---|---|---|---|",
    ]
    for e in record.end_to_end:
        gen = (
            "–"
            if e.tokens_identical is None
            else "identical"
            if e.tokens_identical
            else str(e.first_difference)
        )
        top1 = "–" if e.top1_agreement is None else f"{100 * e.top1_agreement:.2f}%"
        lines.append(f"| {e.impl} | {e.output_max_abs:.2e} | {e.output_scale:.3g} | {top1} | {gen} |")
    return "\n".join(lines) + "\n"


def plot(record: ModelPortRecord, path) -> None:
    """Error / tolerance against the layer index, one line per implementation, the limit at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compare.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4))
    layers = [r.layer for r in record.layers]
    for impl, color in zip(IMPLS, ("tab:gray", "tab:blue", "tab:orange")):
        ax.plot(
            layers, [max(r.ratio(impl), 1e-6) for r in record.layers], "o-", color=color, label=impl, ms=3
        )
    ax.axhline(1.0, color="tab:red", lw=1, ls="--", label="tolerance")
    if record.first_failing_layer is not None:
        ax.axvline(record.first_failing_layer, color="tab:red", lw=1, alpha=0.4)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max abs error / tolerance")
    ax.set_title(f"{Path(record.checkpoint).name} ({record.dtype}): each layer vs float64 on real inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    print(check_model(sys.argv[1]).verdict())
