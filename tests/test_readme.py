"""The README's Python API example runs as written (only made short and pointed at a temp dir)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_api_example_runs(tmp_path, capsys):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    edits = [('steps=600, out="runs/demo"', f'steps=30, out={str(tmp_path / "demo")!r}, progress=False'),
             ('barkgpt.load("runs/demo")', f'barkgpt.load({str(tmp_path / "demo")!r})'),
             ('model.save("my-model")', f'model.save({str(tmp_path / "my-model")!r})')]
    for old, new in edits:
        assert old in block, f"the README example changed: update this test's edit of {old!r}"
        block = block.replace(old, new)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("User: speak Assistant:")
    assert scope["logits"].shape[-1] == 9 and scope["loss"].item() > 0
    assert os.path.exists(tmp_path / "my-model" / "model.safetensors")
