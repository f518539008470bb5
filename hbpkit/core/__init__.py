"""The records of a forward pass (layer 0 of the package: imports nothing from hbpkit above it).

* :mod:`hbpkit.core.calls`: :class:`ModuleCall`, one record per call of an extended module;
* :mod:`hbpkit.core.graph`: :class:`CallGraph`, the chain or DAG of calls a backward pass
  runs through;
* :mod:`hbpkit.core.dispatch`: :class:`DispatchTable`, module type -> derivative rules.
"""
