"""Pieces every ``normdeploy`` command shares: one-line errors, the progress display, and flags
built from :mod:`normdeploy.options` (each flag's default is its field's default), shown in
``--help`` by section.

Errors a user can cause print one line (``error: what is wrong; what to do``) on stderr
and exit non-zero, with no traceback unless ``--debug``; see :mod:`normdeploy.core.errors`.
"""
from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager

import click

from ..core.errors import NormdeployError
from ..options import GROUPS, Options

#: the heading each option group has in --help
SECTIONS = {"target": "Target", "export": "Model and export", "rewrite": "Rewrites", "verify": "Accuracy",
            "bench": "Latency", "ort": "ONNX Runtime targets (ort-*)", "trt": "TensorRT targets (trt-*)",
            "output": "Output", "bench_cmd": "Benchmark", "gate": "Gate thresholds", "serve": "Server",
            "general": "General"}


@contextmanager
def errors(debug: bool):
    try:
        yield
    except NormdeployError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, then the hint
        if debug:
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        click.echo(f"error: internal error ({type(e).__name__}: {msg}); rerun with --debug and report it", err=True)
        sys.exit(1)


class Progress:
    """A rich progress display on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._task = None
        self._stage = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __call__(self, stage: str, fraction: float | None = None) -> None:
        if not self._progress:
            return
        from ..core.profile import rss_bytes

        label = f"{stage} ({rss_bytes() / (1 << 30):.1f} GB resident)"
        if stage != self._stage:
            if self._task is not None:
                self._progress.update(self._task, completed=100, total=100)
            self._task = self._progress.add_task(label, total=100 if fraction is not None else None)
            self._stage = stage
        if fraction is not None:
            self._progress.update(self._task, completed=100 * fraction, total=100, description=label)

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)


# ----------------------------------------------------------------------------- flags from the options

class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options under the heading of their section."""

    def format_options(self, ctx, formatter):
        by_section: dict[str, list] = {}
        for param in self.get_params(ctx):
            rec = param.get_help_record(ctx)
            if rec is not None:
                by_section.setdefault(getattr(param, "section", "general"), []).append(rec)
        for key in list(SECTIONS) + [k for k in by_section if k not in SECTIONS]:
            if key in by_section:
                with formatter.section(SECTIONS.get(key, key.title())):
                    formatter.write_dl(by_section[key])


def _field(group: str | None, name: str) -> dataclasses.Field:
    kind = Options if group is None else GROUPS[group]
    return next(f for f in dataclasses.fields(kind) if f.name == name)


def option(group: str | None, name: str, **overrides):
    """A click option for field ``name`` of option group ``group`` (None: a field of Options itself)."""
    f = _field(group, name)
    meta = dict(f.metadata["cli"])
    meta.update(overrides)
    default = f.default if f.default is not dataclasses.MISSING else None
    kw = {"help": meta["help"], "show_default": default not in (None, (), False)}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kw["type"] = click.Choice(meta["choices"])
    if meta.get("is_flag"):
        kw["is_flag"] = True
    elif name == "inputs":
        kw["multiple"] = True
    elif "/" not in meta["decls"][0] and default is not None and not meta.get("choices"):
        kw["type"] = type(default)
    elif name in ("threads", "opt_level", "warmup"):
        kw["type"] = int
    elif name == "tolerance":
        kw["type"] = float
    decorators = [click.option(*meta["decls"], name, default=default, **kw)]
    for alias in meta.get("aliases", ()):
        decorators.append(click.option(alias, f"alias__{name}", default=None, hidden=True, type=kw.get("type")))

    def deco(fn):
        for d in decorators:
            fn = d(fn)
        for p in fn.__click_params__[-len(decorators):]:
            p.section = group or "target"
        return fn
    return deco


def group_options(*groups: str, only: dict[str, tuple[str, ...]] | None = None):
    """Options for every field of ``groups`` (``only`` restricts a group to some fields)."""
    only = only or {}

    def deco(fn):
        for group in reversed(groups):
            kind = Options if group == "target" else GROUPS[group]
            names = [f.name for f in dataclasses.fields(kind) if "cli" in f.metadata]
            for name in reversed(only.get(group, names)):
                fn = option(None if group == "target" else group, name)(fn)
        return fn
    return deco


def plain(*decls, section: str = "general", **kw):
    """A click option that is not an option-group field (output paths, --json, ...), in ``section``."""
    def deco(fn):
        fn = click.option(*decls, **kw)(fn)
        fn.__click_params__[-1].section = section
        return fn
    return deco


def common_flags(fn):
    fn = plain("--debug", is_flag=True, help="Show tracebacks.")(fn)
    return plain("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(fn)


def options_from(values: dict, base: Options | None = None) -> Options:
    """The :class:`Options` a command's click values describe; consumes the option-field keys of ``values``."""
    from ..options import FLAT

    flat = {}
    for key in list(values):
        if key.startswith("alias__"):
            v = values.pop(key)
            if v is not None:
                flat[key[len("alias__"):]] = v
        elif key in FLAT or key in ("target", "batch"):
            flat.setdefault(key, values.pop(key))
    if "inputs" in flat:
        flat["inputs"] = tuple(flat["inputs"])
    return Options.from_flat(base, **flat)


def given(name: str) -> bool:
    """Whether the current command's parameter ``name`` was given on the command line (not its default)."""
    ctx = click.get_current_context()
    src = ctx.get_parameter_source(name)
    return src is not None and src != click.core.ParameterSource.DEFAULT
