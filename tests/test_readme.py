"""The README's Python example runs and shows what it says (exact with the patch, large control)."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_first_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    nums = [float(m) for m in re.findall(r"tensor\(([-0-9.e+]+)", out.getvalue())]
    assert len(nums) == 2
    assert nums[0] < 1e-13 and nums[1] > 1e-2
