"""The pass itself (above the extensions): what a user calls and what runs in ``backward()``.

* :mod:`hbpkit.engine.extend`: :func:`extend`, the forward hooks that record module calls;
* :mod:`hbpkit.engine.convert`: :func:`convert`, rewriting functional operations into modules;
* :mod:`hbpkit.engine.context`: :class:`backprop`, the context manager;
* :mod:`hbpkit.engine.backward_pass`: one backward pass: check the graph, compute, commit.
"""
