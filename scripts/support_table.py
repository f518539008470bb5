"""The README's support table, generated from the dispatch tables.

Rows are module types (grouped when a family's types have the same cells),
columns are extensions. A cell follows from the rules registered for the type
(``hbpkit.core.dispatch.FIRST_ORDER`` / ``SECOND_ORDER``): which rules an extension
needs (its parameter rule, and the rules that carry its message through the
module, see ``hbpkit/extensions/messages.py``) and whether the rules object
implements them (``ModuleRules.implements``).

    python3 scripts/support_table.py           # rewrite the table in README.md
    python3 scripts/support_table.py --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hbpkit import extensions as ext  # noqa: E402  (fills the dispatch tables)
from hbpkit.extensions.curvmatprod import _CurvMatProd  # noqa: E402
from hbpkit.extensions.diagonal import _Diagonal  # noqa: E402
from hbpkit.extensions.messages import AverageMessage, ProductMessage, SqrtMessage  # noqa: E402
from hbpkit.modules.base import LossRules, ModuleRules, UnsupportedRules  # noqa: E402
from hbpkit.modules.tables import FIRST_ORDER, SECOND_ORDER  # noqa: E402

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"

#: the columns: (header, extension instance, label of a supported cell)
COLUMNS = [
    ("BatchGrad", ext.BatchGrad(), "exact"),
    ("BatchL2", ext.BatchL2(), "exact"),
    ("SumGradSquared", ext.SumGradSquared(), "exact"),
    ("Variance", ext.Variance(), "exact"),
    ("DiagGGNExact", ext.DiagGGNExact(), "exact"),
    ("DiagGGNMC", ext.DiagGGNMC(), "MC"),
    ("DiagHessian", ext.DiagHessian(), "exact"),
    ("KFAC", ext.KFAC(), "≈ MC"),
    ("KFLR", ext.KFLR(), "≈"),
    ("KFRA", ext.KFRA(), "≈"),
    ("HBP hessian", ext.HBP("hessian", "exact", "sqrt"), "≈"),
    ("GGNMP", ext.GGNMP(), "exact"),
    ("HMP", ext.HMP(), "exact"),
    ("PCHMP", ext.PCHMP(), "exact"),
]

LEGEND = (
    "exact: equals its definition for any batch size; ≈: Kronecker approximation (exact for "
    "one sample without weight sharing; `kfac_approx` `expand` / `reduce` where parameters "
    "are shared over positions); MC: Monte-Carlo estimate; ✓: curvature passes through; "
    "–: nothing to compute (no parameters); ✗: refused with `NotImplementedError` before "
    "the backward pass; ¹: as the first module only (nothing is backpropagated to its input). "
    '`HBP hessian` stands for every `HBP(curvature="hessian" | "pch-*", ...)`.'
)


def param_rules(extension, rules: ModuleRules) -> list[str]:
    """The per-parameter rules ``extension`` calls on ``rules``."""
    if isinstance(extension, ext.HBP):
        return ["kron_from_sqrt" if extension.backprop == "sqrt" else "kron_from_average"]
    if isinstance(extension, _Diagonal):
        return ["param_diag"]
    if isinstance(extension, _CurvMatProd):
        needed = ["param_jac_mat_prod", "param_jac_t_mat_prod_sum"]
        if not rules.linear_in_params and extension.message.curvature != "ggn":
            needed.append("param_residual_mat_prod")
        return needed
    return ["batch_grad"]


def message_rules(extension, rules: ModuleRules) -> list[str]:
    """The rules that carry ``extension``'s message through the module (to its input)."""
    message = extension.message
    if message is None:
        return []
    needed = {
        SqrtMessage: ["jac_t_mat_prod"],
        AverageMessage: ["ea_jac_t_mat_jac_prod"],
        ProductMessage: ["jac_mat_prod", "jac_t_mat_prod"],
    }[type(message)]
    if message.curvature != "ggn" and not rules.linear_in_input:
        needed = [*needed, "residual_factor"]
    return needed


@functools.cache
def only_raises(function) -> bool:
    """Whether ``function``'s body (after its docstring) is a single ``raise``: a refusal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def implements(rules: ModuleRules, name: str) -> bool:
    """``rules.implements(name)``, not counting overrides that only refuse."""
    names = [name]
    if name == "residual_factor":  # the diagonal default builds on residual_diag
        names.append("residual_diag")
    return any(rules.implements(n) and not only_raises(getattr(type(rules), n)) for n in names)


def loss_cell(extension, rules: LossRules) -> str:
    message = extension.message
    if message is None:
        return "–"
    if isinstance(message, ProductMessage):
        needed = "hessian_mat_prod"
    elif message.loss_hessian == "sampled":
        needed = "sqrt_hessian_sampled"
    else:
        needed = {"exact": "sqrt_hessian", "average": "sum_hessian"}[message.loss_hessian]
    return "✓" if getattr(type(rules), needed) is not getattr(LossRules, needed) else "✗"


def cell(module_type: type, extension, label: str) -> str:
    rules = extension.table.lookup(_Instance(module_type))
    if isinstance(rules, UnsupportedRules):
        return "✗"
    if isinstance(rules, LossRules):
        return loss_cell(extension, rules)
    parametric = FIRST_ORDER.lookup(_Instance(module_type)) is not None
    if rules is None:
        return "–" if extension.message is None and not parametric else "✗"
    through = all(implements(rules, r) for r in message_rules(extension, rules))
    if not parametric:
        return "✓" if through else "✗"
    if not all(implements(rules, r) for r in param_rules(extension, rules)):
        return "✗"
    return label if through else label + "¹"


def _Instance(module_type: type) -> object:  # noqa: N802
    """An uninitialised module of ``module_type``: ``DispatchTable.lookup`` reads its type only."""
    return object.__new__(module_type)


def family(rules: object) -> str:
    if isinstance(rules, UnsupportedRules):
        return "not supported"
    return type(rules).__module__.rsplit(".", 1)[-1]


def rows() -> list[tuple[str, list[str], list[str], str]]:
    """``(family, module names, cells, note)`` in registration order, grouped."""
    # what hbpkit registers itself: torch.nn and hbpkit.branching modules (not users' types)
    types = [
        t
        for t in dict.fromkeys([*FIRST_ORDER.types(), *SECOND_ORDER.types()])
        if t.__module__.startswith(("torch.nn", "hbpkit.branching"))
    ]
    types.sort(key=lambda t: isinstance(SECOND_ORDER.lookup(_Instance(t)), UnsupportedRules))
    grouped: dict[tuple, list[str]] = {}
    for t in types:
        rules = SECOND_ORDER.lookup(_Instance(t)) or FIRST_ORDER.lookup(_Instance(t))
        cells = tuple(cell(t, e, label) for _, e, label in COLUMNS)
        key = (family(rules), cells, getattr(rules, "support_note", ""))
        grouped.setdefault(key, []).append(t.__name__)
    return [(fam, names, list(cells), note) for (fam, cells, note), names in grouped.items()]


def build_table() -> str:
    """The Markdown table with its legend, between the README markers (markers excluded)."""
    header = ["family", "modules", *[h for h, _, _ in COLUMNS], "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fam, names, cells, note in rows():
        modules = ", ".join(f"`{n}`" for n in names)
        lines.append("| " + " | ".join([fam, modules, *cells, note]) + " |")
    return "\n".join(["", *lines, "", LEGEND, ""])


def replace_in(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} / {END}")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return before + START + table + END + after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = replace_in(text, build_table())
    if args.check:
        if new != text:
            print("README.md's support table is out of date: run python3 scripts/support_table.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
