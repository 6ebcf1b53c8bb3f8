"""The examples in docs/python.md run as written, against a real node."""

import os
import re
import subprocess
import sys

from conftest import REPO


def examples() -> list:
    doc = (REPO / "docs" / "python.md").read_text()
    return re.findall(r"```python\n(.*?)```", doc, flags=re.S)


def test_the_guide_s_example_program_runs(cluster):
    node = cluster.node("docs")
    program = next(e for e in examples() if "asyncio.run(main())" in e)
    program = program.replace("127.0.0.1:7700", node.addr)
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "orders.eu b'one pizza'" in out, out
    assert "1 b'two pizzas'" in out, out
    assert "'name': 'docs'" in out, out
