r"""The per-row objective of :class:`~deqppl.encoders.AutoDEQ` traced once into aten graphs.

Each evaluation of the objective through Pyro re-runs the program, its handlers and every
``log_prob``, including the terms that do not depend on the latents (``lgamma(y + 1)`` of a
Poisson likelihood, the normalising constants of the priors, the ``W`` and ``B`` priors that
drop out of the per-row sums). Here the objective $F(u; \theta, y)$ of one batch shape is
traced once by ``make_fx`` in *fake* mode (shapes only, no values: a program whose control flow
depends on values cannot be traced and keeps the Pyro path), dead code is eliminated, and the
graph is split into

* a *prologue*: every node that does not depend on $u$ (functions of the globals and the
  data), evaluated once per solve -- this is where ``lgamma(y + 1)`` goes;
* a *body*: the nodes that depend on $u$, taking the prologue's outputs as inputs,

so that each Newton step runs only the aten operations that involve the latents, with no
Pyro handler in between. Derivatives of the body come from plain autograd (the fused backward
kernels), as in :meth:`AutoDEQ._linearize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

#: Batches with fewer data entries than this keep the Pyro path: tracing costs about a second
#: once per batch shape (measured, ExpFamPCA d = 50), which a solve of a small batch (a few ms
#: per evaluation) does not amortise.
TRACE_MIN_ENTRIES = 2**16


class TracedObjective:
    """``F(u, *params, *data)`` of one batch shape as a prologue and a body graph.

    Raises whatever ``make_fx`` raises when the function cannot be traced without values; the
    caller then keeps the Pyro path.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], u: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        gm = make_fx(fn, tracing_mode="fake")(u, *inputs)
        gm.graph.eliminate_dead_code()
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        (output,) = [n for n in graph.nodes if n.op == "output"]
        dep = {placeholders[0]}
        for node in graph.nodes:
            if node.op == "call_function" and any(a in dep for a in node.all_input_nodes):
                dep.add(node)
        frontier: list[fx.Node] = []
        for node in graph.nodes:
            if node in dep and node.op != "placeholder":
                frontier.extend(a for a in node.all_input_nodes if a not in dep and a not in frontier)
        result = output.args[0]
        if not isinstance(result, fx.Node) or result not in dep:
            raise TypeError("the traced objective does not depend on the latents")
        pro, env = fx.Graph(), {}
        for node in graph.nodes:
            if node.op == "output":
                break
            if node not in dep:
                env[node] = pro.node_copy(node, lambda a: env[a])
        pro.output(tuple(env[a] for a in frontier))
        body, benv = fx.Graph(), {placeholders[0]: None}
        benv[placeholders[0]] = body.placeholder("u")
        for i, a in enumerate(frontier):
            benv[a] = body.placeholder(f"c{i}")
        for node in graph.nodes:
            if node in dep and node.op != "placeholder":
                benv[node] = body.node_copy(node, lambda a: benv[a])
        body.output(benv[result])
        self.prologue = fx.GraphModule(gm, pro)
        self.prologue.graph.eliminate_dead_code()
        self.prologue.recompile()
        self.body = fx.GraphModule(gm, body)
        self.shape = tuple(u.shape)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``u -> F(u)`` at these globals and data (the prologue evaluated once, here)."""
        consts = tuple(self.prologue(*inputs))
        body = self.body

        def value(u: torch.Tensor) -> torch.Tensor:
            return body(u, *consts)

        return value
