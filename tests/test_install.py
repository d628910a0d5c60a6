"""The README's installation is what the project declares and CI runs: a fresh machine gets a virtual
environment (Debian's system Python refuses pip with externally-managed-environment), and the quick
start installs everything the "After training" section uses (Pillow, matplotlib, tensorboardX)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    """The README's text from `heading` (a line) to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = README.index(f"\n{heading}\n")
    ends = [m.start() for m in re.finditer(rf"\n#{{1,{len(level)}}} ", README) if m.start() > start]
    return README[start:min(ends, default=len(README))]


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block (comments and blank lines left out)."""
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip() and not line.startswith("#")]
            for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def requirements(extras: str) -> set[str]:
    """The distributions `pip install ".[extras]"` brings beside the dependencies: pyproject's extras,
    their dpcnn[...] references followed, as lower-case names."""
    tomllib = pytest.importorskip("tomllib")
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    todo, seen, names = [e.strip() for e in extras.split(",")], set(), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in table[extra]:
            ref = re.fullmatch(r"dpcnn\[(.*)\]", req)
            if ref:
                todo += [e.strip() for e in ref.group(1).split(",")]
            else:
                names.add(re.split(r"[<>=!~; \[]", req)[0].lower())
    return names


def test_the_quick_start_makes_a_venv_and_installs_what_after_training_uses():
    (quick, *_), dev = bash_blocks(section("## Quick start")), bash_blocks(section("## Quick start"))[1]
    venv = next(i for i, c in enumerate(quick) if " -m venv " in c)
    pip = next(i for i, c in enumerate(quick) if c.startswith("pip install"))
    assert venv < pip and ". .venv/bin/activate" in quick[venv], quick
    extras = re.search(r'"\.\[([^\]]+)\]"', quick[pip])
    assert extras, quick[pip]
    brought = requirements(extras.group(1))
    after = section("### After training: evaluate, predict, plot")
    assert "dpcnn.predict" in after and "dpcnn.plot" in after
    for need in ("pillow", "matplotlib", "tensorboardx", "mpich", "tqdm"):       # predict, plot, --tensorboard
        assert need in brought, (need, quick[pip], sorted(brought))
    assert requirements("tools") <= requirements("all")
    assert any(c.startswith('pip install -e ".[all]"') for c in dev), dev


def test_ci_installs_exactly_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [line.replace(" -q", "") for line in ci.splitlines()       # of the project itself (not torch)
                if line.startswith("pip install") and '".[' in line]
    dev = next(c for c in bash_blocks(section("## Quick start"))[1] if c.startswith("pip install"))
    assert installs == [dev], (installs, dev)
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci


def test_the_readme_says_what_predict_top_shows():
    """`--top 3` lists only classes at least 1% likely: said in predict --help, and now in the README."""
    after = section("### After training: evaluate, predict, plot")
    assert re.search(r"--top K.{0,120}at least 1% likely", after, re.S), after
