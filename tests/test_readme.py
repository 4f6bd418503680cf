"""The README's flag tables are the parser's own: every flag, its default and its help, and the
--demo preset. After changing a flag, rewrite them with `python tests/test_readme.py --update`."""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402

README = ROOT / "README.md"
START, END = "## All flags\n", "\n## What was fixed from the original script"


def _default(action) -> str:
    d = action.default
    if isinstance(action, argparse.BooleanOptionalAction):
        return "–" if d is None else "on" if d else "off"
    if isinstance(action, argparse._StoreFalseAction):  # --no-X: the flag is off unless typed
        return "off"
    if d is None or d is False or d == ():
        return "off" if d is False else "–"
    if isinstance(d, (list, tuple)):
        return " ".join(("t" if v else "f") if isinstance(v, bool) else str(v) for v in d)
    return str(d)


def flag_tables() -> str:
    """The section, from build_parser() and DEMO_PRESET."""
    out = [START]
    for group in ddpm.build_parser()._action_groups[2:]:
        out.append(f"**{group.title}**\n\n| flag | default | meaning |\n|---|---|---|")
        for a in group._group_actions:
            names = " / ".join(f"`{o}`" for o in a.option_strings if o.startswith("--"))
            choices = f" ({', '.join(map(str, a.choices))})" if a.choices else ""
            text = (a.help or "").replace("%%", "%").replace("|", "\\|")
            out.append(f"| {names} | {_default(a)} | {text}{choices} |")
        out.append("")
    flags = {s.name: s.flag for s in ddpm.DECLARED}
    preset = ", ".join(f"`{flags[k]} {_default(argparse.Namespace(default=v))}`" for k, v in ddpm.DEMO_PRESET.items())
    out.append(f"`--demo` changes these defaults (flags you type still win): {preset}.\n")
    return "\n".join(out)


def test_the_readme_lists_every_flag_as_the_parser_does():
    text = README.read_text(encoding="utf-8")
    section = text[text.index(START):text.index(END)]
    assert section == flag_tables(), "run `python tests/test_readme.py --update`"


if __name__ == "__main__" and "--update" in sys.argv:
    text = README.read_text(encoding="utf-8")
    README.write_text(text[:text.index(START)] + flag_tables() + text[text.index(END):], encoding="utf-8")
