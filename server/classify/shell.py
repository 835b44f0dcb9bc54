"""Shell command lines and argv lists -> facts: programs, pipes into shells, sudo, catastrophic commands.

The lexer understands enough POSIX shell to split a line into simple commands (quotes, escapes,
`;` `&&` `||` `|` `&`, newlines, redirections, `$(...)`, backticks, `<(...)`), and it looks
through wrappers (`sudo`, `env`, `nohup`, `timeout`, `xargs`, `sh -c "..."`, `eval`, `find -exec`).
What it cannot follow is a fact (`unparseable`, `inline_code`, `subshell`), never an exception.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any

from server.classify.paths import is_sensitive

SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ksh", "fish", "ash", "busybox", "csh", "tcsh"})
INTERPRETERS = frozenset({"python", "python2", "python3", "perl", "ruby", "node", "php", "lua", "Rscript", "osascript"})
DOWNLOADERS = frozenset({"curl", "wget", "fetch", "aria2c", "nc", "ncat", "netcat", "socat", "http", "httpie"})
NETWORK = DOWNLOADERS | frozenset({"ssh", "scp", "sftp", "rsync", "ftp", "telnet", "git-remote", "nmap"})
PRIVILEGE = frozenset({"sudo", "doas", "su", "pkexec", "runas"})
READ_ONLY_PROGRAMS = frozenset({
    "ls", "cat", "head", "tail", "grep", "egrep", "fgrep", "rg", "ag", "wc", "echo", "printf", "pwd", "whoami",
    "id", "date", "uname", "hostname", "ps", "df", "du", "stat", "file", "which", "type", "sort", "uniq", "cut",
    "tr", "jq", "yq", "tree", "basename", "dirname", "realpath", "readlink", "true", "false", "test", "[", "diff",
    "cmp", "md5sum", "sha256sum", "sha1sum", "uptime", "free", "nproc", "env", "printenv", "seq", "column",
    "less", "more", "nl", "od", "hexdump", "strings", "comm", "paste", "fold", "fmt", "expand", "tac", "rev",
})  # fmt: skip
GIT_READ_ONLY = frozenset({"status", "log", "diff", "show", "rev-parse", "ls-files", "blame", "describe", "shortlog"})
WRITERS = frozenset({
    "rm", "rmdir", "mv", "cp", "dd", "tee", "touch", "mkdir", "chmod", "chown", "chgrp", "ln", "truncate",
    "shred", "install", "unlink", "mkfs", "mount", "umount", "kill", "pkill", "killall", "systemctl", "service",
    "apt", "apt-get", "yum", "dnf", "pip", "npm", "crontab", "useradd", "userdel", "usermod", "passwd",
})  # fmt: skip
# Wrappers that run the rest of their argv; the value is how many leading option words take an argument.
_WRAPPER_OPTS_WITH_ARG = {
    "sudo": {"-u", "-g", "-h", "-p", "-C", "-D", "-r", "-t", "-U", "--user", "--group"},
    "doas": {"-u", "-C"},
    "env": {"-u", "-C", "-S", "--unset", "--chdir"},
    "nice": {"-n", "--adjustment"},
    "ionice": {"-c", "-n", "-p"},
    "stdbuf": {"-i", "-o", "-e"},
    "nohup": set(),
    "time": set(),
    "exec": {"-a"},
    "command": set(),
    "builtin": set(),
    "xargs": {"-I", "-n", "-P", "-L", "-s", "-d", "-E", "-a"},
    "chroot": set(),
    "watch": {"-n", "-d"},
    "strace": {"-o", "-e", "-p"},
    "flock": set(),
    "setsid": set(),
    "unbuffer": set(),
    "timeout": {"-s", "-k", "--signal", "--kill-after"},
    "pkexec": {"--user"},
}
# Wrappers with positional arguments before the wrapped command (`timeout 10 cmd`, `chroot /srv cmd`).
_WRAPPER_POSITIONALS = {"timeout": 1, "chroot": 1, "flock": 1}
_ROOTISH = frozenset({
    "/", "/*", "~", "~/", "~/*", "$HOME", "${HOME}", "$HOME/", "/home", "/etc", "/usr", "/var",
    "/boot", "/bin", "/sbin", "/lib", "/lib64", "/opt", "/root", "/srv", "/dev", "*", ".", "./*", "..",
})  # fmt: skip
_INLINE_CODE_FLAGS = {
    "python": "-c",
    "perl": "-e",
    "ruby": "-e",
    "node": "-e",
    "php": "-r",
    "lua": "-e",
    "osascript": "-e",
}
_OPERATORS = ("&&", "||", ";;", "|&", ";", "|", "&", "(", ")")
_REDIRECTS = ("<<<", "<<-", "<<", ">>", "&>>", "&>", ">&", "<&", ">|", "<>", ">", "<")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FORK_BOMB = re.compile(r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:")
_MAX_DEPTH = 8
_MAX_CHARS = 65536  # longer command lines are not lexed (a reviewer could not read them either)
_ROUGH_TOKENS = re.compile(r"&&|\|\||[;|&\n]|[^\s;|&]+")
_PLAIN = re.compile(r"[^\s'\"\\`$<>&|;()]+")
_MAX_COMMANDS = 200


class ShellSyntaxError(ValueError):
    pass


@dataclass
class _Lexed:
    tokens: list[tuple[str, str]] = field(default_factory=list)  # ("word"|"op"|"redir", text)
    substitutions: list[str] = field(default_factory=list)  # scripts inside $(...), `...`, <(...)


def empty() -> dict[str, Any]:
    return {
        "present": False,
        "programs": [],
        "commands": [],
        "sudo": False,
        "pipes_to_shell": False,
        "remote_code": False,
        "inline_code": False,
        "subshell": False,
        "recursive_delete": False,
        "dangerous": [],
        "network": False,
        "writes": False,
        "sets_env": False,  # NAME=value before a program (or through env): PAGER, GIT_EXTERNAL_DIFF ... run code
        "redirects": [],
        "sensitive": False,
        "read_only": False,
        "unparseable": False,
        "errors": [],
    }


def classify_shell(values: list[str | list[str]]) -> dict[str, Any]:
    """Facts for command lines (strings, parsed as shell) and argv lists (not parsed, but unwrapped)."""
    facts = empty()
    for value in values:
        facts["present"] = True
        if isinstance(value, str):
            _script(value, facts, depth=0)
        else:
            _pipeline([[str(a) for a in value]], facts, depth=0, fetched=[])
    facts["programs"] = list(dict.fromkeys(facts["programs"]))
    facts["dangerous"] = list(dict.fromkeys(facts["dangerous"]))
    if len(facts["commands"]) > _MAX_COMMANDS:
        facts["unparseable"] = True  # too long to show a reviewer faithfully
        facts["errors"].append(f"more than {_MAX_COMMANDS} commands")
        facts["commands"] = facts["commands"][:_MAX_COMMANDS]
    words = [w for argv in facts["commands"] for w in argv[1:]] + facts["redirects"]
    facts["sensitive"] = any(_sensitive_word(w) for w in words)
    facts["read_only"] = (
        bool(facts["programs"])
        and not facts["unparseable"]
        and not facts["writes"]
        and not facts["sudo"]
        and not facts["subshell"]
        and not facts["inline_code"]
        and not facts["dangerous"]
        and not facts["network"]
        and not facts["sets_env"]
        and all(_read_only_command(argv) for argv in facts["commands"])
    )
    return facts


def _script(text: str, facts: dict[str, Any], depth: int) -> None:
    if depth > _MAX_DEPTH:
        facts["unparseable"] = True
        facts["errors"].append("nesting too deep")
        return
    if _FORK_BOMB.search(text):
        facts["dangerous"].append("fork-bomb")
    try:
        if len(text) > _MAX_CHARS:
            raise ShellSyntaxError(f"command longer than {_MAX_CHARS} characters is not analysed")
        lexed = lex(text)
    except ShellSyntaxError as e:
        facts["unparseable"] = True
        facts["errors"].append(str(e))
        # Still look at the words we can see: an unterminated quote must not hide `rm -rf /`.
        lexed = _Lexed(
            tokens=[("op" if w in _OPERATORS or w == "\n" else "word", w) for w in _ROUGH_TOKENS.findall(text)]
        )
    fetched: list[str] = []  # substitutions whose output comes from the network
    for sub in lexed.substitutions:
        facts["subshell"] = True
        before = len(facts["programs"])
        _script(sub, facts, depth + 1)
        if any(p in DOWNLOADERS for p in facts["programs"][before:]):
            fetched.append(sub)
    pipeline: list[list[str]] = []
    argv: list[str] = []
    pending_redirect: str | None = None
    for kind, text_ in lexed.tokens:
        if kind == "redir":
            pending_redirect = text_
            continue
        if pending_redirect is not None:
            if pending_redirect.startswith(">") or pending_redirect.startswith("&>") or pending_redirect == "<>":
                if not text_.startswith("&") and text_ not in {"/dev/null", "/dev/stdout", "/dev/stderr"}:
                    facts["writes"] = True
                    facts["redirects"].append(text_)
                    if re.match(r"^/dev/(sd|nvme|hd|xvd|vd|disk|mmcblk)", text_):
                        facts["dangerous"].append("write-block-device")
            pending_redirect = None
            continue
        if kind == "op":
            if argv:
                pipeline.append(argv)
                argv = []
            if text_ not in {"|", "|&"}:
                _pipeline(pipeline, facts, depth, fetched)
                pipeline = []
            continue
        argv.append(text_)
    if argv:
        pipeline.append(argv)
    _pipeline(pipeline, facts, depth, fetched)


def _pipeline(pipeline: list[list[str]], facts: dict[str, Any], depth: int, fetched: list[str]) -> None:
    seen_downloader = False
    for position, raw in enumerate(pipeline):
        argv = _unwrap(raw, facts, depth)
        if not argv:
            continue
        program = os.path.basename(argv[0])
        facts["programs"].append(program)
        facts["commands"].append(argv)
        interpreter = program in SHELLS or _base_interpreter(program) is not None
        if position > 0 and interpreter and not _has_script_arg(program, argv):
            facts["pipes_to_shell"] = True
            if seen_downloader:
                facts["remote_code"] = True
        runs_fetched = any(f in word for f in fetched for word in argv) if fetched else False
        if runs_fetched and (interpreter or program == "eval" or any(f in argv[0] for f in fetched)):
            facts["remote_code"] = True
        if program in DOWNLOADERS:
            seen_downloader = True
        if program in NETWORK:
            facts["network"] = True
        if program in WRITERS:
            facts["writes"] = True
        _dangerous(program, argv, facts)


def _unwrap(argv: list[str], facts: dict[str, Any], depth: int) -> list[str]:
    """Strip assignments and wrappers; recurse into `sh -c`, `eval`, `su -c`, `find -exec`."""
    argv = list(argv)
    for _ in range(_MAX_DEPTH):
        while argv and _ASSIGNMENT.match(argv[0]):
            facts["sets_env"] = True
            argv.pop(0)
        if not argv:
            return []
        program = os.path.basename(argv[0])
        if program in PRIVILEGE:
            facts["sudo"] = True
            facts["programs"].append(program)
            if program == "su":
                script = _flag_value(argv, ("-c", "--command"))
                if script is not None:
                    _script(script, facts, depth + 1)
                return []
        if program in SHELLS:
            script = _flag_value(argv, ("-c",), combined=True)
            if script is not None:
                facts["programs"].append(program)
                _script(script, facts, depth + 1)
                return []
            return argv
        if program == "eval":
            facts["subshell"] = True
            _script(" ".join(argv[1:]), facts, depth + 1)
            return []
        if program == "find":
            # `{}` stands for what find finds: everything under its starting points
            starts = [w for w in itertools.takewhile(lambda w: not w.startswith(("-", "(", "!")), argv[1:])] or ["."]
            for i, word in enumerate(argv):
                if word in {"-exec", "-execdir", "-ok", "-okdir"} and i + 1 < len(argv):
                    end = next((j for j in range(i + 1, len(argv)) if argv[j] in {";", "+", "\\;"}), len(argv))
                    facts["programs"].append("find")
                    inner = [w for a in argv[i + 1 : end] for w in (starts if a == "{}" else [a])]
                    _pipeline([inner], facts, depth + 1, [])
                if word == "-delete":
                    facts["writes"] = True
                    facts["recursive_delete"] = True
                    if any(_rootish(s) for s in starts):
                        facts["dangerous"].append("rm-root")
            return argv
        opts = _WRAPPER_OPTS_WITH_ARG.get(program)
        if opts is None:
            return argv
        facts["programs"].append(program)
        if program == "env":
            # `env -S 'a b c'` splits its string into a command line: classify it as one.
            split = _env_split_string(argv)
            if split is not None:
                facts["subshell"] = True
                _script(split, facts, depth + 1)
                return []
        i = 1
        while i < len(argv) and (argv[i].startswith("-") or (program == "env" and _ASSIGNMENT.match(argv[i]))):
            if program == "env" and _ASSIGNMENT.match(argv[i]):
                facts["sets_env"] = True
            i += 2 if argv[i] in opts else 1
        argv = argv[i + _WRAPPER_POSITIONALS.get(program, 0) :]
    facts["unparseable"] = True
    return argv


def _env_split_string(argv: list[str]) -> str | None:
    """The command line `env -S STRING` (`-SSTRING`, `--split-string[=]STRING`) runs, with what follows it."""
    for i, word in enumerate(argv[1:], start=1):
        if word in ("-S", "--split-string"):
            return " ".join(argv[i + 1 :])
        if word.startswith("--split-string="):
            return " ".join([word.split("=", 1)[1], *argv[i + 1 :]])
        if word.startswith("-") and not word.startswith("--") and "S" in word[1:]:
            rest = word[word.index("S") + 1 :]
            return " ".join([rest, *argv[i + 1 :]] if rest else argv[i + 1 :])
        if not word.startswith("-") and not _ASSIGNMENT.match(word):
            return None
    return None


def _flag_value(argv: list[str], flags: tuple[str, ...], combined: bool = False) -> str | None:
    for i, word in enumerate(argv[1:], start=1):
        hit = word in flags or (combined and word.startswith("-") and not word.startswith("--") and "c" in word[1:])
        if hit:
            return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def _base_interpreter(program: str) -> str | None:
    base = re.sub(r"[0-9.]+$", "", program)
    return base if base in INTERPRETERS or program in INTERPRETERS else None


def _has_script_arg(program: str, argv: list[str]) -> bool:
    """`bash script.sh` reads a file; `bash`, `bash -s`, `python -` read the pipe."""
    rest = [a for a in argv[1:] if not a.startswith("-")]
    return bool(rest)


def _dangerous(program: str, argv: list[str], facts: dict[str, Any]) -> None:
    args = argv[1:]
    flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    long_flags = {a for a in args if a.startswith("--")}
    targets = [a for a in args if not a.startswith("-")]
    base = _base_interpreter(program)
    if base and _INLINE_CODE_FLAGS.get(base) in args:
        facts["inline_code"] = True
    if program in {"rm", "shred"}:
        facts["writes"] = True
        recursive = bool(set(flags) & {"r", "R"}) or "--recursive" in long_flags
        if recursive:
            facts["recursive_delete"] = True
        if "--no-preserve-root" in long_flags or (recursive and any(_rootish(t) for t in targets)):
            facts["dangerous"].append("rm-root")
    elif program in {"chmod", "chown", "chgrp"}:
        if (set(flags) & {"R"} or "--recursive" in long_flags) and any(_rootish(t) for t in targets):
            facts["dangerous"].append(f"{program}-root")
    elif program.startswith("mkfs") or program in {"wipefs", "fdisk", "parted", "sfdisk"}:
        facts["dangerous"].append("format-disk")
    elif program == "dd":
        for a in args:
            if a.startswith("of=/dev/") and not a.startswith(("of=/dev/null", "of=/dev/stdout")):
                facts["dangerous"].append("write-block-device")
    elif program in {"shutdown", "reboot", "halt", "poweroff"} or (
        program in {"init", "telinit"} and args[:1] in (["0"], ["6"])
    ):
        facts["dangerous"].append("shutdown")
    elif program == "kill" and "-1" in args:
        facts["dangerous"].append("kill-all")
    elif program == "git" and targets[:1] == ["push"] and ({"f"} & set(flags) or "--force" in long_flags):
        facts["writes"] = True


def _sensitive_word(word: str) -> bool:
    for piece in (word, *word.split("=")[1:]):
        if "/" in piece or piece.startswith((".", "~")) or "id_" in piece:
            if is_sensitive(os.path.normpath(os.path.expanduser(piece))):
                return True
    return False


def _rootish(target: str) -> bool:
    t = target.rstrip("/") or "/"
    return target in _ROOTISH or t in _ROOTISH or re.fullmatch(r"/+\*?", target) is not None


# Options of otherwise read-only programs that write a file or run another program. A read-only program is
# read-only only without them; the run is read-only anyway (the sandbox), so a miss here costs a failed run.
_WRITING_OPTIONS = {
    "sort": ("-o", "--output", "--compress-program"),
    "tree": ("-o",),
    "rg": ("--pre", "--pre-glob", "--search-zip", "-z"),
    "file": ("-C", "--compile"),
    "date": ("-s", "--set"),
    "less": ("-o", "-O", "--log-file", "--LOG-FILE"),
    "git": ("--output", "--ext-diff", "--textconv"),
}
_GIT_GLOBAL_RUNS = ("-c", "--config-env", "--exec-path", "-p", "--paginate")  # before the subcommand
_SED_SAFE = re.compile(
    r"""^\s*(?:(?:\d+|\$|/[^/]*/)(?:\s*,\s*(?:\d+|\$|/[^/]*/))?\s*!?\s*)?"""
    r"""(?:[pdqPDnNgGhHx=]|s/(?:[^/\\]|\\.)*/(?:[^/\\]|\\.)*/[gIip0-9]*)?\s*$"""
)


def _read_only_command(argv: list[str]) -> bool:
    program = os.path.basename(argv[0])
    args = argv[1:]
    if any(_has_option(a, opt) for opt in _WRITING_OPTIONS.get(program, ()) for a in args):
        return False
    if program == "git":
        before = list(itertools.takewhile(lambda a: a.startswith("-"), args))
        if any(a == opt or a.startswith(opt + "=") for opt in _GIT_GLOBAL_RUNS for a in before):
            return False
        sub = next((a for a in args if not a.startswith("-")), "")
        return sub in GIT_READ_ONLY
    if program == "find":
        return not any(a in {"-exec", "-execdir", "-ok", "-okdir", "-delete"} or a.startswith(("-fprint", "-fls"))
                       for a in argv)
    if program == "sed":
        return _sed_read_only(args)
    if program in {"awk", "gawk"}:
        return False
    if program == "uniq":  # `uniq IN OUT` writes OUT
        return len([a for a in args if not a.startswith("-") or a == "-"]) <= 1
    if program == "hostname":  # `hostname NAME` sets it
        return not [a for a in args if not a.startswith("-")]
    if program == "date":  # `date MMDDhhmm` sets the clock; `date +%F` prints
        return all(a.startswith(("-", "+")) for a in args)
    return program in READ_ONLY_PROGRAMS


def _has_option(arg: str, opt: str) -> bool:
    """`arg` gives option `opt`: `--long`, `--long=v`, `-x`, `-xVALUE`, or `-x` inside a cluster like `-rx`."""
    if opt.startswith("--"):
        return arg == opt or arg.startswith(opt + "=")
    return arg.startswith("-") and not arg.startswith("--") and opt[1] in arg[1:]


def _sed_read_only(args: list[str]) -> bool:
    """sed reads only with in-place editing off and scripts made of printing, deleting and plain `s///`:
    `w`, `W`, `e`, `r` and the `w`/`e` flags of `s` write files or run commands."""
    scripts: list[str] = []
    files = False
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-i") or a.startswith("--in-place") or a in ("-f", "--file") or a.startswith("--file="):
            return False
        if a in ("-e", "--expression"):
            scripts.append(args[i + 1] if i + 1 < len(args) else "")
            i += 2
            continue
        if a.startswith("--expression="):
            scripts.append(a.split("=", 1)[1])
        elif a.startswith("-e") and len(a) > 2:
            scripts.append(a[2:])
        elif a.startswith("-") and a != "-":
            if not a.startswith("--") and ("i" in a[1:] or "f" in a[1:]):
                return False
        elif not scripts and not files:
            scripts.append(a)
            files = True
        i += 1
    return all(_SED_SAFE.match(part) for script in scripts for part in re.split(r"[;\n]", script))


def lex(text: str) -> _Lexed:
    """Split a command line into words, operators and redirections; collect substitutions."""
    out = _Lexed()
    word: list[str] = []
    in_word = False
    i, n = 0, len(text)

    def end_word() -> None:
        nonlocal in_word
        if in_word:
            out.tokens.append(("word", "".join(word)))
            word.clear()
            in_word = False

    while i < n:
        c = text[i]
        if c in " \t":
            end_word()
            i += 1
        elif c == "\n":
            end_word()
            out.tokens.append(("op", ";"))
            i += 1
        elif c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                i += 2
                continue
            word.append(text[i + 1] if i + 1 < n else "")
            in_word = True
            i += 2
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ShellSyntaxError("unterminated single quote")
            word.append(text[i + 1 : j])
            in_word = True
            i = j + 1
        elif c == '"':
            i = _double_quoted(text, i + 1, word, out)
            in_word = True
        elif c == "`":
            j = _backtick_end(text, i + 1)
            out.substitutions.append(text[i + 1 : j])
            word.append(text[i : j + 1])
            in_word = True
            i = j + 1
        elif text.startswith("$((", i):
            j = _paren_end(text, i + 2)
            word.append(text[i : j + 1])
            in_word = True
            i = j + 1
        elif text.startswith("$(", i) or (text.startswith(("<(", ">("), i) and not in_word):
            j = _paren_end(text, i + 1)
            out.substitutions.append(text[i + 2 : j])
            word.append(text[i : j + 1])
            in_word = True
            i = j + 1
        elif c in "<>&|;()":
            op = next((o for o in _REDIRECTS if text.startswith(o, i)), None)
            if op is not None:
                if in_word and "".join(word).isdigit():
                    word.clear()
                    in_word = False
                end_word()
                out.tokens.append(("redir", op))
                i += len(op)
                continue
            op = next((o for o in _OPERATORS if text.startswith(o, i)), "&")
            end_word()
            out.tokens.append(("op", op))
            i += len(op)
        else:
            m = _PLAIN.match(text, i)
            end = m.end() if m else i + 1
            word.append(text[i:end])
            in_word = True
            i = end
    end_word()
    return out


def _double_quoted(text: str, i: int, word: list[str], out: _Lexed) -> int:
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < n and text[i + 1] in '"\\$`\n':
            word.append(text[i + 1])
            i += 2
        elif text.startswith("$(", i) and not text.startswith("$((", i):
            j = _paren_end(text, i + 1)
            out.substitutions.append(text[i + 2 : j])
            word.append(text[i : j + 1])
            i = j + 1
        elif c == "`":
            j = _backtick_end(text, i + 1)
            out.substitutions.append(text[i + 1 : j])
            word.append(text[i : j + 1])
            i = j + 1
        else:
            word.append(c)
            i += 1
    raise ShellSyntaxError("unterminated double quote")


def _paren_end(text: str, i: int) -> int:
    """Index of the `)` matching the `(` at i, skipping quoted text."""
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                break
            i = j + 1
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ShellSyntaxError("unbalanced parenthesis in substitution")


def _backtick_end(text: str, i: int) -> int:
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "`":
            return i
        i += 1
    raise ShellSyntaxError("unterminated backtick")
