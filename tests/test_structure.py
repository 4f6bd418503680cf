"""ddpm.py reads top to bottom: sections under banners in the order data flows, each using only the
sections above it (the command line calls everything; the demo-face appendix at the end is data
that the data section calls), and no function longer than 60 lines except build_parser."""
import ast
import re
from pathlib import Path

import pytest

SOURCE = (Path(__file__).resolve().parent.parent / "ddpm.py").read_text(encoding="utf-8")
BANNER = re.compile(r"^# -{20,}\n# (.+)\n# -{20,}$", re.M)
ORDER = ["Helpers", "Model configuration", "Noise schedule", "UNet blocks", "UNet", "Gaussian diffusion and samplers",
         "Data", "Checkpoints", "Runtime: device, precision, processes, compile", "Sampling and pictures", "Training",
         "Evaluation", "Command line", "Appendix: the built-in demo faces"]


def sections():
    """[(title, first line, last line)] of the banners, in file order."""
    found = [(m.group(1), SOURCE[:m.start()].count("\n") + 1) for m in BANNER.finditer(SOURCE)]
    ends = [line - 1 for _, line in found[1:]] + [SOURCE.count("\n") + 1]
    return [(title, start, end) for (title, start), end in zip(found, ends)]


def section_of(line: int) -> str:
    return next((t for t, a, b in sections() if a <= line <= b), "preamble")


def top_level():
    """{name: (node, section)} of the module's top-level functions, classes and assignments."""
    out = {}
    for node in ast.parse(SOURCE).body:
        names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                 [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])
        for n in names:
            out[n] = (node, section_of(node.lineno))
    return out


def test_the_sections_come_in_data_flow_order():
    assert [t for t, _, _ in sections()] == ORDER


def test_each_section_uses_only_the_sections_above_it():
    defs = top_level()
    rank = {t: i for i, t in enumerate(ORDER)}
    late = []
    for name, (node, sec) in defs.items():
        if sec in ("Command line", "preamble"):
            continue
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                and n.id in defs and n.id != name}
        for u in used:
            u_sec = defs[u][1]
            if u_sec == "Appendix: the built-in demo faces" and sec in ("Data", u_sec):
                continue
            if rank.get(u_sec, -1) > rank.get(sec, -1):
                late.append(f"{name} ({sec}) uses {u} ({u_sec})")
    assert not late, "\n".join(sorted(late))


def test_no_function_is_longer_than_60_lines():
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(ast.parse(SOURCE))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "build_parser"
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


@pytest.mark.parametrize("name", ["predict_x0", "ancestral_mean"])
def test_the_reverse_step_is_written_once_and_used(name):
    assert SOURCE.count(f"def {name}(") == 1
    assert SOURCE.count(f"self.{name}(") >= 1
