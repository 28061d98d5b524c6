"""jaxsql: RL from execution feedback for text-to-SQL, in JAX.

The core package holds the CLI, configs, mesh and sharding rules,
checkpointing, the SQL sandbox and result comparison, rewards and metrics.
It never imports `rl` except from the CLI.
"""

__version__ = "0.1.0"
