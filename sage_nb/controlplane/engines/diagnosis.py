"""Why an engine failed, in one line, from its own log.

vLLM ends a failed start with a traceback whose last line is often a wrapper ("Engine core
initialization failed. See root cause above."), a pydantic ``ValidationError`` header, or an
exit code. :func:`cause` finds the line a user needs: a known message first (the KV cache too
small for ``max_model_len``, the port taken, an out-of-memory kill, a configuration value
error), else the last exception line that is not a wrapper. The full tail stays in the record's
``error`` below that line, and the whole log in the engine's log file.
"""

from __future__ import annotations

import re

TAIL_LINES = 300  # how much of the log is searched for the cause
SHOWN_LINES = 25  # how much of it the record's error keeps
MAX_CAUSE = 400   # characters of the cause line

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PREFIX = re.compile(r"^\((?:[A-Za-z_][\w:]*) pid=\d+\) ", re.M)  # vLLM's "(EngineCore_DP0 pid=12) "
KV_V1 = re.compile(r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed, which is larger than the "
                   r"available KV cache memory \(([\d.]+) GiB\)\.(?: Based on the available memory, the "
                   r"estimated maximum model length is (\d+)\.)?")
KV_OLD = re.compile(r"max seq len \((\d+)\) is larger than the maximum number of tokens that can be stored "
                    r"in KV cache \((\d+)\)")
NO_KV = re.compile(r"No available memory for the cache blocks")
PORT_IN_USE = re.compile(r"\[Errno 98\]|[Aa]ddress already in use")
KILLED_CORE = re.compile(r"Failed core proc\(s\): \{[^}]*: -9\}")
VALUE_ERROR = re.compile(r"^\s*Value error, (.+?)(?: \[type=[^\]]*\])?\s*$", re.M)
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b[\w.]*): (\S.*)$", re.M)
WRAPPERS = re.compile(r"Engine core initialization failed|Frontend process failed|See root cause above"
                      r"|validation errors? for \w+$|Engine process failed to start")
HUB = re.compile(r"Error retrieving file list|couldn't connect to '|huggingface_hub\.errors\.|LocalEntryNotFound")
SIGKILL = (-9, 137)


def cause(log: str, exit_code: int | None = None) -> str | None:
    """The one line that says why the engine failed, or ``None`` when the log does not say."""
    text = PREFIX.sub("", ANSI.sub("", log))
    if m := _last(KV_V1, text):
        fits = f"; the largest that fits is about {m.group(4)}" if m.group(4) else ""
        return (f"max_model_len {m.group(1)} needs {m.group(2)} GiB of KV cache but the engine has "
                f"{m.group(3)} GiB{fits}: lower max_model_len or give the KV cache more memory")
    if m := _last(KV_OLD, text):
        return (f"max_model_len {m.group(1)} is larger than the {m.group(2)} tokens its KV cache holds: lower "
                "max_model_len or give the KV cache more memory")
    if NO_KV.search(text):
        return "no memory was left for the KV cache after loading the weights: give the engine more memory"
    if PORT_IN_USE.search(text):
        return "its port was taken by another process (address already in use)"
    if KILLED_CORE.search(text) or exit_code in SIGKILL:
        return ("killed by SIGKILL, most likely by the kernel's out-of-memory killer: the machine "
                "ran out of memory (free memory, or start a smaller model or a smaller KV cache)")
    if m := _last(VALUE_ERROR, text):
        return _short(m.group(1))
    for m in reversed(list(EXCEPTION.finditer(text))):
        if not WRAPPERS.search(m.group(2)):
            hub = "could not get the model's files from the hub: " if HUB.search(text) else ""
            return hub + _short(f"{m.group(1)}: {m.group(2)}")
    return None


def explain(reason: str, tail: str, log_path: str | None, exit_code: int | None = None) -> str:
    """A record's ``error``: the cause on the first line (else ``reason``), then ``reason``, then the
    last lines of the log."""
    found = cause(tail, exit_code)
    head = f"{found}\n({reason})" if found and found != reason else reason
    shown = "\n".join(tail.strip().splitlines()[-SHOWN_LINES:])
    return f"{head}\n--- last lines of {log_path} ---\n{shown}" if shown else head


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 — the last one is wanted
        pass
    return found


def _short(line: str) -> str:
    """At most two sentences and :data:`MAX_CAUSE` characters of one line."""
    line = " ".join(line.split())
    sentences = re.split(r"(?<=[.!?]) (?=[A-Z])", line)
    line = " ".join(sentences[:2])
    return line if len(line) <= MAX_CAUSE else line[:MAX_CAUSE - 1].rstrip() + "…"
