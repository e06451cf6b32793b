"""The snippets of docs/integrations.md (README's "Use with Lightning / accelerate / Trainer")
run as written; each skips when its framework is absent."""
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", re.S)
NEEDS = {"lightning": ["lightning"], "accelerate": ["accelerate"], "hf": ["transformers", "accelerate"]}


def snippets():
    return dict(SNIPPET.findall(DOC.read_text()))


def test_every_framework_has_a_snippet():
    assert set(snippets()) == set(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_snippet_runs(name, capsys):
    for module in NEEDS[name]:
        pytest.importorskip(module)
    if name == "hf":
        from _hf_imports import import_transformers
        import_transformers()
    scope = {"__name__": f"snippet_{name}"}
    exec(compile(snippets()[name], f"{DOC.name}:{name}", "exec"), scope)
    samples = scope["mmmod"].unwrap(scope["trainer"].optimizers[0] if name == "lightning" else
                                     scope["opt"]).history()["samples"].tolist()
    assert samples == {"lightning": [32] * 4, "accelerate": [32] * 4, "hf": [16] * 8}[name]
