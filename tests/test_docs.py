"""The README and docs/ say only what is true of the code: every relative link (file and
`#anchor`) resolves, every command line written in them is one the CLI accepts, and every
module or file of the project they name exists.

Checked, in fenced code blocks and inline code:
- `python -m pipeline [--params F] COMMAND [SUB] ... --flag` and `structure-align COMMAND
  --flag`: the command (and sub-command, e.g. `store verify`) exists and each `--flag`,
  `--no-flag` or `-k` is one of its options, against the typer app's click command;
- inline code that starts with a command name and holds an option (`align --layers auto`) is
  checked the same way;
- project paths (`stages/select.py`, `tests/test_model.py::test_x`) and modules
  (`stages.losses`, `store.io.atomic_file`) exist.
No subprocess runs: the click command is read in this process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

import pipeline.commands  # noqa: F401  (registers the commands)
from pipeline.app import app

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("python -m pipeline", "structure-align")
PACKAGES = ("pipeline", "stages", "store", "benchmarks", "tests")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
STOP_TOKENS = {"#", "&&", "||", ";", "|", ">", ">>", "2>&1"}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---- splitting a Markdown file into prose, code blocks and inline code ----------------------


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with code spans kept, code blocks as text)."""
    prose: list[str] = []
    blocks: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    if block is not None:
        blocks.append("\n".join(block))
    return prose, blocks


def inline_code(prose: Iterable[str]) -> list[str]:
    """Inline code spans; a span may run over a line break, as Markdown allows."""
    text = "\n".join(prose)
    spans = []
    for paragraph in re.split(r"\n\s*\n", text):
        spans += [m.group(2).replace("\n", " ").strip() for m in INLINE.finditer(paragraph)]
    return spans


# ---- command lines --------------------------------------------------------------------------


def cli() -> Any:
    """The click command of the app (typer vendors its own click: types are checked by duck)."""
    return typer.main.get_command(app)


def is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option"


def is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def accepted(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if is_option(param):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def takes_value(command: Any, flag: str) -> bool:
    for param in command.params:
        if is_option(param) and flag in param.opts:
            return not param.is_flag
    return False


def clean(token: str) -> str:
    return token.strip("[](){}\"',;")


def is_placeholder(word: str) -> bool:
    return not re.fullmatch(r"[a-z][a-z0-9-]*", word)


def check_command_line(tokens: list[str], where: str, root: Any | None = None) -> list:
    """Errors of one command line, `tokens` being what follows `python -m pipeline`."""
    root = root or cli()
    errors = []
    command: Any = root
    path = []
    i = 0
    # options of the root (`--params FILE`), then the command, then sub-commands
    while i < len(tokens):
        token = clean(tokens[i])
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            if flag not in accepted(command):
                errors.append(f"{where}: `{' '.join(path) or 'pipeline'}` has no option {flag}")
            if "=" not in token and takes_value(command, flag):
                i += 1
            i += 1
            continue
        if not is_group(command):
            break
        if is_placeholder(token):
            return errors  # `python -m pipeline <command>`, `COMMAND`, `$CMD`: nothing to check
        sub = command.commands.get(token)
        if sub is None:
            errors.append(f"{where}: no command `{' '.join([*path, token])}`")
            return errors
        command, path = sub, [*path, token]
        i += 1
    if command is root:
        return errors
    known = accepted(command)
    for raw in tokens[i:]:
        token = clean(raw)
        if token in STOP_TOKENS or raw.startswith("#"):
            break
        if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
            flag = token.split("=", 1)[0]
            if flag not in known:
                errors.append(f"{where}: `{' '.join(path)}` has no option {flag}")
    return errors


def command_lines(code: str) -> list[list[str]]:
    """The token lists after each `python -m pipeline` / `structure-align` in a code text
    (backslash continuations joined, each command up to a comment, `&&`, `;` or a pipe)."""
    code = re.sub(r"\\\n", " ", code)
    found = []
    for line in code.splitlines():
        for prefix in PREFIXES:
            for match in re.finditer(rf"(?<![\w./-]){re.escape(prefix)}(?![\w.-])", line):
                tokens = []
                for token in line[match.end() :].split():
                    if token in STOP_TOKENS or token.startswith("#"):
                        break
                    tokens.append(token)
                found.append(tokens)
    return found


def check_cli_text(blocks: list[str], spans: list[str], where: str) -> list[str]:
    root = cli()
    errors = []
    for code in [*blocks, *spans]:
        for tokens in command_lines(code):
            errors += check_command_line(tokens, where, root)
    for span in spans:
        words = span.split()
        if (
            words
            and words[0] in root.commands
            and not any(span.startswith(p) for p in PREFIXES)
            and any(w.startswith("-") for w in words[1:])
        ):
            errors += check_command_line(words, where, root)
    return errors


def benchmark_flags(name: str, root: Path = ROOT) -> set[str] | None:
    """The options of `python -m benchmarks.NAME`, read from its argparse calls (not imported:
    a benchmark imports torch and friends); None when there is no such script."""
    path = root / "benchmarks" / f"{name}.py"
    if not path.is_file():
        return None
    source = path.read_text(encoding="utf-8")
    return {"--help", "-h"} | set(re.findall(r"add_argument\(\s*\"(--?[\w-]+)\"", source))


def check_benchmarks(codes: list[str], where: str, root: Path = ROOT) -> list[str]:
    """`python -m benchmarks.NAME --flag`: the script exists and has the option."""
    errors = []
    for code in codes:
        code = re.sub(r"\\\n", " ", code)
        for match in re.finditer(r"python -m benchmarks\.(\w+)([^\n`]*)", code):
            name, rest = match.groups()
            flags = benchmark_flags(name, root)
            if flags is None:
                errors.append(f"{where}: no benchmark `benchmarks/{name}.py`")
                continue
            for raw in rest.split():
                token = clean(raw)
                if token in STOP_TOKENS or raw.startswith("#"):
                    break
                flag = token.split("=", 1)[0]
                if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in flags:
                    errors.append(f"{where}: `benchmarks.{name}` has no option {flag}")
    return errors


def check_python(text: str, where: str) -> list[str]:
    """Every ```python block compiles (it is not run: it needs a trained run and images)."""
    errors = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        try:
            compile(match.group(1), where, "exec")
        except SyntaxError as err:
            errors.append(f"{where}: a python block does not compile: {err.msg}")
    return errors


# ---- links ----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def check_links(path: Path, root: Path = ROOT) -> list[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    text = INLINE.sub("", "\n".join(prose))
    errors = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: link {target}"
        if not dest.exists():
            errors.append(f"{where}: no such file")
        elif root.resolve() not in [dest, *dest.parents]:
            errors.append(f"{where}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{where}: no heading with that anchor in {dest.name}")
    return errors


# ---- project files and modules named in the text ---------------------------------------------


def check_names(spans: list[str], where: str, root: Path = ROOT) -> list[str]:
    errors = []
    pkgs = "|".join(PACKAGES)
    for span in spans:
        for name in re.findall(rf"(?<![\w./-])((?:{pkgs})/[\w./-]*\w)", span):
            name = name.split("::")[0]
            if "*" not in name and not (root / name).exists():
                errors.append(f"{where}: `{name}` does not exist")
        for name in re.findall(rf"(?<![\w./-])((?:{pkgs})\.[a-z_]\w*)", span):
            parts = name.split(".")
            module = root.joinpath(*parts[:2])
            if not (module.with_suffix(".py").exists() or (module / "__init__.py").exists()):
                errors.append(f"{where}: module `{'.'.join(parts[:2])}` does not exist")
    return errors


def file_errors(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text(encoding="utf-8")
    prose, blocks = split_markdown(text)
    spans = inline_code(prose)
    where = str(path.relative_to(root))
    return (
        check_links(path, root)
        + check_cli_text(blocks, spans, where)
        + check_names(spans + blocks, where, root)
        + check_benchmarks(blocks + spans, where, root)
        + check_python(text, where)
    )


# ---- the tests ------------------------------------------------------------------------------


def test_docs_exist_and_readme_is_a_front_door():
    files = doc_files()
    assert (ROOT / "README.md").exists() and len(files) > 5
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md is {lines} lines; the reference belongs in docs/"


def test_links_commands_and_names_in_the_docs_are_real():
    errors = [e for path in doc_files() for e in file_errors(path)]
    assert not errors, "\n".join(errors)


def test_readme_set_up_is_two_commands_and_ci_runs_the_second():
    """The front door's promise: one command installs and runs the demo, one runs the tests,
    and CI (`.ci/run`) runs exactly that test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up", 1)[1]
    _, blocks = split_markdown(section)
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert "pip install -e" in commands[0] and commands[0].endswith("dvc repro")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[1] in ci, f"{commands[1]!r} is not what .ci/run runs"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in doc_files()[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"not linked from README.md: {missing}"


def test_the_checkers_catch_what_they_are_for(tmp_path):
    """A made-up flag, command, link, anchor and module are each caught; real ones pass."""
    good = [
        "python -m pipeline align --layers auto --no-progress --lambda 0 --out runs/x",
        "python -m pipeline --params my.yaml align --head mlp [--n-pairs 500]",
        "python -m pipeline store verify --store features.zarr --repair",
        "python -m pipeline extract --model dinov2 --no-skip-bad \\\n    --batch-size 64  # --nope",
        "structure-align search --index runs/index -k 10 'a seven'",
        "python -m pipeline <command> --whatever",
    ]
    for code in good:
        assert check_cli_text([code], [], "good") == [], code
    assert check_cli_text([], ["select --metric cka --calibrate 100"], "good") == []
    bad = {
        "python -m pipeline align --layers auto --made-up-flag 3": "--made-up-flag",
        "python -m pipeline store verify --no-such": "--no-such",
        "structure-align extract --no-batch-size": "--no-batch-size",
        "python -m pipeline --nope align": "--nope",
        "python -m pipeline alignn --lambda 0": "alignn",
        "python -m pipeline store lsx": "store lsx",
        "x && python -m pipeline evaluate --run r \\\n  --made-up": "--made-up",
    }
    for code, what in bad.items():
        errors = check_cli_text([code], [], "bad")
        assert len(errors) == 1 and what in errors[0], (code, errors)
    assert check_cli_text([], ["align --lambda 0 --made-up"], "bad")
    assert (
        check_benchmarks(["python -m benchmarks.select --n 500 --metrics all [--calibrate K]"], "x")
        == []
    )
    assert check_benchmarks(["python -m benchmarks.select --made-up 1"], "x") == [
        "x: `benchmarks.select` has no option --made-up"
    ]
    assert check_python("```python\nx = f(1)\n```\n", "x") == []
    assert check_python("```python\nx = f(1\n```\n", "x")
    assert check_benchmarks(["python -m benchmarks.nope"], "x") == [
        "x: no benchmark `benchmarks/nope.py`"
    ]

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Use the `model`, fast\n\n[ok](docs/a.md#a-page) [ok](#use-the-model-fast)\n"
        "[bad](docs/missing.md) [bad](docs/a.md#no-such) ![bad](img.png) [web](https://x.y/z)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
        "`stages/losses.py` `stages.losses.clip_loss` `stages/nope.py` `store.nope`\n"
    )
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n[up](../README.md#top)\n")
    errors = [e for p in doc_files(tmp_path) for e in file_errors(p, tmp_path)]
    # the real module names are this repository's: nope.py and store.nope are missing here
    assert sorted(errors) == sorted(
        [
            "README.md: link docs/missing.md: no such file",
            "README.md: link docs/a.md#no-such: no heading with that anchor in a.md",
            "README.md: link img.png: no such file",
            "README.md: `stages/losses.py` does not exist",
            "README.md: `stages/nope.py` does not exist",
            "README.md: module `stages.losses` does not exist",
            "README.md: module `store.nope` does not exist",
        ]
    ), errors
    assert check_names(["`stages/losses.py` `stages.losses.clip_loss`"], "x") == []
    assert check_names(["stages/nope.py", "store.nope"], "x") == [
        "x: `stages/nope.py` does not exist",
        "x: module `store.nope` does not exist",
    ]
