"""The docs check: every fenced shell and Python block of README.md and docs/*.md runs as written on tiny local
fixtures, or is marked ``<!-- docs-check: skip (REASON) -->`` (harness: ``tests/docs_check.py``).

The blocks run in the newest environment only (the docs' commands are the same in both; some blocks use
transformers 5 classes). The terminal summary of the run states how many ran and how many are marked.
"""

import shlex

import pytest
import transformers
from docs_check import REPO_ROOT, Fixtures, all_blocks, extract_blocks, run_block, shell_commands

BLOCKS = all_blocks()
CODE = [block for block in BLOCKS if block.kind != "text"]
NEWEST = int(transformers.__version__.split(".")[0]) >= 5
SUMMARY = {"ran": [], "marked": [], "text": [block.where for block in BLOCKS if block.kind == "text"]}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("docs_fixtures"))


@pytest.mark.skipif(not NEWEST, reason="the docs check runs in the newest environment (.venv, transformers 5)")
@pytest.mark.parametrize("block", CODE, ids=[block.where for block in CODE])
def test_doc_block_runs_as_written(block, fixtures, tmp_path):
    assert block.kind != "untagged", (
        f"{block.where}: a fence without a language; tag it ```bash or ```python (run by the docs check) or "
        "```text (output, diagrams: not run)"
    )
    if block.skip_reason:
        SUMMARY["marked"].append(f"{block.where} ({block.skip_reason})")
        pytest.skip(f"{block.where}: marked not runnable here: {block.skip_reason}")
    run_block(block, fixtures, tmp_path / "work")
    SUMMARY["ran"].append(block.where)


def test_every_doc_has_its_blocks_found():
    """The extraction sees the fences (a parser that found nothing would pass everything)."""
    readme = extract_blocks(REPO_ROOT / "README.md")
    assert [block.language for block in readme[:2]] == ["bash", "python"]
    assert readme[0].text.startswith("make demo") and readme[0].line == 5
    assert len(CODE) >= 10 and all(block.text.strip() for block in CODE)


def test_skip_marker_must_be_directly_above_the_fence(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(
        "<!-- docs-check: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n"
        "<!-- docs-check: skip (too far) -->\n\n```python\nprint(1)\n```\n  ```sh\n  a \\\n    b  # c\n  # d\n  ```\n"
    )
    first, second, third = extract_blocks(doc, root=tmp_path)
    assert (first.where, first.skip_reason, first.text) == ("README.md:2", "needs a GPU", "nvidia-smi")
    assert second.skip_reason is None and second.kind == "python"
    assert [shlex.split(command, comments=True) for command in shell_commands(third.text)] == [["a", "b"]]
