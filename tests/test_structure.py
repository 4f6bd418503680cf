"""ddpm.py reads top to bottom: sections under banners in the order of the table of contents in its
docstring, each defining a name before it is used (the two appendices at the end hold plumbing and
data that any section calls), no function longer than 60 lines except build_parser, the argparse
Namespace stopping at the command line's parser and job builders, one table of samplers, and the
reverse step and the schedule's formulas written once."""
import ast
import re
from pathlib import Path

import pytest

import ddpm

SOURCE = (Path(__file__).resolve().parent.parent / "ddpm.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
BANNER = re.compile(r"^# -{20,}\n# (.+)\n# -{20,}$", re.M)
SUB_BANNER = re.compile(r"^# -- (.+?) -{3,}$", re.M)
APPENDICES = ("Appendix: run safety", "Appendix: the built-in demo faces")


def sections():
    """[(title, first line, last line)] of the banners, in file order."""
    found = [(m.group(1), SOURCE[:m.start()].count("\n") + 1) for m in BANNER.finditer(SOURCE)]
    ends = [line - 1 for _, line in found[1:]] + [SOURCE.count("\n") + 1]
    return [(title, start, end) for (title, start), end in zip(found, ends)]


def section_of(line: int) -> str:
    return next((t for t, a, b in sections() if a <= line <= b), "preamble")


def sub_sections(title: str):
    """[(sub-title, first line, last line)] of the '# -- ...' sub-banners inside a section."""
    _, a, b = next(s for s in sections() if s[0] == title)
    found = [(m.group(1), SOURCE[:m.start()].count("\n") + 1) for m in SUB_BANNER.finditer(SOURCE)]
    found = [(t, line) for t, line in found if a <= line <= b]
    ends = [line - 1 for _, line in found[1:]] + [b]
    return [(t, start, end) for (t, start), end in zip(found, ends)]


def contents():
    """The table of contents of the module docstring: [(section, [sub-sections])]."""
    doc = ast.get_docstring(TREE)
    block = doc[doc.index("Contents."):]
    out = []
    for line in block.splitlines()[1:]:
        if line.startswith("        - "):
            out[-1][1].append(re.split(r"\s{2,}", line[10:].strip())[0])
        elif line.startswith("    ") and line.strip():
            out.append((re.split(r"\s{2,}", line.strip())[0], []))
    return out


def top_level():
    """{name: (node, section)} of the module's top-level functions, classes and assignments."""
    out = {}
    for node in TREE.body:
        names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                 [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])
        for n in names:
            out[n] = (node, section_of(node.lineno))
    return out


def test_the_table_of_contents_matches_the_banners():
    toc = contents()
    assert [t for t, _ in toc] == [t for t, _, _ in sections()]
    for title, subs in toc:
        assert subs == [t for t, _, _ in sub_sections(title)], title


def test_long_sections_have_sub_banners():
    for title, a, b in sections():
        if b - a > 300 and not title.startswith("Appendix: the built-in"):
            assert sub_sections(title), f"{title}: {b - a} lines without sub-banners"


def test_each_section_uses_only_the_sections_above_it():
    defs = top_level()
    order = [t for t, _, _ in sections()]
    rank = {t: i for i, t in enumerate(order)}
    late = []
    for name, (node, sec) in defs.items():
        if sec == "preamble":
            continue
        local = {a.arg for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.Lambda))
                 for a in n.args.args + n.args.kwonlyargs} | {
            n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                and n.id in defs and n.id != name and n.id not in local}
        for u in used:
            u_sec = defs[u][1]
            if u_sec in APPENDICES:
                continue
            if rank.get(u_sec, -1) > rank.get(sec, -1):
                late.append(f"{name} ({sec}) uses {u} ({u_sec})")
    assert not late, "\n".join(sorted(late))


def test_no_function_is_longer_than_80_lines():
    """A smell detector, not a target: one block of straight lines under comments, as nanoGPT's loop is,
    reads better than helpers called once each; past 80 lines a function usually does several jobs."""
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(TREE)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_the_namespace_stops_at_the_parser_and_the_job_builders():
    allowed = [(a, b) for t, a, b in sub_sections("Command line")
               if t.startswith(("the parser", "typed jobs", "from the flags"))]
    takes_args = [n for n in ast.walk(TREE) if isinstance(n, ast.FunctionDef)
                  and any(a.arg == "args" for a in n.args.args + n.args.kwonlyargs)]
    outside = [f"{n.name} (line {n.lineno})" for n in takes_args  # a setting's `needs` reads the flags it depends on
               if not any(a <= n.lineno <= b for a, b in allowed) and n.name != "needs"]
    assert not outside, outside
    assert takes_args  # the check sees them: the parser's functions do take args
    assert "args.explicit" not in SOURCE and "args." not in SOURCE[SOURCE.index("# -- train ---"):]


def test_every_sampler_is_a_row_of_the_table():
    assert set(ddpm.SAMPLERS) == {"ddpm", "ddim", "dpm++", "heun"}
    parser = ddpm.build_parser()
    choices = next(a.choices for a in parser._actions if a.dest == "sampler")
    assert list(choices) == list(ddpm.SAMPLERS)
    # no code outside the table asks for a sampler by name
    table = SOURCE.index("SAMPLERS: Dict[str, Sampler] = {")
    code = SOURCE[:table] + SOURCE[SOURCE.index("}\n", table):]
    assert not re.findall(r"sampler\s*[!=]=\s*[\"']|[\"'](ddpm|ddim|dpm\+\+)[\"']\s*(if|else)\b", code)
    with pytest.raises(ddpm.DDPMError, match="--sampler must be one of ddpm, ddim, dpm\\+\\+, heun, got 'heun2'"):
        ddpm.SampleSpec("heun2").steps_for(1000)


@pytest.mark.parametrize("name,least", [("denoise", 2), ("ancestral_mean", 2), ("q_at", 5), ("ddpm_var", 4)])
def test_the_reverse_step_and_the_schedule_formulas_are_written_once_and_used(name, least):
    assert SOURCE.count(f"def {name}(") == 1
    uses = len(re.findall(rf"(?<![\w.]){name}\(|self\.{name}\(|d\.{name}\(", SOURCE)) - 1
    assert uses >= least, uses
    # and the formulas are not typed again elsewhere
    assert not re.search(r"math\.sqrt\(1 - ab\w*\) \* (x|eps|noise)\b", SOURCE)
    assert not re.search(r"\(1 - ab_t / ab_s\) \* \(", SOURCE[:SOURCE.index("def ddpm_var(")] +
                         SOURCE[SOURCE.index("def ddpm_var(") + 400:])


def test_functions_do_not_change_or_annotate_what_they_are_given():
    # results do not travel as attributes of functions, and are not read back with getattr
    assert not re.search(r"\bfn\.(compiled|tag)\s*=", SOURCE)
    assert not re.search(r"getattr\(\w+, \"(compiled|tag)\"", SOURCE)
    gen = next(n for n in TREE.body if isinstance(n, ast.FunctionDef) and n.name == "generate")
    assert "Optional" in ast.unparse(gen.returns)  # None on ranks other than 0
