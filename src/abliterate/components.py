"""The component table: the names a recipe uses for the kinds of tensor it can edit.

Why its own module: the architecture registry (`layout`), recipe resolution (`recipe`) and
the sweep grid (`grid`, imported by the Snakefile at DAG time, so it must stay cheap) all
validate component names against this one table.

Write side (the tensor writes into the residual stream): `attn_out`, `mlp_down` (dense
MLP down, including the dense first layers of an MoE model), `shared_down`,
`expert_down`, `embed`. Read side (it reads from the residual): `router`,
`expert_gate`, `expert_up`, `expert_gate_up` (fused gate+up).

`router_suppress` is not a component a recipe lists: it is the recipe key of that name
(chosen experts' router rows, `edit.suppress_rows`), and its plan entries carry that name
as their component so plans, logs and model cards count them apart from `router`.
"""

from __future__ import annotations

WRITE_COMPONENTS = ("attn_out", "mlp_down", "shared_down", "expert_down", "embed")
READ_COMPONENTS = ("router", "expert_gate", "expert_up", "expert_gate_up")
COMPONENTS = WRITE_COMPONENTS + READ_COMPONENTS
EXPERT_COMPONENTS = ("expert_down", "expert_gate", "expert_up", "expert_gate_up")


def side(component: str) -> str:
    """'write' or 'read': whether tensors of `component` write into the residual stream."""
    return "write" if component in WRITE_COMPONENTS else "read"
