"""Which commands `check` steps and `run:` acceptance checks may execute without asking a human.

The daemon (deciding whether to open a policy proposal) and the worker (refusing anything else)
read the same list, extended per installation by JETBOX_CHECK_ALLOWLIST and by approved policy
proposals.

The default list holds only programs that cannot be made to run code chosen by the ticket: no
interpreter, shell or launcher (`python`, `sh`, `env`, `xargs`...), and no tool that imports code
named on its command line or in a config file (`pytest` runs any test file and `-p` plugin, `mypy`
loads plugins). A check that needs one asks first (a policy proposal). Even a granted interpreter
does not run code passed inline (`python -c ...`, `perl -e ...`, `node --eval ...`, `env CMD`):
that needs a grant for inline code (`code_grant`), which only a proposal showing the code, or the
installation's own list, gives.
"""

from __future__ import annotations

import re

# Each default, and why it is safe to run on any ticket's say-so (docs/DECIDER.md lists them too).
DEFAULT_CHECK_REASONS: dict[str, str] = {
    "true": "does nothing, succeeds (a placeholder check)",
    "false": "does nothing, fails",
    "test": "file and string tests (`test -s out.txt`); runs nothing",
    "cmp": "compares two files byte by byte; runs nothing",
    "diff": "compares files or folders; runs nothing",
    "grep": "searches files for a pattern; runs nothing",
    "wc": "counts lines, words, bytes",
    "sha256sum": "hashes files or checks a list of hashes (`sha256sum -c`)",
    "ruff": "lints Python source without importing or running it",
}
DEFAULT_CHECK_BINARIES: frozenset[str] = frozenset(DEFAULT_CHECK_REASONS)

CODE_SUFFIX = ":code"

# Interpreters by family (a version suffix is ignored: python3.11, perl5.36, node18): the short
# option letters and the long options that pass code inline. Any argument counts, not only those
# before the script: telling a script's own `-c` from the interpreter's needs each program's full
# option grammar, and a false alarm only costs a proposal that shows the command.
_FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "python": ("c", frozenset()),
    "pypy": ("c", frozenset()),
    "perl": ("eEmM", frozenset()),  # -M'Foo;system(...)' is code too
    "ruby": ("eEr", frozenset()),
    "node": ("epr", frozenset({"--eval", "--print", "--require", "--import", "--loader", "--experimental-loader"})),
    "nodejs": ("epr", frozenset({"--eval", "--print", "--require", "--import", "--loader", "--experimental-loader"})),
    "bun": ("epr", frozenset({"--eval", "--print", "--preload"})),
    "deno": ("", frozenset({"eval", "--eval"})),
    "lua": ("el", frozenset()),
    "luajit": ("el", frozenset()),
    "php": ("rBRE", frozenset()),
    "rscript": ("e", frozenset()),
    "julia": ("eEL", frozenset({"--eval", "--print", "--load"})),
    "sh": ("c", frozenset()),
    "bash": ("c", frozenset({"--rcfile", "--init-file"})),
    "dash": ("c", frozenset()),
    "zsh": ("c", frozenset()),
    "ksh": ("c", frozenset()),
    "mksh": ("c", frozenset()),
    "csh": ("c", frozenset()),
    "tcsh": ("c", frozenset()),
    "fish": ("cC", frozenset({"--command", "--init-command"})),
    "make": ("E", frozenset({"--eval"})),
    "awk": ("e", frozenset({"--source"})),  # and the program operand, below
    "gawk": ("e", frozenset({"--source"})),
    "mawk": ("", frozenset()),
    "nawk": ("", frozenset()),
    "sed": ("e", frozenset({"--expression"})),
}
# Options after which the rest of a short-option cluster is that option's argument (`-Wignore::...`).
_ARG_LETTERS: dict[str, str] = {"python": "XWm", "pypy": "XWm", "perl": "IxCdD", "ruby": "IxCK"}
# Programs whose program text is the first operand (awk '{...}', sed 's/x/y/e') unless read from a file.
_SCRIPT_OPERAND = frozenset({"awk", "gawk", "mawk", "nawk", "sed"})
# Programs that run another command: the command is what they would smuggle past the allowlist.
_LAUNCHERS = frozenset(
    {"env", "xargs", "timeout", "nice", "nohup", "stdbuf", "setsid", "chroot", "unshare", "sudo", "su", "doas",
     "runuser", "setpriv", "flock", "ionice", "chrt", "taskset", "time", "watch", "script", "strace", "ltrace",
     "gdb", "nsenter", "systemd-run", "parallel", "busybox", "exec", "command", "builtin"}
)
_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir", "-fprint", "-fprintf", "-fls", "-delete"})
_VERSION = re.compile(r"[\d.]+$")


def binary_of(argv: list[str]) -> str:
    """The program an argv runs (its first word)."""
    return argv[0] if argv else ""


def code_grant(binary: str) -> str:
    """The allowlist entry that also lets `binary` run inline code (`python:code`)."""
    return binary + CODE_SUFFIX


def family_of(binary: str) -> str:
    """`python3.11` -> `python`, `Rscript` -> `rscript`."""
    return _VERSION.sub("", binary).lower() or binary.lower()


def inline_code(argv: list[str]) -> str | None:
    """The argument by which `argv` passes code inline (`-c`, `-e`, `--eval`, the command a
    launcher would run, an awk program), or None when it runs only files or no code at all."""
    if not argv:
        return None
    family, args = family_of(argv[0]), argv[1:]
    if family == "find":
        return next((a for a in args if a in _FIND_EXEC), None)
    if family in _LAUNCHERS:
        return next((a for a in args if not a.startswith("-")), None)
    if family not in _FAMILIES:
        return None
    letters, longs = _FAMILIES[family]
    for arg in args:
        if arg in longs or arg.split("=", 1)[0] in longs:
            return arg
        if arg.startswith("-") and not arg.startswith("--"):
            for ch in arg[1:]:
                if ch in letters:
                    return arg
                if ch in _ARG_LETTERS.get(family, ""):
                    break
    if family in _SCRIPT_OPERAND and not any(a == "-f" or a.startswith(("-f", "--file")) for a in args):
        return next((a for a in args if not a.startswith("-")), "")  # no program file: the program is inline
    return None
