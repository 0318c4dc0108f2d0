"""The results page's blocks: each run's block is replaced between its own markers, the others are kept."""

from __future__ import annotations

from hybrid_rl.pipeline.results import markers, write


def test_a_named_block_replaces_only_its_own_markers(tmp_path):
    doc = tmp_path / "RESULTS.md"
    quick, tool = markers("quickstart"), markers("math-tool")
    doc.write_text(f"# Results\n\n## RL\n\n{quick[0]}\nold quick\n{quick[1]}\n\n## Tools\n\n{tool[0]}\nold tool\n{tool[1]}\n")
    write(doc, f"{tool[0]}\nnew tool\n{tool[1]}", "math-tool")
    text = doc.read_text()
    assert "new tool" in text and "old tool" not in text and "old quick" in text
    assert text.index("## Tools") < text.index("new tool")  # in place, not appended


def test_a_block_without_markers_yet_is_appended_under_rl(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n")
    begin, end = markers("quickstart")
    write(doc, f"{begin}\nfirst\n{end}")
    assert doc.read_text().split("## RL", 1)[1].strip().startswith(begin)
