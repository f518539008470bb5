"""The docs' generated tables: supported modules, and the rules each extension needs.

Both come from what each extension says it needs (``Extension.required_param_rules``,
its per-parameter rule; ``Extension.required_message_rules``, the rules that carry its
message through a module, see ``hbpkit/extensions/messages.py``;
``Extension.required_loss_rules``, what the loss must provide): the same lists the
backward pass checks before it computes anything.

* ``docs/supported-modules.md``: rows are module types (grouped when a family's
  types have the same cells), columns are extensions. A cell follows from the
  rules registered for the type (``hbpkit.core.dispatch.FIRST_ORDER`` /
  ``SECOND_ORDER``) and whether the rules object implements what the extension
  needs (``ModuleRules.implements``).
* ``docs/own-module.md``: rows are extensions, columns are rule methods: what a
  user's rules class must implement for each extension (``hbpkit.register``).

    python3 scripts/support_table.py           # rewrite both tables in docs/
    python3 scripts/support_table.py --check   # exit 1 if a page is out of date
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hbpkit import extensions as ext  # noqa: E402
from hbpkit.modules.base import (  # noqa: E402
    DEFAULTS_BUILT_ON,  # noqa: E402
    LossRules,
    ModuleRules,
    UnsupportedRules,
)
from hbpkit.modules.tables import FIRST_ORDER, SECOND_ORDER  # noqa: E402

#: (page, start marker, end marker) of each generated table
SUPPORT_PAGE = (
    "docs/supported-modules.md",
    "<!-- support-table:start -->",
    "<!-- support-table:end -->",
)
MATRIX_PAGE = ("docs/own-module.md", "<!-- rule-matrix:start -->", "<!-- rule-matrix:end -->")

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
    ("SqrtGGNExact", ext.SqrtGGNExact(), "exact"),
    ("SqrtGGNMC", ext.SqrtGGNMC(), "MC"),
    ("BatchJacobian", ext.BatchJacobian(), "exact"),
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
    return extension.required_param_rules(rules)


def message_rules(extension, rules: ModuleRules) -> list[str]:
    """The rules that carry ``extension``'s message through the module (to its input)."""
    return extension.required_message_rules(rules)


def loss_rules(extension) -> list[str]:
    """The ``LossRules`` methods that start ``extension``'s message (none without one)."""
    return extension.required_loss_rules()


#: the three forms of a module's residual (eq. 7); their defaults build on ``residual_diag``
RESIDUAL_RULES = ("residual_factor", "residual_sum", "residual_mat_prod")


@functools.cache
def only_raises(function) -> bool:
    """Whether ``function``'s body (after its docstring) is a single ``raise``: a refusal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def implements(rules: ModuleRules, name: str) -> bool:
    """``rules.implements(name)`` (or the rule its default builds on), not counting
    overrides that only refuse."""
    names = [name]
    if name in DEFAULTS_BUILT_ON:  # e.g. the diagonal residual defaults on residual_diag
        names.append(DEFAULTS_BUILT_ON[name])
    return any(rules.implements(n) and not only_raises(getattr(type(rules), n)) for n in names)


def loss_cell(extension, rules: LossRules) -> str:
    needed = loss_rules(extension)
    if not needed:  # a message that needs nothing of the loss (BatchJacobian): any loss
        return "✓" if extension.needs_backprop else "–"
    overridden = all(getattr(type(rules), n) is not getattr(LossRules, n) for n in needed)
    return "✓" if overridden else "✗"


def cell(module_type: type, extension, label: str) -> str:
    rules = extension.table.lookup(_Instance(module_type), fallback=False)
    parametric = FIRST_ORDER.lookup(_Instance(module_type), fallback=False) is not None
    return rules_cell(rules, parametric, extension, label)


def rules_cell(rules: object, parametric: bool, extension, label: str) -> str:
    """The cell of ``rules`` (``None``: not registered) for a module with (``parametric``) or
    without parameters."""
    if isinstance(rules, UnsupportedRules):
        return "✗"
    if isinstance(rules, LossRules):
        return loss_cell(extension, rules)
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
    parts = type(rules).__module__.split(".")
    return parts[-2] if parts[-1] == "rules" else parts[-1]  # a package's rules.py: its name


def rows() -> list[tuple[str, list[str], list[str], str]]:
    """``(family, module names, cells, note)`` in registration order, grouped."""
    # what hbpkit registers itself: torch.nn and hbpkit.branching modules (not users' types)
    types = [
        t
        for t in dict.fromkeys([*FIRST_ORDER.types(), *SECOND_ORDER.types()])
        if t.__module__.startswith(("torch.nn", "hbpkit.branching", "hbpkit.regions"))
    ]
    types.sort(key=lambda t: isinstance(SECOND_ORDER.lookup(_Instance(t)), UnsupportedRules))
    grouped: dict[tuple, list[str]] = {}
    for t in types:
        rules = SECOND_ORDER.lookup(_Instance(t)) or FIRST_ORDER.lookup(_Instance(t))
        cells = tuple(cell(t, e, label) for _, e, label in COLUMNS)
        key = (family(rules), cells, getattr(rules, "support_note", ""))
        grouped.setdefault(key, []).append(t.__name__)
    out = [(fam, names, list(cells), note) for (fam, cells, note), names in grouped.items()]
    generic = SECOND_ORDER.fallback  # every other module, with or without parameters
    cells = [rules_cell(generic, True, e, label) for _, e, label in COLUMNS]
    out.append((family(generic), [ANY_OTHER], cells, generic.support_note))
    return out


#: the last row: what has no rules of its own goes the generic path (``modules/generic.py``)
ANY_OTHER = "any other module (e.g. MultiheadAttention kept whole, yours)"


def build_table() -> str:
    """The support table with its legend, between the page's markers (markers excluded)."""
    header = ["family", "modules", *[h for h, _, _ in COLUMNS], "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fam, names, cells, note in rows():
        modules = ", ".join(n if n == ANY_OTHER else f"`{n}`" for n in names)
        lines.append("| " + " | ".join([fam, modules, *cells, note]) + " |")
    return "\n".join(["", *lines, "", LEGEND, ""])


#: the rows of the rule matrix: the support table's columns and the batch-averaged Hessian
MATRIX_ROWS = [(h, e) for h, e, _ in COLUMNS] + [
    ("HBP hessian, batch-average", ext.HBP("hessian", "average", "batch-average"))
]

#: the columns of the rule matrix: the rule methods users implement, by kind
MATRIX_COLUMNS = {
    "parameter rules": ["batch_grad", "param_diag", "kron_from_sqrt", "kron_from_average"]
    + ["param_jac_mat_prod", "param_jac_t_mat_prod_sum", "param_residual_mat_prod"]
    + ["param_residual_diag", "param_jac_t_columns"],
    "message rules": ["jac_t_mat_prod", "jac_mat_prod", "ea_jac_t_mat_jac_prod"]
    + list(RESIDUAL_RULES),
    "loss rules": ["sqrt_hessian", "sqrt_hessian_sampled", "sum_hessian", "hessian_mat_prod"],
}

MATRIX_LEGEND = (
    "✓: needed from every module the extension meets; ⁱ: only from modules nonlinear in "
    "their input (`linear_in_input = False`: activations, normalization); ᵖ: only from "
    "modules nonlinear in their parameters (`linear_in_params = False`). Parameter rules are "
    "needed from modules with trainable parameters, message rules from every module the "
    "message passes on its way from the loss to the first module with parameters (that "
    "module excluded), loss rules from the loss. An extension missing from a table needs "
    "nothing from that kind of rules. `residual_factor`, `residual_sum` and "
    "`residual_mat_prod` have defaults built on `residual_diag` (elementwise second "
    "derivatives); first-order rules other than `batch_grad` (`batch_l2`, "
    "`sum_grad_squared`, ...) have defaults built on it."
)


def _flags(linear_in_input: bool, linear_in_params: bool) -> SimpleNamespace:
    """A stand-in rules object: what :func:`param_rules` / :func:`message_rules` read."""
    return SimpleNamespace(linear_in_input=linear_in_input, linear_in_params=linear_in_params)


def _column(name: str) -> str:
    """The matrix column of the rule ``name``: itself, or, for a rule without a column of its
    own whose default builds on another (``batch_l2`` on ``batch_grad``), that one."""
    named = {m for ms in MATRIX_COLUMNS.values() for m in ms}
    return DEFAULTS_BUILT_ON.get(name, name) if name not in named else name


def rule_needs(extension) -> dict[str, str]:
    """``{rule method: "✓" | "ⁱ" | "ᵖ"}``: what a rules class implements for ``extension``."""
    needs: dict[str, str] = {}
    linear, nonlinear = _flags(True, True), _flags(False, False)
    for name in message_rules(extension, nonlinear):
        needs[_column(name)] = "✓" if name in message_rules(extension, linear) else "ⁱ"
    for name in param_rules(extension, nonlinear):
        needs[_column(name)] = "✓" if name in param_rules(extension, linear) else "ᵖ"
    for name in loss_rules(extension):
        needs[name] = "✓"
    return needs


def build_matrix() -> str:
    """The rule matrix with its legend, between the page's markers (markers excluded)."""
    needs = {header: rule_needs(e) for header, e in MATRIX_ROWS}
    named = {m for ms in MATRIX_COLUMNS.values() for m in ms}
    unnamed = {m for n in needs.values() for m in n} - named
    if unnamed:
        raise SystemExit(f"rules {sorted(unnamed)} have no column in the rule matrix")
    for title, columns in MATRIX_COLUMNS.items():  # every column is a method users can override
        base = LossRules if title == "loss rules" else ModuleRules
        missing = [m for m in columns if not hasattr(base, m)]
        if missing:
            raise SystemExit(f"{base.__name__} has no method(s) {missing}")
    blocks = []
    for title, columns in MATRIX_COLUMNS.items():
        header = ["extension", *[f"`{m}`" for m in columns]]
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for row, need in needs.items():
            if not any(m in need for m in columns):
                continue  # e.g. first-order extensions: no message, no loss rule
            lines.append("| " + " | ".join([row, *[need.get(m, "") for m in columns]]) + " |")
        blocks.append("\n".join(lines))
    return "\n".join(["", "\n\n".join(blocks), "", MATRIX_LEGEND, ""])


def replace_in(text: str, table: str, start: str, end: str, page: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{page} lacks the markers {start} / {end}")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return before + start + table + end + after


def generated() -> dict[Path, tuple[str, str]]:
    """``{page: (current text, text with fresh tables)}``."""
    out = {}
    for (page, start, end), build in [(SUPPORT_PAGE, build_table), (MATRIX_PAGE, build_matrix)]:
        path = ROOT / page
        text = path.read_text()
        out[path] = (text, replace_in(text, build(), start, end, page))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is stale")
    args = parser.parse_args()
    stale = []
    for path, (text, new) in generated().items():
        if new == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(new)
    if args.check and stale:
        names = ", ".join(map(str, stale))
        print(
            f"the generated tables in {names} are out of date: run python3 scripts/support_table.py"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
