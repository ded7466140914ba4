"""The commands the README and docs/ show are runnable: every `python scripts/<name>.py` line of a ```bash block uses
only options its script's parser defines, the script exists and every `--config configs/...yaml` exists; every
relative link (and its #anchor) resolves; and no script shadows a standard-library module, which would break
`python scripts/<name>.py` itself (the script's folder is first on sys.path).

The options come from each script's own `--help`, run once per script; all of them run in one subprocess (torch and
diffusers are imported once there), so the whole file takes seconds, not a torch import per script.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# scripts whose command line is not an argparse parser, and why their flags are not checked
NOT_ARGPARSE = {"dev.py": "a dispatcher: `demo` / `test` and the arguments it passes on to the demo or to pytest"}
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>|/path/to/")
SCRIPT = re.compile(r"^(?:\./)?scripts/([\w-]+\.py)$")
LAUNCHERS = {"python", "python3", "accelerate"}
SHELL_OPS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "(", ")"}

# Run inside one fresh interpreter: each script as __main__ with argv [script, --help]; its help text (or the error
# that stopped it) comes back as JSON. The repository root goes first on sys.path, never scripts/ (scripts/distill.py
# is named like the package).
_COLLECT = r"""
import contextlib, io, json, runpy, sys, traceback
root, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, root)
out = {}
for name in names:
    buf, argv = io.StringIO(), sys.argv
    sys.argv = [f"scripts/{name}", "--help"]
    code, error = None, ""
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(f"{root}/scripts/{name}", run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        error = traceback.format_exc(limit=3)
    finally:
        sys.argv = argv
    out[name] = {"code": code, "help": buf.getvalue(), "error": error}
print("\n@@HELP@@" + json.dumps(out))
"""


def bash_commands(path: Path):
    """(line number, command text) of every logical line of the file's ```bash blocks: continuation lines joined,
    comment lines dropped."""
    lines = path.read_text().split("\n")
    in_bash, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() in ("bash", "sh", "shell", "console")
            pending = ""
            continue
        if not in_bash or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        if not pending:
            start = number
        pending += (" " if pending else "") + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            yield start, pending
            pending = ""


def script_calls(command: str):
    """(script name, tokens after it) for each `python scripts/x.py ...` / `accelerate launch ... scripts/x.py ...`
    in a command line (shell operators end a call; `# ...` ends the line)."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: say so through the flag check
        tokens = command.split()
    calls, launched, current = [], False, None
    for token in tokens:
        if token in SHELL_OPS:
            launched, current = False, None
            continue
        if current is not None:
            current[1].append(token)
        elif Path(token).name in LAUNCHERS:
            launched = True
        elif launched and (m := SCRIPT.match(token)):
            current = (m.group(1), [])
            calls.append(current)
    return calls


def flags_of(tokens: list[str]) -> list[str]:
    """The --options among a call's tokens, `[--opt]` (optional, as usage lines write it) and `--opt=value` included."""
    flags = []
    for token in tokens:
        token = token.lstrip("[").rstrip("]")
        if token.startswith("--") and len(token) > 2 and token[2] != "-":
            flags.append(token.split("=", 1)[0])
    return flags


def config_paths(tokens: list[str]) -> list[str]:
    """Values of --config / --config_file (separate or after `=`) that name a file under configs/."""
    out = []
    for i, token in enumerate(tokens):
        if token in ("--config", "--config_file") and i + 1 < len(tokens):
            out.append(tokens[i + 1])
        elif token.startswith(("--config=", "--config_file=")):
            out.append(token.split("=", 1)[1])
    return [p for p in out if p.startswith("configs/")]


def parse_options(help_text: str) -> set[str]:
    """The --options an argparse help text defines: its usage block and the invocations of its argument sections
    (lines indented two spaces that start with a dash), never the description's prose."""
    lines = help_text.split("\n")
    options, in_usage, in_args = set(), False, False
    for line in lines:
        if line.startswith("usage:"):
            in_usage = True
        elif in_usage and not line.strip():
            in_usage = False
        if re.match(r"^[A-Za-z][\w ]*:$", line):  # "options:", "positional arguments:", argument group titles
            in_args = True
        if in_usage:
            options.update(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", line))
        elif in_args and re.match(r"^  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.update(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", invocation))
    return options


@lru_cache(maxsize=None)
def script_help(names: tuple[str, ...]) -> dict[str, dict]:
    """Each script's --help output (one subprocess for all of them; the result cached per set of names)."""
    proc = subprocess.run([sys.executable, "-c", _COLLECT, str(ROOT), *names], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert "@@HELP@@" in proc.stdout, f"the --help collector failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.rsplit("@@HELP@@", 1)[1])


def documented_calls():
    """(file:line, script, tokens after the script) of every script call in the README and docs/, placeholders
    skipped."""
    for path in DOCS:
        for number, command in bash_commands(path):
            if PLACEHOLDER.search(command):
                continue
            for name, tokens in script_calls(command):
                yield f"{path.relative_to(ROOT)}:{number}", name, tokens


def test_documented_commands_use_existing_scripts_options_and_configs():
    calls = list(documented_calls())
    assert len(calls) > 50, "the extraction found almost no commands: is the README still read?"
    names = sorted({name for _, name, _ in calls if (ROOT / "scripts" / name).is_file() and name not in NOT_ARGPARSE})
    helps = script_help(tuple(names))
    options = {}
    failures = []
    for name in names:
        h = helps[name]
        if h["error"] or h["code"] not in (0, None) or "usage:" not in h["help"]:
            failures.append(f"scripts/{name}: `--help` did not print argparse help "
                            f"(exit {h['code']}): {(h['error'] or h['help'])[-400:]}")
        options[name] = parse_options(h["help"])
    for where, name, tokens in calls:
        if not (ROOT / "scripts" / name).is_file():
            failures.append(f"{where}: scripts/{name} does not exist")
            continue
        for config in config_paths(tokens):
            if not (ROOT / config).is_file():
                failures.append(f"{where}: {config} does not exist")
        if name in NOT_ARGPARSE or not options.get(name):
            continue
        for flag in flags_of(tokens):
            if flag not in options[name]:
                failures.append(f"{where}: scripts/{name} has no option {flag}")
    assert not failures, "\n".join(failures)


def test_documented_run_configs_and_overrides_validate():
    """Each documented `scripts/distill.py` / `scripts/progressive.py` call: its --config with its --set overrides
    passes the run-config validation (keys, types, allowed values) the script does before any work. Overrides
    elided as `key=...` are left out."""
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config

    failures, checked = [], 0
    for where, name, tokens in documented_calls():
        if name not in ("distill.py", "progressive.py"):
            continue
        config, sets, mode = None, [], None
        for token in tokens:
            if token.startswith("--"):
                mode = token if token in ("--config", "--set") else None
            elif mode == "--config":
                config, mode = token, None
            elif mode == "--set" and not token.endswith("=..."):
                sets.append(token)
        try:
            load_run_config(ROOT / config if config else None, parse_overrides(sets))
            checked += 1
        except Exception as e:  # noqa: BLE001 - report every failure with its place
            failures.append(f"{where}: scripts/{name} --config {config} --set {' '.join(sets)}: {e}")
    assert checked > 20 and not failures, "\n".join(failures)


def test_accelerate_config_files_of_documented_launches_exist():
    """`accelerate launch --config_file configs/accelerate/...` (the flags before the script) names a real file."""
    failures = []
    for path in DOCS:
        for number, command in bash_commands(path):
            if PLACEHOLDER.search(command):
                continue
            for config in re.findall(r"--config_file[ =](configs/\S+\.yaml)", command):
                if not (ROOT / config).is_file():
                    failures.append(f"{path.relative_to(ROOT)}:{number}: {config} does not exist")
    assert not failures, "\n".join(failures)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen, out, fenced = {}, set(), False
    for line in path.read_text().split("\n"):
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            out.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return frozenset(out)


def test_relative_links_and_anchors_resolve():
    failures = []
    for path in DOCS:
        text, fenced_free = path.read_text(), []
        for part in re.split(r"^```.*?^```", text, flags=re.S | re.M):  # links in code blocks are not links
            fenced_free.append(part)
        for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(fenced_free)):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                failures.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                failures.append(f"{where}: no heading with anchor #{anchor}")
    assert not failures, "\n".join(failures)


def test_no_script_shadows_a_standard_library_module():
    """`python scripts/x.py` puts scripts/ first on sys.path, so scripts/select.py would be imported as the stdlib's
    `select` by `subprocess` (and break every script that starts a subprocess, `scripts/dev.py` of the quick start
    among them)."""
    clashes = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clashes, f"scripts named like standard-library modules: {clashes}"
