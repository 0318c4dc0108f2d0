"""docs/BENCHMARKS.md is rendered from benchmark JSON, every figure traceable to a results file."""

import json

from benchmarks.record import flatten, render


def test_flatten_nested_records():
    rows = dict(flatten({"train": {"ours": 2.0, "ratio": 1.5}, "runs": [{"a": 1}, {"a": 2}], "xs": [1, 2]}))
    assert rows == {"train.ours": 2.0, "train.ratio": 1.5, "runs[0].a": 1, "runs[1].a": 2, "xs": [1, 2]}


def test_render_keeps_every_figure_and_ignores_non_json_lines(tmp_path):
    (tmp_path / "model.json").write_text("some table\n" + json.dumps({"decode": {"ratio": 6.25}, "train_speedup": 1.5}) + "\n{broken\n")
    page = render(tmp_path)
    assert "## model" in page and "`decode.ratio` | 6.25" in page and "broken" not in page
    assert "| model | `train_speedup` | 1.5x |" in page  # speedups are repeated in the headline table
