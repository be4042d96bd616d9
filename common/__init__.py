"""treerpo common layer: config, tree model, TreeRPO math, wire, transport, metrics, rewards, data.

Imports nothing from `actor` or `learner`.
"""

__version__ = "0.1.0"
