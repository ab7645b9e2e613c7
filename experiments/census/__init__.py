"""The property census: for each breaking condition, how often the modular rule is exact.

Run as ``python -m experiments.census [--quick | --smoke] [--tables-only]`` (or
``python -m experiments census``). See ``README.md`` in this folder.
"""
