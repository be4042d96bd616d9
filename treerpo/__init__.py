"""The application floor: the `treerpo` CLI, the `up` supervisor, the CPU demo, eval, warm-up.

It sits above both sides and may import `actor`, `learner` and `common`; nothing imports it
except tests and benchmarks.
"""

__version__ = "0.1.0"
