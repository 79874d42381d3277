"""Pure memory arithmetic: per-model estimates, the device inventory, runtime overheads and the planner.

Nothing here imports torch; every byte is an `int` with a named term.
"""
