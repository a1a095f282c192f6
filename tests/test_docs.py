"""The docs stay true to the code: the option reference is the rendered option table, and every relative link
in README.md and docs/ points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and [text]: target, outside code spans; images too.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_options_reference_is_rendered_from_the_option_table():
    from subspace_optim import options_doc

    assert options_doc.DOC.read_text(encoding="utf-8") == options_doc.render(), (
        f"docs/options.md is stale: run `{options_doc.COMMAND}` and commit the result"
    )


def test_pretrain_fields_named_by_the_generator_exist():
    """The two AdamW hyperparameters the pretrain job reads from adam_* fields still have them."""
    from subspace_optim import options_doc
    from subspace_optim.pretrain.config import FIELDS

    for option, fields in options_doc.PRETRAIN_ADAM_FIELDS.items():
        assert option in options_doc.options.BY_NAME, option
        assert all(f in FIELDS for f in fields), (option, fields)


def _relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = [a or b for a, b in LINK.findall(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    from subspace_optim import options_doc

    stale = tmp_path / "options.md"
    stale.write_text("old\n", encoding="utf-8")
    assert options_doc.main(["--check", "--path", str(stale)]) == 1
    assert options_doc.COMMAND in capsys.readouterr().err
    assert options_doc.main(["--path", str(stale)]) == 0
    assert options_doc.main(["--check", "--path", str(stale)]) == 0


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but - and _ dropped, spaces to -, repeats numbered."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    ids = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        ids.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return ids


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_section_links_point_to_existing_headings(page):
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for a, b in LINK.findall(text):
        target = a or b
        path, _, anchor = target.partition("#")
        if not anchor or re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        file = page if not path else page.parent / path
        if file.suffix == ".md" and file.exists() and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to sections that do not exist: {broken}"
