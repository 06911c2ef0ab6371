"""cometkit's benchmarks against raw ``requests``, ``urllib3``, the ``openai`` SDK and the
CometAPI guide's recipes: ``python -m benchmarks`` (see ``README.md`` here).

Not installed with cometkit: run from the repository root.
"""
