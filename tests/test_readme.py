"""The README stays a page a user can navigate: short, its numbers and configuration reference generated
(from results/ and pipeline/config.py) and current, its links and commands true."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import IndexConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
README_MAX_LINES = 300


def _load_generator():
    """lab/studies/readme.py is a script, not a module of any package: load it from its path."""
    spec = importlib.util.spec_from_file_location("readme_generator", ROOT / "lab" / "studies" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()
DOCUMENTS = generator.documents(ROOT)


def test_the_readme_fits_in_300_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_every_generated_block_is_current_with_results_and_the_config():
    text = "".join(path.read_text() for path in DOCUMENTS)
    for name in generator.renderers(RESULTS):
        assert f"<!-- generated:{name} -->" in text, f"no document holds the generated {name} block"
    stale = [str(path.relative_to(ROOT)) for path in generator.stale_documents(ROOT)]
    assert stale == [], f"stale: {stale}; run make docs (python lab/studies/readme.py)"


def test_a_stale_block_is_rewritten_and_an_unknown_one_refused():
    stale = "intro\n<!-- generated:bench -->\n2.0x faster\n<!-- /generated:bench -->\nrest\n"
    fresh = generator.update(stale, RESULTS)
    assert "2.0x faster" not in fresh and generator.bench_block(RESULTS) in fresh
    assert fresh.startswith("intro\n") and fresh.endswith("rest\n")
    with pytest.raises(KeyError, match="nonsense"):
        generator.update("<!-- generated:nonsense -->\nx\n<!-- /generated:nonsense -->\n", RESULTS)


def test_a_block_in_docs_links_from_docs():
    block = "<!-- generated:bench -->\n<!-- /generated:bench -->\n"
    assert "](results/bench/latest.md)" in generator.update(block, RESULTS)
    assert "](../results/bench/latest.md)" in generator.update(block, RESULTS, prefix="../")


def test_the_frontier_block_quotes_the_command_and_every_point():
    result = json.loads((RESULTS / "frontier.json").read_text())
    block = generator.frontier_block(RESULTS)
    assert f"--images {result['args']['images']}" in block
    for point in result["points"]:
        assert f"| {point['name']} | {point['ms_per_image']:.2f} |" in block


def test_the_configuration_reference_lists_every_field_with_its_default_and_description():
    reference = generator.configuration_block()
    for section, field in IndexConfig.model_fields.items():
        assert f"### `{section}`" in reference
        for name, info in field.annotation.model_fields.items():
            row = f"| `{name}` | `{generator.table_cell(generator.type_name(info.annotation))}` | "
            row += f"`{generator.table_cell(generator.default_text(info))}` |"
            assert row in reference, f"{section}.{name} is missing from the configuration reference"
            assert generator.table_cell(info.description or "") in reference
    assert '| `vector_dtype` | `"float16" \\| "float32"` | `"float32"` |' in reference
    routes = '`list[ExitRoute \\| MergeRoute \\| TwoPhaseRoute \\| PruneRoute]` | `[{"name": "full"}]`'
    assert f"| `routes` | {routes} |" in reference


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_link_between_the_documents_resolves():
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def _code(doc: Path) -> tuple[list[str], list[str]]:
    """The documented command lines (fenced blocks, continuations joined) and the inline code spans."""
    text = doc.read_text()
    fenced = "\n".join(re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M)).replace("\\\n", " ")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return fenced.splitlines(), re.findall(r"`([^`\n]+)`", prose)


def test_every_documented_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for doc in DOCUMENTS:
        lines, spans = _code(doc)
        named = [m.group(1) for m in map(re.compile(r"\s*make ([\w-]+)").match, lines + spans) if m]
        assert set(named) <= targets, f"{doc.relative_to(ROOT)} names make targets {set(named) - targets}"


def test_every_documented_script_exists():
    for doc in DOCUMENTS:
        lines, spans = _code(doc)
        scripts = re.findall(r"\bpython ([\w/]+\.py)", "\n".join(lines + spans))
        missing = [s for s in scripts if not (ROOT / s).exists()]
        assert missing == [], f"{doc.relative_to(ROOT)} runs scripts that do not exist: {missing}"


def _options(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", capsys.readouterr().out))


def test_every_documented_icar_command_and_option_exists(capsys):
    used: dict[str, set[str]] = {}
    for doc in DOCUMENTS:
        for line in _code(doc)[0]:
            if match := re.match(r"\s*(?:\.venv/bin/)?icar ([\w-]+)(.*)", line):
                options = re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", match.group(2).split("#")[0])
                used.setdefault(match.group(1), set()).update(options)
    assert {"index", "reindex", "query", "serve", "build-index"} <= used.keys()
    unknown = {command: options - _options(command, capsys) for command, options in used.items()}
    assert {command: options for command, options in unknown.items() if options} == {}
