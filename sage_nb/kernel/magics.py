"""``%llm`` and ``%%llm``: parsing lives in :mod:`.parsing`, the work in :class:`.client.Client`."""

from __future__ import annotations

import re
import time

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Unicode

from sage_nb.controlplane import ControlPlaneError
from sage_nb.controlplane.engines.scope import started_from
from sage_nb.controlplane.state import ENDED

from . import doctor, views
from .client import Client, get_client, set_client
from .connection import this_kernel
from .parsing import parse_cell, parse_line


def watch(refresh, first, every: float, rounds: int | None = None) -> None:
    """Show ``first``, then ``refresh()`` every ``every`` s in its place until interrupted (``rounds``:
    stop after that many refreshes): one output updated in a notebook, the screen redrawn in a terminal."""
    from IPython import get_ipython

    in_notebook = type(get_ipython()).__name__ == "ZMQInteractiveShell"
    handle = display(first, display_id=True) if in_notebook else print(repr(first))
    done = 0
    try:
        while rounds is None or done < rounds:
            time.sleep(every)
            view = refresh()
            if in_notebook:
                handle.update(view)
            else:
                print("\x1b[H\x1b[2J" + repr(view), flush=True)
            done += 1
    except KeyboardInterrupt:  # the kernel's interrupt (or Ctrl-C) ends the watch, not the session
        pass


class SageNBError(Exception):
    """A runtime failure shown as one line (nbval still fails the cell)."""

    def _render_traceback_(self) -> list[str]:
        return [f"sage_nb: {self}"]


class Progress:
    """One display line that follows a start or a wake: ``⏳ phase``, ``✅ ready``, or ``❌ failed``
    (call :meth:`failed`); ``progress(engine, phase)`` is the client's ``on_progress``."""

    def __init__(self, what: str, name: str) -> None:
        self.name, self.t0 = name, time.monotonic()
        self.handle = display(views.Note(f"⏳ {what} …"), display_id=True)

    def __call__(self, engine: dict, phase: str) -> None:
        self.name = engine["name"]
        where = ",".join(f"GPU{g}" for g in engine["gpu_ids"]) or "CPU"
        where += f" on {engine['node']}" if engine.get("node") else ""
        mark = "✅" if phase == "ready" else "⏳"
        self._show(f"{mark} **{self.name}** ({engine['kind']}, {where}, port {engine['port']}): {phase}")

    def failed(self) -> None:
        self._show(f"❌ **{self.name}** failed")

    def _show(self, text: str) -> None:
        if self.handle is not None:  # None outside IPython's display machinery
            self.handle.update(views.Note(f"{text} — {time.monotonic() - self.t0:.0f} s"))


@magics_class
class LLMMagics(Magics):
    """``%llm start|stop|sleep|wake|keep-alive|adapter|adapters|engines|backends|gpus|prune|logs|dashboard|doctor``
    and ``%%llm``."""

    server_url = Unicode("", help="Jupyter server URL (default: this kernel's server).").tag(config=True)
    token = Unicode("", help="Jupyter server token (default: from the server's info file).").tag(config=True)

    def __init__(self, shell=None, **kwargs) -> None:
        super().__init__(shell=shell, **kwargs)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            if self.server_url:
                self._client = Client(url=self.server_url, token=self.token or None)
                set_client(self._client)
            else:
                self._client = get_client()
        return self._client

    @line_cell_magic
    def llm(self, line: str, cell: str | None = None):
        """Manage vLLM engines (``%llm --help``), or chat with the cell (``%%llm --help``)."""
        if cell is not None:
            return self._chat(line, cell)
        parsed = parse_line(line)
        if parsed is None:
            return None
        args = parsed.args
        try:
            if args.command == "start":
                return self._start(args, parsed.vllm_args)
            return getattr(self, f"_cmd_{args.command.replace('-', '_')}")(args)
        except ControlPlaneError as e:
            raise SageNBError(views.one_line(e)) from None
        except (ConnectionError, OSError) as e:
            raise SageNBError(f"cannot reach the sage_nb server: {e}") from None

    # ------------------------------------------------------------------ commands
    def _start(self, args, vllm_args: list[str]):
        options = {k: getattr(args, k) for k in ("name", "tensor_parallel_size", "gpu_ids", "node", "port",
                                                  "max_model_len", "dtype")}
        if args.keep_alive is not None:  # as typed; the control plane reads it
            options["keep_alive"] = args.keep_alive
        if args.scope is not None:
            options["scope"] = args.scope
        if args.shared:
            options["shared"] = True
        if args.lora or args.max_loras or args.max_lora_rank or args.adapters:
            options.update(lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                           adapters=dict(args.adapters) if args.adapters else None)
        kind = "embedding" if args.embedding else "llm"
        if args.no_wait:
            engine = self.client.start(args.model, kind, wait=False, extra_args=vllm_args, **options)
            return views.engines_table([engine], "sage_nb: starting (use %llm engines to follow)")
        progress = Progress(f"starting **{args.model}** ({kind})", args.name or args.model)
        try:
            engine = self.client.start(args.model, kind, wait=True, extra_args=vllm_args, on_progress=progress,
                                       **options)
        except Exception:  # refused, or failed while loading: no "starting" line is left behind
            progress.failed()
            raise
        return views.engines_table([engine], "sage_nb: ready")

    def _cmd_stop(self, args):
        return views.engines_table([self.client.stop(args.engine)], "sage_nb: stopped")

    def _cmd_sleep(self, args):
        engine = self.client.sleep(args.engine, "unload" if args.unload else "auto")
        return views.engines_table([engine], f"sage_nb: {engine['state']}")

    def _cmd_wake(self, args):
        if args.no_wait:
            engine = self.client.wake(args.engine, wait=False)
            return views.engines_table([engine], f"sage_nb: {engine['state']} (use %llm engines to follow)")
        progress = Progress(f"waking **{args.engine}**", args.engine)
        try:
            engine = self.client.wake(args.engine, on_progress=progress)
        except Exception:
            progress.failed()
            raise
        return views.engines_table([engine], "sage_nb: awake")

    def _cmd_keep_alive(self, args):
        engine = self.client.set_keep_alive(args.engine, args.value)
        return views.engines_table([engine], f"sage_nb: keep-alive {views.span(engine['keep_alive'])}")

    def _cmd_adapter(self, args):
        if args.verb == "load":
            share = [w.strip() for w in args.share.split(",") if w.strip()] if args.share else None
            adapter = self.client.load_adapter(args.name, args.path, engine=args.engine, share=share)
            return views.adapters_table([adapter], f"sage_nb: adapter {adapter['name']} on {adapter['engine']}")
        removed = self.client.unload_adapter(args.name, engine=args.engine)
        return views.adapters_table(removed, f"sage_nb: unloaded {args.name}")

    def _cmd_adapters(self, args):
        return views.adapters_table(self.client.adapters())

    def _cmd_engines(self, args):
        return views.engines_table(self.client.engines())

    def _cmd_backends(self, args):
        return views.backends_table(self.client.backends(), self.client.gateway_url())

    def _cmd_gpus(self, args):
        return views.gpus_table(self.client.gpus())

    def _cmd_prune(self, args):
        """This notebook's stopped and failed engines (``--all``: everyone's); says which were kept."""
        names = {e["id"]: e for e in self.client.engines()}
        here = (None, None) if args.all else this_kernel()
        mine = any(here)
        removed = self.client.prune(*here)
        kept = [e["name"] for e in names.values() if e["state"] in ENDED and e["id"] not in removed
                and not started_from(e, *here)] if mine else []
        footer = (f"kept {len(kept)} stopped/failed engine{'s' if len(kept) > 1 else ''} not started from this "
                  f"notebook: {', '.join(kept)}; %llm prune --all prunes them") if kept else None
        rows = [[i, names.get(i, {}).get("name", ""), names.get(i, {}).get("state", "")] for i in removed]
        what = "this notebook's stopped/failed engines" if mine else "stopped/failed engines"
        return views.Table(f"sage_nb: pruned {what}", ["id", "name", "was"], rows, empty="nothing to prune",
                           footer=footer)

    def _cmd_usage(self, args):
        return views.usage_table(self.client.usage(args.days, args.user))

    def _cmd_top(self, args):
        table = views.top_table(self.client.metrics(window=args.window))
        if not args.watch:
            return table
        watch(lambda: views.top_table(self.client.metrics(window=args.window)), table, args.watch)
        return None

    def _cmd_metrics(self, args):
        from .plots import EngineView

        return EngineView(self.client, args.engine, window=args.window)

    def _cmd_logs(self, args):
        return views.Logs(args.engine, self.client.logs(args.engine, args.lines))

    def _cmd_dashboard(self, args):
        from .dashboard import Dashboard

        return Dashboard(client=self.client)

    def _cmd_doctor(self, args):
        return doctor.gpu_report(self.client) if args.gpu else doctor.report(self.client)

    # ------------------------------------------------------------------ %%llm
    def _chat(self, line: str, cell: str):
        args = parse_cell(line)
        if args is None:
            return None
        namespace = self.shell.user_ns if self.shell is not None else {}
        prompt = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}",
                        lambda m: str(namespace[m.group(1)]) if m.group(1) in namespace else m.group(0), cell)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt.strip()})
        try:
            oa = self.client.llm(args.model)
            reply = oa.chat.completions.create(model=oa.model, messages=messages, max_tokens=args.max_tokens,
                                               temperature=args.temperature)
        except ControlPlaneError as e:
            raise SageNBError(views.one_line(e)) from None
        except Exception as e:  # openai errors: one clear line
            raise SageNBError(f"chat request failed: {e}") from None
        text = reply.choices[0].message.content or ""
        display(views.Note(text, text))
        return None
