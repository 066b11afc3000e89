"""``edge-agent ...``: the command line, one module per command group.

:mod:`agent.cli.main` (the parser, ``run``, ``demo``, ``complete``, ``status``) loads the other
command modules (``select``, ``audit``, ``registry``, ``sync``, ``doctor``) only when the command
needs them, so ``edge-agent run`` starts without their imports.
"""

from agent.cli.main import main

__all__ = ["main"]
