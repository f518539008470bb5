"""Client backends and entry points for libraries built on hbpkit.

Nothing here is imported by ``import hbpkit``; ``hbpkit.integrations.laplace`` imports
laplace-torch (``pip install hbpkit[laplace]``).
"""
