"""``python -m agent.cli``: the ``edge-agent`` command."""

from agent.cli.main import main

raise SystemExit(main())
