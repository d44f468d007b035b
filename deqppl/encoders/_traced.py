r"""The per-row objective of :class:`~deqppl.encoders.AutoDEQ` traced once into aten graphs.

Each evaluation of the objective through Pyro re-runs the program, its handlers and every
``log_prob``, including the terms that do not depend on the latents (``lgamma(y + 1)`` of a
Poisson likelihood, the normalising constants of the priors, the priors of the globals that
drop out of the per-row sums). Here the objective $F(u; \theta, y)$ of one batch shape is
traced once by ``make_fx`` in *fake* mode (shapes only, no values: a program whose control flow
depends on values cannot be traced and keeps the Pyro path), dead code is eliminated, and the
graph is split into

* a *prologue*: every node that does not depend on $u$ (functions of the globals and the
  data), evaluated once per solve;
* a *body*: the nodes that depend on $u$, taking the prologue's outputs as inputs,

so that each Newton step runs only the aten operations that involve the latents, with no
Pyro handler in between. Before the split, the summands of $F$ that do not depend on $u$ at
all (``lgamma(y + 1)``, normalising constants) are dropped (:func:`_strip_constant_terms`):
a descent only compares values of one row, and computing them was a tenth of a Poisson solve.
:attr:`BoundObjective.offset` adds them back, computed on first use, where an absolute value
is asked for; :attr:`TracedObjective.full` keeps the objective with every term.

Separable curvature. A generic per-row Hessian costs $D$ backward passes over every
observation entry. Most likelihoods have more structure, which the body graph shows: the
latents enter through *affine* maps $a_k = A_k u + b_k$ (``z @ W.T + B``, ``u - loc``),
which feed *pointwise* operations (``exp``, ``xlogy``, ``binary_cross_entropy_with_logits``,
``pow``, ...) whose results are only summed. Then

$$F_s(u) = \sum_k \sum_e \varphi_{ke}\big(a_k(u)_e\big) + \text{linear},\qquad
H_s = \sum_k A_k^\top \operatorname{diag}(c_k) A_k,\qquad c_k = \nabla^2_{a_k} F\,\mathbf 1,$$

where $c_k$, the diagonal of a diagonal Hessian, is *one* Hessian-vector product (direction
all-ones, one double-backward pass), and each $A_k$ -- the same for every row where its
coefficients do not come from the data -- is read off one forward-mode pass per solve. The
Hessians are then one GEMM $c_k\,[A_{k,\cdot i}A_{k,\cdot j}]$, the same product the
hand-written PED encoder forms. The analysis (:class:`_Separable`) accepts a graph only if
every operation is of a known affine, pointwise or summing kind, no pointwise operation mixes
two affine leaves or two differently-moved copies of one, and nothing pointwise follows a sum;
the first batch of each shape checks the result against the autograd Hessian. Any other graph
gets the autograd Hessian of :meth:`AutoDEQ._linearize`.

Derivative graphs. For a separable objective, autograd's passes themselves -- the gradient
and the double-backward pass giving every $c_k$ -- are traced once more by ``make_fx`` into
plain forward graphs (:class:`_Derivatives`: $F$ only; $F$ and $\nabla F$; $F$, $\nabla F$
and the $c_k$), rid of the ones, negations and unit factors autograd writes out
(:func:`_fold_uniform`), reassociated where that saves a pass over the data
(:func:`_reassociate`), with their latent-free nodes hoisted out to run once per solve
(:func:`_hoist`), and with the batch size in their shape arguments replaced by the number of
rows evaluated (:func:`_row_generic`), so that the rows still iterating are evaluated on
their own (their row-wise inputs gathered), as the hand-written PED encoder's Newton does.
Each evaluation then runs only the aten operations on the latents of those rows, without the
autograd engine. Three more rewrites save passes over the $n \times d$ data entries, each
measured on the Bernoulli and Poisson cases of ``benchmarks/bench_autodeq.py``: terms linear
in an affine leaf move to the latent side (:func:`_linear_terms`: $\sum_e y_e\eta_e =
u\cdot(yW) + y\cdot B$, so the data are no longer read per evaluation), the Bernoulli
log-sigmoid shares the gradient's sigmoid (:func:`_log_sigmoid_from_sigmoid`), and fills
read only by broadcasting operations shrink to one element (:func:`_shrink_fills`). The first
batch of each shape checks values, gradients, Hessians and row subsets against autograd on
the body graph (:meth:`BoundObjective.check`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx


#: Largest latent dimension whose batched Cholesky the Newton step does column by column over
#: the batch (:func:`deqppl.encoders.auto._cholesky`), on Hessians laid out ``(D, D, n)``;
#: above it, LAPACK's ``cholesky_ex`` on ``(n, D, D)``.
SMALL_CHOLESKY_MAX_DIM = 8

#: Entries of the widest intermediate per evaluation of a derivative graph (rows per block:
#: this over the entries per row). Smaller blocks keep a chain's intermediates in cache, larger
#: ones pay the per-operation dispatch of a graph of ~25 operations fewer times; measured on
#: the four ExpFamPCA cases of benchmarks/bench_autodeq.py (2-core x86, 2 MiB L2 per core),
#: 2^18 was fastest of 2^16 ... 2^20 and the whole batch, by 10-20 % over 2^16 (the PED
#: layer's measured best, deqppl.validation.BLOCK_ENTRIES, which has fewer operations).
TRACED_BLOCK_ENTRIES = 2**18

#: Batches with fewer data entries than this keep the Pyro path: tracing costs about a second
#: once per batch shape (measured, ExpFamPCA d = 50), which a solve of a small batch (a few ms
#: per evaluation) does not amortise.
TRACE_MIN_ENTRIES = 2**16

_aten = torch.ops.aten

#: One input tensor (argument 0) whose elements are moved, copied or selected, never combined.
_MOVES = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.permute.default,
    _aten.transpose.int, _aten.t.default, _aten.expand.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.alias.default,
    _aten.clone.default, _aten.slice.Tensor, _aten.select.int,
}
#: Linear in their latent-dependent inputs whatever those are (sums of them, negation).
_ADDITIVE = {_aten.add.Tensor, _aten.sub.Tensor, _aten.neg.default, _aten.rsub.Scalar, _aten.rsub.Tensor,
             _aten.add.Scalar, _aten.sub.Scalar}
#: Linear when exactly one input depends on the latents (the first one, for a division).
_PRODUCTS = {_aten.mul.Tensor, _aten.div.Tensor, _aten.mul.Scalar, _aten.div.Scalar}
_CONTRACTIONS = {_aten.mm.default, _aten.bmm.default, _aten.matmul.default}
_SUMS = {_aten.sum.dim_IntList, _aten.sum.default}
#: Elementwise (with broadcasting): each output element depends on the input elements at its
#: own position only (smooth or piecewise, autograd differentiates them either way).
_POINTWISE = {
    _aten.abs.default, _aten.clamp.default, _aten.clamp_min.default, _aten.clamp_max.default,
    _aten.exp.default, _aten.log.default, _aten.log1p.default, _aten.expm1.default,
    _aten.pow.Tensor_Scalar, _aten.pow.Tensor_Tensor, _aten.xlogy.Tensor, _aten.lgamma.default,
    _aten.digamma.default, _aten.sigmoid.default, _aten.tanh.default, _aten.softplus.default,
    _aten.sqrt.default, _aten.rsqrt.default, _aten.reciprocal.default, _aten.logaddexp.default,
    _aten.erf.default, _aten.erfc.default, _aten.sinh.default, _aten.cosh.default, _aten.asinh.default,
    _aten.atan.default, _aten.sin.default, _aten.cos.default, _aten.mul.Tensor, _aten.div.Tensor,
    _aten.binary_cross_entropy_with_logits.default,
}


class TracedObjective:
    """``F(u, *params, *data)`` of one batch shape as a prologue and a body graph.

    Raises whatever ``make_fx`` raises when the function cannot be traced without values; the
    caller then keeps the Pyro path. ``num_params`` inputs come first, then the data (whose
    first dimension is the rows).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], u: torch.Tensor, inputs: Sequence[torch.Tensor],
                 *, num_params: int) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        gm = make_fx(fn, tracing_mode="fake")(u, *inputs)
        gm.graph.eliminate_dead_code()
        # the objective as traced, every term included: evaluated only where the absolute
        # value is asked for (offset, full_value), never per step
        whole = fx.Graph()
        whole.output(whole.graph_copy(gm.graph, {}))
        self.full = fx.GraphModule(gm, whole)
        self.full.recompile()
        #: whether latent-free summands were dropped from the body (see offset)
        self.stripped = _strip_constant_terms(gm.graph)
        gm.recompile()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        from_data = set(placeholders[1 + num_params :])  # nodes computed from the data
        for node in gm.graph.nodes:
            if node.op == "call_function" and any(a in from_data for a in node.all_input_nodes):
                from_data.add(node)
        self.prologue, self.body, frontier = _hoist(gm)
        result = self.body.graph.output_node().args[0]
        if not isinstance(result, fx.Node) or result.op == "placeholder":
            raise TypeError("the traced objective does not depend on the latents")
        _simplify(self.body.graph)
        self.body.graph.eliminate_dead_code()
        self.body.recompile()
        self.shape, self.dtype, self.device = tuple(u.shape), u.dtype, u.device
        self.separable = _Separable.analyse(self.body, [a in from_data for a in frontier], self.shape)

    def bind(self, inputs: Sequence[torch.Tensor], *, globals_key: object = None) -> BoundObjective:
        """The objective at these globals and data (the prologue evaluated once, here).

        ``globals_key`` identifies the values of the globals (e.g. their tensors' versions):
        the separable Hessian's coefficients depend on the globals only and are kept while it
        is unchanged (``None``: recomputed).
        """
        return BoundObjective(self, tuple(self.prologue(*inputs)), globals_key, tuple(inputs))


class BoundObjective:
    """``u -> F(u)`` of one batch, its gradient and Hessians (separable where possible)."""

    def __init__(self, traced: TracedObjective, consts: tuple, globals_key: object,
                 inputs: tuple = ()) -> None:
        self.traced, self.consts, self.inputs = traced, consts, inputs
        self._offset = None
        self.curvature = None
        if traced.separable is not None:
            self.curvature = traced.separable.bind(consts, globals_key)
            if self.curvature is None:
                traced.separable = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """$F(u) - c$ per row: the objective without its latent-free summands (:attr:`offset`)."""
        return self.traced.body(u, *self.consts)

    def full_value(self, u: torch.Tensor) -> torch.Tensor:
        """$F(u)$ per row with every term, as the Pyro program computes it."""
        return self.traced.full(u, *self.inputs)

    @property
    def offset(self) -> torch.Tensor:
        r"""``(n,)``: the latent-free summands $c$ of each row's objective (``lgamma(y + 1)``,
        normalising constants), which every evaluation here leaves out.

        A descent only compares values of one row, so they need not be computed per solve
        (for a Poisson likelihood at $d = 50$ they cost a tenth of a solve); computed here on
        first use, as the difference of the two graphs at $u = 0$.
        """
        if self._offset is None:
            t = self.traced
            if t.stripped:
                u0 = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                with torch.no_grad():
                    self._offset = self.full_value(u0) - self(u0)
            else:
                self._offset = torch.zeros((), dtype=t.dtype, device=t.device)
        return self._offset

    def linearize(self, u: torch.Tensor, rows: torch.Tensor | None = None):
        """``F, g, hessian`` as :func:`deqppl.encoders.auto._autograd_linearize` (``hessian(select)``
        forms the Hessians of the rows ``select`` only), or ``None`` where the Hessian is not
        separable; of the rows ``rows`` only where :attr:`compact`."""
        return None if self.curvature is None else self.curvature.linearize(u, rows)

    @property
    def compact(self) -> bool:
        """Whether :meth:`value`, :meth:`value_and_grad` and :meth:`linearize` take a subset
        of the rows (``rows``: their indices, ``u``: their points) and evaluate only those."""
        return self.curvature is not None and self.curvature.compact

    def value(self, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``F`` per row, of the rows ``rows`` (needs :attr:`compact`) or of all."""
        if rows is not None or self.compact:
            return self.curvature.value(u, rows)
        return self(u)

    def value_and_grad(self, u: torch.Tensor,
                       rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``F, g`` per row: from the derivative graph where the objective is separable, else
        by one reverse pass of autograd through the body (rows do not interact)."""
        if self.curvature is not None and self.curvature.derived is not None:
            return self.curvature.value_and_grad(u, rows)
        with torch.enable_grad():
            uu = u.detach().requires_grad_(True)
            F = self(uu)
            (g,) = torch.autograd.grad(F.sum(), uu, allow_unused=True)
        return F.detach(), torch.zeros_like(u) if g is None else g

    def check(self, u: torch.Tensor) -> None:
        """Compare the separable Hessians at ``u`` with autograd's; drop them if they differ.

        One Hessian-vector product per row with a random direction $v_s$ (rows do not
        interact, so one double-backward pass gives every $H_s v_s$): a structural error of
        the analysis shows in it with probability one, at the cost of one of the $D$ passes a
        full autograd Hessian would take.
        """
        if self.curvature is None:
            return
        gen = torch.Generator(device=u.device).manual_seed(1)
        v = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=u.device)
        F_mine, g_mine, hessian = self.curvature.linearize(u)
        H = hessian()
        with torch.enable_grad():
            uu = u.detach().requires_grad_(True)
            F = self(uu)
            (g,) = torch.autograd.grad(F.sum(), uu, create_graph=True)
            (Hv,) = torch.autograd.grad(g, uu, v, allow_unused=True) if g.requires_grad else (None,)
        ref = torch.zeros_like(u) if Hv is None else Hv
        mine = (H @ v.unsqueeze(-1)).squeeze(-1)

        def close(a, b):  # relative to the reference's largest entry
            return a.numel() == 0 or float((a - b).abs().max()) <= 1e-9 * (1.0 + float(b.abs().max()))

        # the derivative graph's values and gradients too (the folding is exact: equal to
        # rounding, measured bitwise on ExpFamPCA)
        if not bool(torch.isfinite(H).all()) or not (
            close(mine, ref) and close(F_mine, F.detach()) and close(g_mine, g.detach())
            and close(F.detach() + self.offset, self.full_value(u))
        ):
            self.traced.separable = None
            self.curvature = None
            return
        if self.compact:  # subsets against the full batch: every third row, and one row
            n = u.shape[0]
            for rows in (torch.arange(0, n, 3, device=u.device), torch.tensor([n - 1], device=u.device)):
                try:
                    F_r, g_r, hess_r = self.curvature.linearize(u[rows], rows)
                    same = (close(F_r, F_mine[rows]) and close(g_r, g_mine[rows]) and close(hess_r(), H[rows])
                            and close(self.curvature.value(u[rows], rows), F_mine[rows])
                            and close(self.curvature.value_and_grad(u[rows], rows)[1], g_mine[rows]))
                except Exception:  # noqa: BLE001 - a shape the rewrite got wrong
                    same = False
                if not same:
                    self.curvature.sep.derivatives.rowwise = False
                    break


class _Separable:
    """The body split into affine leaves $a_k(u)$ and a pointwise-then-summed rest (module notes)."""

    def __init__(self, affine: fx.GraphModule, rest: fx.GraphModule, shape) -> None:
        self.affine, self.rest, self.shape = affine, rest, shape
        self._products: tuple | None = None  # (globals key, products)
        # F, g and curvatures as traced graphs (:class:`_Derivatives`), built at the first
        # bind; False where tracing them failed (autograd on the two graphs then)
        self.derivatives: _Derivatives | None | bool = None

    @classmethod
    def analyse(cls, body: fx.GraphModule, row_consts: list[bool], shape) -> _Separable | None:
        n, D = shape
        if n < D:  # the Jacobians are read off D distinct rows
            return None
        graph = body.graph
        placeholders = [p for p in graph.nodes if p.op == "placeholder"]
        u, consts = placeholders[0], placeholders[1:]
        from_data = {c for c, r in zip(consts, row_consts) if r}
        # latent-dependent nodes: affine | pointwise | summed
        kind: dict[fx.Node, str] = {u: "affine"}
        # affine node -> its leaf: itself, or the affine node it is an elementwise-linear
        # function of (x + c, c * x, -x, same shape), which the rest graph recomputes
        root: dict[fx.Node, fx.Node] = {u: u}
        leaves_of: dict[fx.Node, dict] = {}  # pointwise/summed node -> {leaf: moves since}
        leaves: list[fx.Node] = []

        def one_linear(node, ins):  # linear in its single latent-dependent input
            op = node.target
            if len(ins) != 1:
                return op in _ADDITIVE
            return op in _ADDITIVE or (op in _PRODUCTS and (op is not _aten.div.Tensor or node.args[0] is ins[0]))

        def same_shape(node, a):
            return tuple(node.meta["val"].shape) == tuple(a.meta["val"].shape)

        for node in graph.nodes:
            if node.op == "output":
                break
            if node.op != "call_function":
                continue
            ins = [a for a in node.all_input_nodes if a in kind]
            if not ins:
                return None  # a constant computed in the body: never produced by the split
            kinds = {kind[a] for a in ins}
            op = node.target
            others = [a for a in node.all_input_nodes if a not in kind]
            if kinds == {"affine"}:
                if len(ins) == 1 and one_linear(node, ins) and op not in _MOVES and same_shape(node, ins[0]):
                    kind[node], root[node] = "affine", root[ins[0]]  # elementwise-linear
                    continue
                if op in _MOVES or op in _ADDITIVE or op in _SUMS or (
                    ((op in _PRODUCTS and one_linear(node, ins)) or (op in _CONTRACTIONS and len(ins) == 1))
                    and not any(a in from_data for a in others)  # coefficients shared by all rows
                ):
                    kind[node], root[node] = "affine", node
                    continue
                if op not in _POINTWISE or not _elementwise_call(node):
                    return None
                sources = {root[a]: () for a in ins}
                if len(sources) > 1:
                    return None  # two leaves mixed pointwise: cross terms
                if len(ins) > 1 and len({tuple(a.meta["val"].shape) for a in ins}) > 1:
                    return None
                for leaf in sources:
                    if leaf not in leaves:
                        leaves.append(leaf)
                leaves_of[node] = sources
                kind[node] = "pointwise"
                continue
            # some input is downstream of a leaf
            merged: dict = {}
            for a in ins:
                if kind[a] == "affine":
                    src = {root[a]: ()}
                    if root[a] not in leaves:
                        leaves.append(root[a])
                else:
                    src = leaves_of[a]
                for leaf, moves in src.items():
                    if leaf in merged and merged[leaf] != moves:
                        merged[leaf] = None  # the same leaf along two different paths
                    else:
                        merged.setdefault(leaf, moves)
            linear = one_linear(node, ins)
            if "summed" in kinds:
                if linear or op in _SUMS or op in _MOVES:
                    kind[node], leaves_of[node] = "summed", merged  # a linear function of the sums
                    continue
                return None  # something nonlinear after a sum: not separable
            if op in _SUMS or (op in _CONTRACTIONS and len(ins) == 1):
                kind[node], leaves_of[node] = "summed", merged
                continue
            if op in _MOVES:
                kind[node] = "pointwise"
                leaves_of[node] = {leaf: (None if m is None else m + ((op, _static(node.args[1:])),))
                                   for leaf, m in merged.items()}
                continue
            if not (linear or (op in _POINTWISE and _elementwise_call(node))):
                return None
            if not linear and (len(merged) > 1 or any(m is None for m in merged.values())):
                return None  # two leaves, or two copies of one, mixed nonlinearly
            if not linear and len(ins) > 1 and len({tuple(a.meta["val"].shape) for a in ins}) > 1:
                return None  # broadcasting one copy of a leaf against another
            kind[node], leaves_of[node] = "pointwise", merged
        (output,) = [p for p in graph.nodes if p.op == "output"]
        result = output.args[0]
        if kind.get(result) != "summed" or not leaves:
            return None
        for leaf in leaves:
            val = leaf.meta.get("val")
            if val is None or val.dim() < 1 or val.shape[0] != n:
                return None  # the rows must be the leaf's first dimension
        # the affine part: u, consts -> leaves
        affine, env = fx.Graph(), {}
        for p in placeholders:
            env[p] = affine.placeholder(p.name)
        needed, stack = set(), list(leaves)
        while stack:
            x = stack.pop()
            if x in needed or x.op == "placeholder":
                continue
            needed.add(x)
            stack.extend(x.all_input_nodes)
        for node in graph.nodes:
            if node in needed:
                env[node] = affine.node_copy(node, lambda a: env[a])
        affine.output(tuple(env[x] for x in leaves))
        # the rest: leaves, consts -> F, every node the output needs, recomputed from the leaves
        rest, renv = fx.Graph(), {}
        for i, leaf in enumerate(leaves):
            renv[leaf] = rest.placeholder(f"leaf{i}")
        for p in consts:
            renv[p] = rest.placeholder(p.name)
        wanted, stack = set(), [result]
        while stack:
            x = stack.pop()
            if x in wanted or x in renv:
                continue
            if x is u:
                return None  # the output reaches the latents other than through the leaves
            wanted.add(x)
            stack.extend(x.all_input_nodes)
        for node in graph.nodes:
            if node in wanted:
                renv[node] = rest.node_copy(node, lambda a: renv[a])
        rest.output(renv[result])
        a_mod, r_mod = fx.GraphModule(body, affine), fx.GraphModule(body, rest)
        a_mod.graph.eliminate_dead_code()
        a_mod.recompile()
        return cls(a_mod, r_mod, shape)

    def bind(self, consts: tuple, globals_key: object = None) -> _BoundSeparable | None:
        n, D = self.shape
        dtype = next((c.dtype for c in consts if isinstance(c, torch.Tensor) and c.is_floating_point()),
                     torch.get_default_dtype())
        device = next((c.device for c in consts if isinstance(c, torch.Tensor)), torch.device("cpu"))
        if self.derivatives is None:
            try:
                self.derivatives = _Derivatives(self, torch.zeros(n, D, dtype=dtype, device=device), consts)
            except Exception:  # noqa: BLE001 - an operation make_fx cannot trace: autograd
                self.derivatives = False
        if globals_key is not None and self._products is not None and self._products[0] == globals_key:
            return _BoundSeparable(self, consts, self._products[1])
        # Affine leaves: row r of the tangent in direction e_(r mod D) gives, in rows 0..D-1,
        # the columns of each A_k, and in rows D..2D-1 (where n allows) the same columns again:
        # a leaf whose coefficients differ between rows is caught here.
        reps = min(2, n // D)
        tangent = torch.zeros(n, D, dtype=dtype, device=device)
        idx = torch.arange(reps * D, device=device)
        tangent[idx, idx % D] = 1.0
        base = torch.zeros(n, D, dtype=dtype, device=device)
        with torch.no_grad():
            # the leaves are affine: a difference of two evaluations is their linear part
            # (forward-mode AD would do too, but loads TorchScript decompositions that warn)
            at_tangent, at_base = self.affine(tangent, *consts), self.affine(base, *consts)
            tangents = [a - b for a, b in zip(at_tangent, at_base)]
        products = []
        for t in tangents:
            cols = t[:D].reshape(D, -1)
            if reps == 2 and not torch.allclose(cols, t[D : 2 * D].reshape(D, -1), rtol=1e-12, atol=0.0):
                return None
            A = cols.T  # (e_k, D)
            # the upper triangle only (H is symmetric): D(D+1)/2 columns of the GEMM, not D^2
            i, j = torch.triu_indices(D, D, device=device)
            products.append(A[:, i] * A[:, j])
        self._products = (globals_key, products)
        return _BoundSeparable(self, consts, products)


class _BoundSeparable:
    def __init__(self, sep: _Separable, consts: tuple, products: list[torch.Tensor]) -> None:
        self.sep, self.consts, self.products = sep, consts, products
        self.derived = sep.derivatives.bind(consts) if sep.derivatives else None
        # entries per row of the widest intermediate (the n x d of the likelihood's leaf)
        width = sep.derivatives.width if sep.derivatives else 1
        self.block_rows = max(1, TRACED_BLOCK_ENTRIES // width)

    @property
    def compact(self) -> bool:
        """Whether subsets of the rows can be evaluated on their own (:func:`_row_generic`)."""
        return self.derived is not None and bool(getattr(self.sep.derivatives, "rowwise", False))

    def _run(self, kind: str, u: torch.Tensor, rows: torch.Tensor | None):
        """The derivative graph ``kind`` at ``u`` of the rows ``rows`` (``None``: all), in row
        blocks of :data:`TRACED_BLOCK_ENTRIES` entries where the graph evaluates any rows."""
        body, consts, live, mask = self.derived[kind]
        m = u.shape[0]
        step = self.block_rows if self.compact else m
        parts = []
        for i in range(0, m, step):
            if rows is None:
                cs = consts if step >= m else [c[i : i + step] if r else c for c, r in zip(consts, mask)]
            else:
                sel = rows[i : i + step]
                cs = [_take_rows(c, r, sel) for c, r in zip(consts, mask)]
            parts.append(body(u[i : i + step], *cs))
        if len(parts) == 1:
            return parts[0], live
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts), live
        return tuple(torch.cat(p) for p in zip(*parts)), live

    def value(self, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._run("value", u, rows)[0]

    def value_and_grad(self, u: torch.Tensor,
                       rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        (F, g), _ = self._run("grad", u, rows)
        return F, g

    def _hessian(self, n: int, D: int, curv, products, like: torch.Tensor,
                 select: torch.Tensor | None = None) -> torch.Tensor:
        r"""$H_s = \sum_k A_k^\top \operatorname{diag}(c_k) A_k$ from the upper triangle's GEMM,
        for the rows ``select`` (indices; ``None``: all ``n``)."""
        i, j = torch.triu_indices(D, D, device=like.device)
        rows = n if select is None else select.numel()
        # transposed, (entries, rows): the (n, D, D) result is a view of a (D, D, n) tensor,
        # the layout in which the batched small-D Cholesky of the Newton step runs
        # (deqppl.encoders.auto._cholesky), so that no transposing copy is needed there
        small = D <= SMALL_CHOLESKY_MAX_DIM
        upper = like.new_zeros(i.numel(), rows) if small else like.new_zeros(rows, i.numel())
        for c, P in zip(curv, products):
            if c is not None:
                c = c.reshape(n, -1)
                c = c if select is None else c.index_select(0, select)
                if small:
                    upper.addmm_(P.T, c.T)
                else:
                    upper.addmm_(c, P)
        # both triangles by one gather (measured 2x faster than two scatters into (n, D, D))
        sym = torch.empty(D, D, dtype=torch.long, device=like.device)
        sym[i, j] = torch.arange(i.numel(), device=like.device)
        sym[j, i] = sym[i, j]
        if small:
            return upper.index_select(0, sym.reshape(-1)).view(D, D, rows).permute(2, 0, 1)
        return upper.index_select(1, sym.reshape(-1)).view(rows, D, D)

    def linearize(self, u: torch.Tensor, rows: torch.Tensor | None = None):
        n, D = u.shape
        sep, consts = self.sep, self.consts
        if self.derived is not None:
            (F, g, *curv), live = self._run("curv", u, rows)
            products = [self.products[k] for k in live]
            return F, g, lambda select=None: self._hessian(n, D, curv, products, u, select)
        with torch.enable_grad():
            uu = u.detach().requires_grad_(True)
            leaves = sep.affine(uu, *consts)
            free = [x.detach().requires_grad_(True) for x in leaves]
            F = sep.rest(*free, *consts)
            grads = torch.autograd.grad(F.sum(), free, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, free)]
            (g,) = torch.autograd.grad(leaves, uu, [gr.detach() for gr in grads], allow_unused=True)
        g = torch.zeros_like(u) if g is None else g

        def hessian(select=None) -> torch.Tensor:
            live = [(x, gr, P) for x, gr, P in zip(free, grads, self.products) if gr.requires_grad]
            curv = ()
            if live:
                with torch.enable_grad():
                    total = sum(gr.sum() for _, gr, _ in live)
                    curv = torch.autograd.grad(total, [x for x, _, _ in live], allow_unused=True)
            return self._hessian(n, D, curv, [P for _, _, P in live], u, select)

        return F.detach(), g.detach(), hessian


# ------------------------------------------------------------------ derivative graphs
#: Operations that return their input's values unchanged (for the uniform-value folding).
_SAME_VALUES = _MOVES | {_aten.detach.default, _aten.lift_fresh_copy.default}
#: Creations of a tensor filled with one value: (value argument index or the fixed value).
_FILLS = {_aten.ones_like.default: 1.0, _aten.zeros_like.default: 0.0, _aten.ones.default: 1.0,
          _aten.zeros.default: 0.0, _aten.full_like.default: 1, _aten.full.default: 1,
          _aten.scalar_tensor.default: 0}


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return None if val is None else tuple(val.shape)


def _latent_dependent(graph: fx.Graph) -> set[fx.Node]:
    """The nodes of ``graph`` that depend on its first placeholder (the latents $u$), itself included."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    dep = set(placeholders[:1])
    for node in graph.nodes:
        if node.op == "call_function" and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _insert(graph: fx.Graph, before: fx.Node, target, args, meta: dict) -> fx.Node:
    """A call of ``target`` on ``args`` inserted before ``before``, with a copy of ``meta``."""
    with graph.inserting_before(before):
        new = graph.call_function(target, tuple(args))
    new.meta = dict(meta)
    return new


def _fold_uniform(graph: fx.Graph) -> None:
    """Exact simplifications of the derivative graph that autograd writes out in full.

    The backward passes of a summed objective start from ``ones_like(F.sum())``, broadcast
    it, negate it, multiply by it; ``pow(x, 1.0)`` and ``pow(x, 0.0) * k`` come from the
    derivative of a square. Every tensor whose elements all hold one known value (a fill and
    what moves, negates or scales it) is tracked by that value, and an operation with such an
    operand is rewritten where the result is bitwise the same: ``x * 1 -> x``,
    ``x * (-1) -> -x``, ``x * k -> x * k`` with a Python scalar, ``x / k`` likewise,
    ``x + 0 -> x``, ``pow(x, 1) -> x``, ``detach(x) -> x``, ``-(-x) -> x`` (only where the
    result has the shape and dtype of ``x``). Uniform values still used afterwards become
    fills of no input, so that hoisting moves them out of the per-evaluation graph.
    """
    uniform: dict[fx.Node, float] = {}

    def value_of(a):
        if isinstance(a, fx.Node):
            return uniform.get(a)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
        return None

    def same(node, x):
        return isinstance(x, fx.Node) and _shape(node) == _shape(x) and _shape(x) is not None and (
            node.meta["val"].dtype == x.meta["val"].dtype)

    def insert(node, target, args):
        return _insert(graph, node, target, args, node.meta)

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        op, args = node.target, node.args
        if op in _FILLS and not node.kwargs.get("out"):
            fill = _FILLS[op]
            uniform[node] = fill if isinstance(fill, float) else float(args[fill])
            continue
        if op in _SAME_VALUES and args and args[0] in uniform:
            uniform[node] = uniform[args[0]]
            continue
        if op is _aten.neg.default and args[0] in uniform:
            uniform[node] = -uniform[args[0]]
            continue
        if op is _aten.pow.Tensor_Scalar and args[1] == 0:
            uniform[node] = 1.0  # IEEE pow(x, 0) = 1 for every x, nan included
            continue
        vals = [value_of(a) for a in args[:2]]
        if op in (_aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar,
                  _aten.add.Tensor, _aten.sub.Tensor) and not node.kwargs and None not in vals and (
                args[0] in uniform or (isinstance(args[1], fx.Node) and args[1] in uniform)):
            a, b = vals
            uniform[node] = {_aten.mul.Tensor: a * b, _aten.mul.Scalar: a * b, _aten.add.Tensor: a + b,
                             _aten.sub.Tensor: a - b}.get(op, a / b if b else math.nan)
            if math.isnan(uniform[node]):
                del uniform[node]
            continue
        replacement = None
        if op in (_aten.detach.default, _aten.alias.default, _aten.clone.default) and same(node, args[0]):
            replacement = args[0]
        elif op is _aten.neg.default and isinstance(args[0], fx.Node) and args[0].target is _aten.neg.default \
                and same(node, args[0].args[0]):
            replacement = args[0].args[0]
        elif op is _aten.pow.Tensor_Scalar and args[1] == 1 and same(node, args[0]):
            replacement = args[0]
        elif op in (_aten.mul.Tensor, _aten.mul.Scalar) and not node.kwargs:
            for x, k in ((args[0], vals[1]), (args[1], vals[0])):
                if k is not None and same(node, x):
                    if k == 1.0:
                        replacement = x
                    elif k == -1.0:
                        replacement = insert(node, _aten.neg.default, (x,))
                    else:
                        replacement = insert(node, _aten.mul.Scalar, (x, k))
                    break
        elif op in (_aten.div.Tensor, _aten.div.Scalar) and not node.kwargs and vals[1] is not None \
                and same(node, args[0]):
            replacement = args[0] if vals[1] == 1.0 else insert(node, _aten.div.Scalar, (args[0], vals[1]))
        elif op in (_aten.add.Tensor, _aten.sub.Tensor) and not node.kwargs:
            if vals[1] == 0.0 and same(node, args[0]):
                replacement = args[0]
            elif op is _aten.add.Tensor and vals[0] == 0.0 and same(node, args[1]):
                replacement = args[1]
            elif op is _aten.sub.Tensor and vals[0] == 0.0 and same(node, args[1]):
                replacement = insert(node, _aten.neg.default, (args[1],))
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):  # what is left uniform: a fill of no input (hoisted)
        if node in uniform and node.users and node.all_input_nodes and _shape(node) is not None:
            val = node.meta["val"]
            with graph.inserting_before(node):
                new = graph.call_function(_aten.full.default, (list(val.shape), uniform[node]),
                                          {"dtype": val.dtype, "device": val.device})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
    graph.eliminate_dead_code()
    _shrink_fills(graph)


#: Elementwise operations of two tensors that broadcast them against each other.
_BROADCASTING = {_aten.sigmoid_backward.default, _aten.tanh_backward.default, _aten.mul.Tensor,
                 _aten.div.Tensor, _aten.add.Tensor, _aten.sub.Tensor}


def _shrink_fills(graph: fx.Graph) -> None:
    """A fill read only by broadcasting operations whose other operand has the result's
    shape becomes a fill of one element per dimension (bitwise the same results).

    Autograd's cotangent ``ones(n, d)`` of ``sigmoid_backward`` would otherwise be an input
    with one row per datum, read (and for row subsets gathered) at every evaluation.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.full.default or not node.users:
            continue
        shape = list(node.args[0])
        if not shape or all(k == 1 for k in shape):
            continue

        def broadcast_only(user) -> bool:
            if user.op != "call_function" or user.target not in _BROADCASTING or user.kwargs \
                    or len(user.args) != 2 or _shape(user) != tuple(shape):
                return False
            other = user.args[1] if user.args[0] is node else user.args[0]
            return isinstance(other, fx.Node) and other is not node and _shape(other) == tuple(shape)

        if all(broadcast_only(user) for user in node.users):
            node.args = ([1] * len(shape), *node.args[1:])
            if "val" in node.meta:
                node.meta = {**node.meta, "val": node.meta["val"].new_empty([1] * len(shape))}


def _reassociate(graph: fx.Graph) -> None:
    """Rewrites of the derivative graph that save passes over the data per evaluation.

    * ``a + (-b) -> a - b``, ``(-a) + b -> b - a``, ``a - (-b) -> a + b`` (exact): the
      backward pass writes $-y$ once and adds it, where $y$ itself is already an input;
    * ``sum(x - c, dims) -> sum(x, dims) - sum(c, dims)`` (and ``+``) where ``c`` does not
      depend on $u$ and has the shape of ``x``: a latent-free term inside the graph (the
      summands of $F$ itself were dropped by :func:`_strip_constant_terms`) is summed once
      per solve instead of subtracted at every evaluation (equal up to rounding);
    * ``mm(a, b) + bias -> addmm(bias, a, b)`` for a bias of one row (equal up to rounding).
    """
    dep = _latent_dependent(graph)
    call = functools.partial(_insert, graph)

    def is_neg(a):
        return isinstance(a, fx.Node) and a.op == "call_function" and a.target is _aten.neg.default

    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        op, args = node.target, node.args
        new = None
        if op is _aten.add.Tensor and len(args) == 2 and _shape(node) is not None:
            a, b = args
            if is_neg(b) and _shape(a) == _shape(node):
                new = call(node, _aten.sub.Tensor, (a, b.args[0]), node.meta)
            elif is_neg(a) and _shape(b) == _shape(node):
                new = call(node, _aten.sub.Tensor, (b, a.args[0]), node.meta)
            elif isinstance(a, fx.Node) and a.target is _aten.mm.default and isinstance(b, fx.Node) \
                    and _shape(b) is not None and len(_shape(b)) == 1 and _shape(a) == _shape(node) \
                    and _shape(b)[0] == _shape(a)[1] and not a.kwargs and len(a.users) == 1:
                new = call(node, _aten.addmm.default, (b, *a.args), node.meta)
        elif op is _aten.sub.Tensor and len(args) == 2 and is_neg(args[1]) and _shape(args[0]) == _shape(node):
            new = call(node, _aten.add.Tensor, (args[0], args[1].args[0]), node.meta)
        elif op is _aten.sum.dim_IntList and len(args) >= 2 and isinstance(args[0], fx.Node):
            inner = args[0]
            if inner.op == "call_function" and inner.target in (_aten.add.Tensor, _aten.sub.Tensor) \
                    and not inner.kwargs and len(inner.args) == 2 \
                    and all(isinstance(a, fx.Node) for a in inner.args):
                x, c = inner.args
                if x in dep and c not in dep and _shape(c) == _shape(x) == _shape(inner):
                    sx = call(node, _aten.sum.dim_IntList, (x, *args[1:]), node.meta)
                    sc = call(node, _aten.sum.dim_IntList, (c, *args[1:]), node.meta)
                    new = call(node, inner.target, (sx, sc), node.meta)
        if new is not None:
            if new.all_input_nodes and any(a in dep for a in new.all_input_nodes):
                dep.add(new)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _linear_terms(graph: fx.Graph) -> None:
    r"""Move the terms of the derivative graph that are linear in an affine leaf to the latent side.

    A term $\sum_e c_e\,a_e$ of a row's objective, $a = xM + b$ an affine leaf and $c$
    free of the latents ($y\,\eta$ of a Bernoulli or Poisson likelihood), is $x\cdot(cM^\top)
    + c\cdot b$: $cM^\top$ and $c \cdot b$ have one entry per row and latent, and are
    computed once per solve (hoisted); so are the $cM$ of a gradient's $(s - c)M$. Each saves
    passes over the $n \times d$ data entries per evaluation (a pass costs about as much as
    the whole $n \times D$ side). The rewrites, to a fixed point:

    * ``sum(-a) -> -sum(a)`` (exact);
    * ``sum(a +- b) -> sum(a) +- sum(b)`` for ``a``, ``b`` of the same shape;
    * ``sum(c * addmm(b, x, M), -1) -> sum(x * mm(c, M^T), -1) + c . b`` and
      ``sum(addmm(b, x, M), -1) -> sum(x * sum(M, 1), -1) + sum(b)``, for ``c``, ``b``, ``M``
      free of the latents;
    * ``mm(a +- c, M) -> mm(a, M) +- mm(c, M)`` for ``c`` free of the latents.

    All but the first reassociate sums: equal up to rounding.
    """
    dep = _latent_dependent(graph)
    if not dep:
        return

    def call(before, target, args):
        vals = fx.node.map_arg(tuple(args), lambda a: a.meta.get("val"))
        try:  # the fake values' shapes, for the passes after this one
            meta = {"val": target(*vals)}
        except Exception:  # noqa: BLE001 - no shape: later passes treat it as unknown
            meta = {}
        new = _insert(graph, before, target, args, meta)
        if any(a in dep for a in new.all_input_nodes):
            dep.add(new)
        return new

    def plain_sum(node):  # sum over the last dimension of a 2-D tensor, or any dims; no keepdim
        if node.op != "call_function" or node.target is not _aten.sum.dim_IntList or node.kwargs:
            return None
        if len(node.args) > 2 and node.args[2]:
            return None
        return node.args[1]

    def leaf(a):  # addmm(b, x, M) with b and M free of the latents
        if isinstance(a, fx.Node) and a.op == "call_function" and a.target is _aten.addmm.default \
                and not a.kwargs and len(a.args) == 3 and a.args[0] not in dep and a.args[2] not in dep:
            return a.args
        return None

    def last_dim(a, dims):
        shape = _shape(a)
        return shape is not None and len(shape) == 2 and list(dims) in ([-1], [1])

    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            dims = plain_sum(node)
            new = None
            if dims is not None and isinstance(node.args[0], fx.Node):
                a = node.args[0]
                single = len(a.users) == 1 and a.op == "call_function" and not a.kwargs
                if single and a.target is _aten.neg.default:
                    new = call(node, _aten.neg.default, (call(node, _aten.sum.dim_IntList, (a.args[0], dims)),))
                elif single and a.target in (_aten.add.Tensor, _aten.sub.Tensor) and len(a.args) == 2 \
                        and all(isinstance(b, fx.Node) and _shape(b) == _shape(a) for b in a.args):
                    new = call(node, a.target, tuple(call(node, _aten.sum.dim_IntList, (b, dims)) for b in a.args))
                elif a in dep and last_dim(a, dims):
                    parts = leaf(a)
                    if parts is not None:  # sum(x M + b) = x . rowsum(M) + sum(b)
                        b, x, M = parts
                        mvec = call(node, _aten.sum.dim_IntList, (M, [1]))
                        lin = call(node, _aten.sum.dim_IntList, (call(node, _aten.mul.Tensor, (x, mvec)), [-1]))
                        new = call(node, _aten.add.Tensor, (lin, call(node, _aten.sum.default, (b,))))
                    elif single and a.target is _aten.mul.Tensor and len(a.args) == 2:
                        for c, L in (a.args, a.args[::-1]):
                            parts = leaf(L)
                            if parts is not None and isinstance(c, fx.Node) and c not in dep \
                                    and _shape(c) == _shape(a) == _shape(L):
                                b, x, M = parts
                                cm = call(node, _aten.mm.default, (c, call(node, _aten.t.default, (M,))))
                                lin = call(node, _aten.sum.dim_IntList, (call(node, _aten.mul.Tensor, (x, cm)), [-1]))
                                if _shape(b) is not None and len(_shape(b)) == 1:
                                    cb = call(node, _aten.mv.default, (c, b))
                                else:
                                    cb = call(node, _aten.sum.dim_IntList, (call(node, _aten.mul.Tensor, (c, b)), [-1]))
                                new = call(node, _aten.add.Tensor, (lin, cb))
                                break
            elif node.op == "call_function" and node.target is _aten.mm.default and not node.kwargs:
                a, M = node.args
                if isinstance(a, fx.Node) and a.op == "call_function" and not a.kwargs and len(a.users) == 1 \
                        and a.target in (_aten.add.Tensor, _aten.sub.Tensor) and len(a.args) == 2 \
                        and M not in dep:
                    x, c = a.args
                    if isinstance(x, fx.Node) and isinstance(c, fx.Node) and x in dep and c not in dep \
                            and _shape(x) == _shape(c) == _shape(a):
                        new = call(node, a.target, (call(node, _aten.mm.default, (x, M)),
                                                    call(node, _aten.mm.default, (c, M))))
            if new is not None:
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.eliminate_dead_code()
                changed = True
                break
    graph.eliminate_dead_code()


def _hoist(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule, list[fx.Node]]:
    """Split ``gm(u, *consts)`` into ``prologue(*consts) -> cs`` and ``body(u, *cs)``.

    The prologue holds every node that does not depend on ``u`` (evaluated once per bind);
    the body the nodes that do, reading the prologue's values it needs as inputs. Outputs
    that do not depend on ``u`` pass through the body from its inputs. Also returns the
    nodes of ``gm`` behind ``cs``, in order.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    dep = _latent_dependent(graph)
    frontier: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "output" or (node in dep and node.op != "placeholder"):
            frontier.extend(a for a in node.all_input_nodes
                            if a not in dep and a not in frontier)
    pro, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op == "output":
            break
        if node not in dep:
            env[node] = pro.node_copy(node, lambda a: env[a])
    pro.output(tuple(env[a] for a in frontier))
    body, benv = fx.Graph(), {}
    benv[placeholders[0]] = body.placeholder("u")
    for i, a in enumerate(frontier):
        benv[a] = body.placeholder(f"c{i}")
    for a in (placeholders[0], *frontier):
        benv[a].meta = dict(a.meta)
    for node in graph.nodes:
        if node.op == "output":
            body.output(fx.node.map_arg(node.args[0], lambda a: benv[a]))
        elif node in dep and node.op != "placeholder":
            benv[node] = body.node_copy(node, lambda a: benv[a])
    prologue, body_mod = fx.GraphModule(gm, pro), fx.GraphModule(gm, body)
    for mod in (prologue, body_mod):
        mod.graph.eliminate_dead_code()
        mod.recompile()
    return prologue, body_mod, frontier


class _Derivatives:
    r"""$F$, $\nabla F$ and the leaves' curvatures $c_k$ of a separable objective as aten graphs.

    Autograd's passes (the gradient, and the double-backward pass in direction all-ones that
    gives $c_k = \nabla^2_{a_k}F\,\mathbf 1$) are traced once by ``make_fx`` into a forward
    graph, which :func:`_fold_uniform` rids of the ones, negations and unit factors that
    autograd writes out, and whose nodes that do not depend on $u$ (``-y``, constant
    curvatures of Gaussian terms, the transposed loadings) :func:`_hoist` moves out to be
    evaluated once per solve. One evaluation then runs only the operations on the latents,
    without the autograd engine: measured on ExpFamPCA Poisson $d = 50$, $l = 5$,
    $N = 10^4$, gradient and curvatures 2.4 ms against 10.6 ms by autograd.
    """

    def __init__(self, sep: _Separable, u: torch.Tensor, consts: tuple) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        self.graphs = {}
        self.width = 1  # entries per row of the widest intermediate of the body graphs
        n = u.shape[0]
        self.shape = tuple(u.shape)
        for kind in ("value", "grad", "curv"):
            live: list[int] = []
            curvature = kind == "curv"

            def joint(u, *consts, curvature=curvature, live=live, kind=kind):
                if kind == "value":
                    return sep.rest(*sep.affine(u, *consts), *consts)
                with torch.enable_grad():
                    uu = u.detach().requires_grad_(True)
                    leaves = sep.affine(uu, *consts)
                    free = [x.detach().requires_grad_(True) for x in leaves]
                    F = sep.rest(*free, *consts)
                    grads = torch.autograd.grad(F.sum(), free, create_graph=curvature, allow_unused=True)
                    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, free)]
                    (g,) = torch.autograd.grad(leaves, uu, [gr.detach() for gr in grads], allow_unused=True)
                    g = torch.zeros_like(u) if g is None else g
                    curv = []
                    if curvature:
                        live[:] = [k for k, gr in enumerate(grads) if gr.requires_grad]
                        if live:
                            total = sum(grads[k].sum() for k in live)
                            curv = torch.autograd.grad(total, [free[k] for k in live], allow_unused=True)
                            curv = [torch.zeros_like(free[k]) if c is None else c for k, c in zip(live, curv)]
                return (F.detach(), g.detach(), *[c.detach() for c in curv])

            gm = make_fx(joint, tracing_mode="fake")(u, *consts)
            _log_sigmoid_from_sigmoid(gm.graph, u.dtype)
            _fold_uniform(gm.graph)
            _reassociate(gm.graph)
            _linear_terms(gm.graph)
            gm.recompile()
            pro, body, _ = _hoist(gm)
            self.width = max([self.width] + [
                math.prod(v.shape[1:]) for node in body.graph.nodes
                if isinstance(v := node.meta.get("val"), torch.Tensor) and v.dim() >= 1 and v.shape[0] == n])
            generic = _row_generic(body, n)
            self.graphs[kind] = (pro, generic if generic is not None else body, tuple(live))
            self.rowwise = getattr(self, "rowwise", True) and generic is not None

    def bind(self, consts: tuple) -> _BoundGraphs:
        return _BoundGraphs(self.graphs, consts, self.shape[0])


#: Kinds of a derivative graph's input with one entry per row (false: the input is shared).
_ROWS, _SAME_ROWS = "rows", "same rows"
#: Inputs with at most this many entries per row are compared with their first row once per
#: solve (one pass over n x width entries); wider ones (the data) are taken as row-wise.
_SAME_ROWS_MAX_WIDTH = 64


def _row_kind(c, n: int):
    """``_ROWS`` for an input with one entry per row, ``_SAME_ROWS`` where all its rows are
    equal (a prior's expanded location and scale, and what is computed from them: a row subset
    is then a free view of the first row, not a gather), ``False`` for a shared input."""
    if not (isinstance(c, torch.Tensor) and c.dim() >= 1 and c.shape[0] == n and n > 1):
        return False
    if c.stride(0) == 0 or (c[:1].numel() <= _SAME_ROWS_MAX_WIDTH and bool((c == c[:1]).all())):
        return _SAME_ROWS
    return _ROWS


def _take_rows(c, kind, rows: torch.Tensor):
    """The rows ``rows`` of a graph input of :func:`_row_kind` ``kind``."""
    if kind is _ROWS:
        return c.index_select(0, rows)
    if kind is _SAME_ROWS:  # a free view of the first row
        return c[:1].expand(rows.numel(), *c.shape[1:])
    return c


class _BoundGraphs:
    """``kind -> (body, inputs, live, row_mask)`` of the derivative graphs at one batch's
    values: each kind's prologue runs on first use (a Newton solve without backtracking never
    evaluates the value-only graph; L-BFGS never the curvatures). ``row_mask`` tells which
    inputs have one entry per row and how (:func:`_row_kind`)."""

    def __init__(self, graphs: dict, consts: tuple, n: int) -> None:
        self.graphs, self.consts, self.n, self._bound = graphs, consts, n, {}

    def __contains__(self, kind) -> bool:
        return kind in self.graphs

    def __getitem__(self, kind):
        if kind not in self._bound:
            pro, body, live = self.graphs[kind]
            cs = tuple(pro(*self.consts))
            mask = [_row_kind(c, self.n) for c in cs]
            self._bound[kind] = (body, cs, live, mask)
        return self._bound[kind]


#: Operations whose shape argument (argument 1) may hold the number of rows first.
_SHAPED = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.expand.default}


def _row_generic(gm: fx.GraphModule, n: int) -> fx.GraphModule | None:
    """The body ``gm(u, *cs)`` traced for ``n`` rows, rewritten for any number of rows.

    The traced graph holds the batch size as literals in shape arguments (``view(x, [n,
    -1])``, ``expand(x, [n, d])``); where it stands first (the rows lead every latent and
    data tensor here) it becomes ``u.shape[0]``. Any other literal equal to ``n`` (a slice, a
    dimension that happens to equal the batch size) makes the rewrite refuse (``None``). The
    caller passes the row-wise inputs ``cs`` gathered at the rows evaluated, and checks the
    result against the full batch once (:meth:`BoundObjective.check`).
    """
    graph = gm.graph
    u = next(node for node in graph.nodes if node.op == "placeholder")
    nodes = [node for node in graph.nodes if node.op == "call_function"]
    with graph.inserting_after(u):
        rows = graph.call_function(_aten.sym_size.int, (u, 0))

    def literal(a) -> bool:
        if isinstance(a, (list, tuple)):
            return any(literal(b) for b in a)
        return isinstance(a, int) and not isinstance(a, bool) and a == n

    for node in nodes:
        args = list(node.args)
        if node.target in _SHAPED and len(args) > 1 and isinstance(args[1], (list, tuple)) and args[1] \
                and args[1][0] == n:
            args[1] = [rows, *args[1][1:]]
            node.args = tuple(args)
        if literal(node.args[1:] if node.target in _SHAPED else node.args) or literal(tuple(node.kwargs.values())):
            return None
    gm.recompile()
    return gm


_NO_OP_MOVES = {_aten.alias.default, _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default,
                 _aten.expand.default, _aten.permute.default}


def _log_sigmoid_from_sigmoid(graph: fx.Graph, dtype: torch.dtype) -> None:
    r"""``binary_cross_entropy_with_logits(x, y)`` (elementwise) as $x - yx - \log\sigma(x)$,
    with $\log\sigma(x) = \log(\operatorname{sigmoid}(x))$ sharing the gradient's sigmoid.

    ATen's kernel evaluates $\log\sigma$ through ``log1p(exp(-|x|))``, about three times the
    cost of the ``sigmoid`` the gradient computes anyway (measured on CPU, float64); a
    Bernoulli likelihood's value then costs more than its gradient and curvatures together.
    Where $x < \log\varepsilon$ the sigmoid may underflow, and $\log\sigma(x) = x$ to
    working precision there (the neglected $e^x$ is below half an ulp of $x$); elsewhere
    $\log$ of the sigmoid is accurate to a few ulps of $\max(1, |\log\sigma|)$ (measured
    3.6e-15 over $x \sim N(0, 25)$), equal to the kernel's value up to rounding. One sigmoid
    per input: the rewrite merges it with the gradient's.
    """
    sigmoid_of = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _aten.sigmoid.default and not node.kwargs:
            x = node.args[0]
            if x in sigmoid_of:  # one sigmoid per input
                node.replace_all_uses_with(sigmoid_of[x])
                graph.erase_node(node)
            else:
                sigmoid_of[x] = node
    floor = math.log(torch.finfo(dtype).eps)

    def call(before, target, args, like):
        return _insert(graph, before, target, args, like.meta)

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.binary_cross_entropy_with_logits.default:
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        x, y, weight, pos_weight, reduction = args[:5]
        reduction = node.kwargs.get("reduction", reduction)
        if weight is not None or pos_weight is not None or reduction != 0 or set(node.kwargs) - {"reduction"} \
                or not isinstance(x, fx.Node) or _shape(x) != _shape(node):
            continue
        s = sigmoid_of.get(x)
        if s is None:
            s = call(node, _aten.sigmoid.default, (x,), x)
            sigmoid_of[x] = s
        else:  # the gradient's sigmoid, defined later: move it up to here
            node.prepend(s)
        log_s = call(node, _aten.log.default, (s,), node)
        low = call(node, _aten.lt.Scalar, (x, floor), node)
        low.meta = {**node.meta, "val": node.meta["val"].to(torch.bool)} if "val" in node.meta else {}
        log_sig = call(node, _aten.where.self, (low, x, log_s), node)
        yx = call(node, _aten.mul.Tensor, (y, x), node)
        rest = call(node, _aten.sub.Tensor, (x, yx), node)
        new = call(node, _aten.sub.Tensor, (rest, log_sig), node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()


def _strip_constant_terms(graph: fx.Graph) -> bool:
    """Drop the summands of the output that do not depend on the latents (argument 0).

    The objective's value is a tree of sums, differences, negations and reshapes of terms;
    a term of that tree that does not depend on $u$ (``lgamma(y + 1)``, ``log(2 pi) / 2``,
    a prior's log scale) shifts each row's value by a constant, which a descent never sees.
    It is removed where its removal keeps the shape (no broadcasting onto it), and the
    rewritten output differs from the original by exactly those terms (same rounding
    otherwise: the remaining operations are the same). Returns whether anything was dropped.
    """
    out = graph.output_node()
    result = out.args[0]
    dep = _latent_dependent(graph)
    if not dep or not isinstance(result, fx.Node):
        return False
    dropped = False

    def latent(a) -> bool:
        return isinstance(a, fx.Node) and a in dep

    def same(a, node) -> bool:
        return _shape(a) is not None and _shape(a) == _shape(node) and (
            a.meta["val"].dtype == node.meta["val"].dtype)

    def insert(node, target, args):
        return _insert(graph, node, target, args, node.meta)

    def strip(node):
        nonlocal dropped
        if node.op != "call_function" or node.kwargs:
            return node
        op, args = node.target, node.args
        if op in (_aten.add.Tensor, _aten.sub.Tensor) and len(args) == 2:
            a, b = args
            if latent(a) and not latent(b) and same(a, node):
                dropped = True
                return strip(a)
            if latent(b) and not latent(a) and same(b, node):
                dropped = True
                rb = strip(b)
                return rb if op is _aten.add.Tensor else insert(node, _aten.neg.default, (rb,))
            if latent(a) and latent(b):
                ra, rb = strip(a), strip(b)
                return node if (ra is a and rb is b) else insert(node, op, (ra, rb))
            return node
        # linear maps that commute with the sum: a move of (a - c) is the move of a minus that of c
        if (op in _MOVES or op in (_aten.neg.default, _aten.sum.dim_IntList, _aten.sum.default)) \
                and args and latent(args[0]):
            r = strip(args[0])
            return node if r is args[0] else insert(node, op, (r, *args[1:]))
        return node

    new = strip(result)
    if new is not result:
        out.replace_input_with(result, new)
        graph.eliminate_dead_code()
    return dropped


def _simplify(graph: fx.Graph) -> None:
    """Exact rewrites of compositions that distributions produce (log of an exp'd rate), after
    dropping moves that change nothing (so that one affine leaf is not seen as two).

    ``xlogy(a, exp(b)) -> a * b`` (equal where ``b`` is finite; ``exp(b)`` overflowing to
    ``inf`` is a rejected step either way) and ``log(exp(b)) -> b``: a Poisson rate given
    as ``exp(eta)`` is taken back to ``eta`` by ``log_prob``, and both passes and their
    derivatives are saved.
    """
    for node in list(graph.nodes):  # moves that change nothing (alias, same-shape view or expand)
        if node.op == "call_function" and node.target in _NO_OP_MOVES and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if "val" in node.meta and "val" in src.meta and (
                tuple(node.meta["val"].shape) == tuple(src.meta["val"].shape)
            ) and (node.target is not _aten.permute.default or list(node.args[1]) == sorted(node.args[1])):
                node.replace_all_uses_with(src)
                graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_aten.xlogy.Tensor, _aten.log.default):
            continue
        b = node.args[1] if node.target is _aten.xlogy.Tensor else node.args[0]
        moves = []  # look through views and expands of the exp
        while isinstance(b, fx.Node) and b.op == "call_function" and b.target in _MOVES:
            moves.append(b)
            b = b.args[0]
        if not (isinstance(b, fx.Node) and b.target is _aten.exp.default):
            continue
        with graph.inserting_before(node):
            x = b.args[0]
            for m in reversed(moves):
                x = graph.call_function(m.target, (x, *m.args[1:]), dict(m.kwargs))
                x.meta = dict(m.meta)
            if node.target is _aten.xlogy.Tensor:
                x = graph.call_function(_aten.mul.Tensor, (node.args[0], x))
                x.meta = dict(node.meta)
        node.replace_all_uses_with(x)
        graph.erase_node(node)
    graph.eliminate_dead_code()


def _static(args) -> tuple:
    """Hashable form of an operation's non-tensor arguments (for the move signatures)."""
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.append(tuple(a))
        elif isinstance(a, fx.Node):
            out.append(a.name)
        else:
            out.append(a)
    return tuple(out)


def _elementwise_call(node: fx.Node) -> bool:
    """A pointwise operation called elementwise (no reduction argument that sums)."""
    if node.target is _aten.binary_cross_entropy_with_logits.default:
        reduction = node.args[4] if len(node.args) > 4 else node.kwargs.get("reduction", 1)
        return reduction == 0
    return True
