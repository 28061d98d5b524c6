"""What a new user sees: no warning about a missing PyTorch, since jaxsql never needs torch models."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# transformers decides whether torch is there with importlib.util.find_spec; make it answer "no".
HIDE_TORCH = """
import importlib.util, sys
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else _find(name, *a, **k)
"""


def _stderr(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    proc = subprocess.run([sys.executable, "-c", HIDE_TORCH + code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_no_torch_notice_when_jaxsql_imports_transformers():
    # the condition is real: transformers alone prints the notice without torch
    assert "PyTorch was not found" in _stderr("import transformers")
    err = _stderr("import jaxsql, transformers\n"
                  "from data.tokenizer import train_tokenizer\n"
                  "transformers.utils.logging.get_logger('transformers').warning('a real warning')")
    assert "PyTorch was not found" not in err
    assert "a real warning" in err  # other warnings still show
