"""The README's result tables are the shipped model's metrics.json, rendered (benchmarks/readme_tables.py)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_shipped_metrics():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    assert "<!-- table:quality -->" in readme and "<!-- table:styles -->" in readme
    assert tables.render(readme, json.loads(tables.METRICS.read_text())) == readme, \
        "README tables are stale: run python benchmarks/readme_tables.py --write"


def test_a_changed_metric_changes_the_table():
    tables = _tables()
    metrics = json.loads(tables.METRICS.read_text())
    metrics["test_factual"]["coco_caption"]["CIDEr"] = 9.876
    assert "9.876" in tables.quality_table(metrics)


def test_an_empty_table_block_is_filled():
    tables = _tables()
    metrics = json.loads(tables.METRICS.read_text())
    filled = tables.render("<!-- table:blind -->\n<!-- /table:blind -->\n", metrics)
    assert filled.startswith("<!-- table:blind -->\n| rating") and filled.endswith("|\n<!-- /table:blind -->\n")
    assert tables.render(filled, metrics) == filled
