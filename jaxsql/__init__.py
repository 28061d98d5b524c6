"""jaxsql: RL from execution feedback for text-to-SQL, in JAX.

The core package holds the CLI, configs, mesh and sharding rules,
checkpointing, the SQL sandbox and result comparison, rewards and metrics.
It never imports `rl` except from the CLI.
"""

__version__ = "0.1.0"

import logging as _logging


class _TorchNotFoundNotice(_logging.Filter):
    """Drops transformers' import-time notice "PyTorch was not found. Models won't be available ...".

    jaxsql uses transformers only for tokenizers and configs, so without torch
    nothing is wrong; every other transformers message passes.
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found. Models won't be available")


if not any(isinstance(f, _TorchNotFoundNotice) for f in _logging.getLogger("transformers").filters):
    _logging.getLogger("transformers").addFilter(_TorchNotFoundNotice())
