"""Short functions: none in the package or in training/ is longer than 80 lines (the house
rule: a longer one holds two ideas and becomes an object or two functions)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 80


def long_functions(path: Path, limit: int = LIMIT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{n.lineno} "
            f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_over_80_lines():
    found = [f for package in ("napari_cellseg", "training")
             for path in sorted((REPO / package).rglob("*.py")) for f in long_functions(path)]
    assert found == []


def test_the_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "m.py") == ["m.py:5 long (81 lines)"]
