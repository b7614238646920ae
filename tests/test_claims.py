"""What the README and the package say of themselves holds on a fresh clone: links resolve, no file cites
a document the repository lacks, no hand-typed counts that go stale."""

from __future__ import annotations

import re

from helpers import ROOT

MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_of_the_readme_and_docs_exists():
    for page in MARKDOWN:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_no_file_cites_a_document_the_repository_lacks():
    cited = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
    for path in [*(ROOT / "h0mini").rglob("*.py"), *(ROOT / "h0mini").rglob("*.yaml"), *MARKDOWN]:
        for name in set(cited.findall(path.read_text(errors="replace"))):
            assert list(ROOT.rglob(name)), f"{path.relative_to(ROOT)} cites {name}, which is not in the repository"


def test_the_readme_types_no_test_count():
    # A count of tests goes stale with the next test: pytest prints the real one.
    assert not re.search(r"\b\d{3,} tests\b", (ROOT / "README.md").read_text())


def test_the_first_screen_has_what_a_newcomer_needs():
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    for needed in ("git clone", 'pip install ".[wsi]"', "h0mini demo-weights", "H0MINI_WEIGHTS=\"$PWD/",
                   "h0mini embed examples/tiles", "h0mini embed-slides", "h0mini.embed_tiles(", "h0mini.embed_slide(",
                   "python -m pytest", "docs/performance.md", "docs/distillation.md", "docs/evaluation.md"):
        assert needed in first, needed


def test_the_readme_says_what_dev_installs():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev_extras = re.search(r"h0mini\[([^\]]+)\]", " ".join(extras["dev"])).group(1).split(",")
    sentence = next(line for line in (ROOT / "README.md").read_text().split("\n\n") if line.startswith("`[dev]` installs"))
    for extra in dev_extras:
        assert f"`{extra}`" in sentence, extra
