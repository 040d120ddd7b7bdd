"""The README's RetrievalAttention example runs as written."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no python block marked '<!-- example: {name} -->'"
    return match.group(1)


def test_retrieval_attention_example_runs_as_written():
    printed = io.StringIO()
    namespace: dict = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(printed):
        exec(compile(_example("retrieval-attention"), "README.md:retrieval-attention", "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert len(lines) == 8 and lines[0].startswith("0 ")
    # once the window has filled and the guard passed, blocks retrieve frames
    selected = [eval(line.split(" ", 1)[1]) for line in lines]
    assert selected[0] == [[]] and any(sel[0] for sel in selected[4:])
    attn = namespace["attn"]
    assert attn.closed and attn.history.pool.usage()["pages_used"] == 0
