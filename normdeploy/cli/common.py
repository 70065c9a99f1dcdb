"""Pieces every ``normdeploy`` command shares: one-line errors, the progress display, and flags
built from :mod:`normdeploy.options` (each flag's default is its field's default), shown in
``--help`` by section.

Errors a user can cause print one line (``error: what is wrong; what to do``) on stderr
and exit non-zero, with no traceback unless ``--debug``; see :mod:`normdeploy.core.errors`.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from contextlib import contextmanager

import click

from ..core.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, NormdeployError
from ..options import GROUPS, Options

#: the heading each option group has in --help
SECTIONS = {"target": "Target", "export": "Model and export", "rewrite": "Rewrites", "verify": "Accuracy",
            "bench": "Latency", "ort": "ONNX Runtime targets (ort-*)", "trt": "TensorRT targets (trt-*)",
            "tune": "Autotune (ort-*)",
            "output": "Output", "bench_cmd": "Benchmark", "gate": "Gate thresholds", "serve": "Server",
            "general": "General"}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the output directory's cleanup runs (as for Ctrl-C)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(code: int, kind: str, message: str, hint: str = "", as_json: bool = False) -> None:
    """Print the one-line error on stderr (and, with ``--json``, as JSON on stdout); exit with ``code``."""
    line = _one_line(f"{message}; {hint}" if hint else message)
    click.echo(f"error: {line}", err=True)
    if as_json:
        import json

        click.echo(json.dumps({"error": {"type": kind, "message": _one_line(message), "hint": _one_line(hint),
                                         "exit_code": code}}, indent=2))
    sys.exit(code)


def _json_requested(as_json: bool | None) -> bool:
    if as_json is not None:
        return bool(as_json)
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


@contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises :class:`Terminated` (main thread only), so that ``finally``
    and ``except BaseException`` clean-ups run: a half-written output directory is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main interpreter, or a platform without it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- wrong --input on torch models

def _forward_parameters(module) -> tuple[list[str], bool]:
    """The names of ``module``'s forward inputs and whether it takes any number (``*args``)."""
    import inspect

    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript
        return [a.name for a in schema.arguments if a.name != "self"], False
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty]
    return names, any(p.kind == p.VAR_POSITIONAL for p in params)


def _what_it_takes(module, loaded) -> str:
    """What the model takes, as far as it says: its example inputs, its forward's inputs, its first layer."""
    import torch

    examples = getattr(module, "example_inputs", None)
    if isinstance(examples, dict) and examples:
        dtypes = getattr(module, "example_input_dtypes", None) or {}
        return "the model's example inputs are " + ", ".join(
            f"{k}:{'x'.join(map(str, v))}" + (f":{dtypes[k]}" if k in dtypes else "") for k, v in examples.items())
    ep_examples = getattr(loaded.obj, "example_inputs", None) if loaded.kind == "exported_program" else None
    if ep_examples and ep_examples[0]:
        return "the program was exported with " + ", ".join(
            f"{'x'.join(map(str, t.shape))} {str(t.dtype).replace('torch.', '')}" for t in ep_examples[0])
    names, _ = _forward_parameters(module)
    parts = [f"its forward takes {len(names)} input(s) ({', '.join(names)})"] if names else []
    first = next((m for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                  or isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))), None) if hasattr(
        module, "modules") else None
    if isinstance(first, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        parts.append(f"its first layer is an Embedding of {first.num_embeddings} entries (integer ids: :int64)")
    elif isinstance(first, torch.nn.modules.conv._ConvNd):
        k = len(first.kernel_size)
        parts.append(f"its first layer is a Conv{k}d taking {first.in_channels} channels "
                     f"(N x {first.in_channels} x {' x '.join('HWD'[i] for i in range(k))})")
    elif isinstance(first, torch.nn.Linear):
        parts.append(f"its first layer is a Linear taking {first.in_features} features (... x {first.in_features})")
    return "; ".join(parts) or "see its forward"


def input_mismatch(model_path: str, input_texts, trust_pickle: bool = False):
    """Why ``--input`` does not fit the torch model at ``model_path`` (an InputError to raise), or None.

    Run when an export failed: the model is run eagerly on example tensors of the given specs,
    which tells a bad ``--input`` (too many inputs, a wrong rank or size, a float where token ids
    are needed) from a model the exporter cannot handle. Names the input and what the model takes.
    """
    import torch

    from ..core.errors import InputError
    from ..export import example_tensors
    from ..load import load

    try:
        loaded = load(model_path, tuple(input_texts), trust_pickle)
    except Exception:  # noqa: BLE001 - its own error was raised before; nothing to add
        return None
    if loaded.kind == "onnx":
        return None
    module = loaded.obj.module() if loaded.kind == "exported_program" else loaded.obj
    specs = loaded.inputs
    given = ", ".join(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in specs)
    takes = _what_it_takes(module, loaded)
    names, var = _forward_parameters(module)
    if loaded.kind != "exported_program" and names and not var and len(specs) > len(names):
        return InputError(f"--input gives {len(specs)} inputs ({given}), but the model's forward takes "
                          f"{len(names)} ({', '.join(names)})", f"give one --input per forward input; {takes}")

    def runs(tensors) -> BaseException | None:
        try:
            with torch.no_grad():
                module(*tensors)
        except Exception as e:  # noqa: BLE001 - any failure of the model on these inputs
            return e
        return None

    args = example_tensors(specs, batch=max(2, specs[0].shape[0]) if specs else None)
    error = runs(args)
    if error is None:
        return None  # the inputs fit: the exporter's own failure stands
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:240]
    for i, (s, t) in enumerate(zip(specs, args)):  # a float given where the model wants integer ids
        if t.is_floating_point() and runs(args[:i] + (t.abs().long() % 16,) + args[i + 1:]) is None:
            return InputError(f"--input {s.name}:{'x'.join(map(str, s.shape))} is float32, but the model needs "
                              f"integer ids there ({type(error).__name__}: {cause})",
                              f"give its dtype: --input {s.name}:{'x'.join(map(str, s.shape))}:int64")
    return InputError(f"--input {given} does not fit the model: it fails on them ({type(error).__name__}: {cause})",
                      f"fix the shape or dtype; {takes}")


#: loggers whose records are not the user's business on a run that works: onnxscript's constant folder
#: logs ``Evaluation failed: ...`` (a WARNING) for every node it cannot fold, and then leaves it as it is
QUIET_LOGGERS = ("onnxscript.optimizer._constant_folding",)


def _quiet_logs(params: dict, debug: bool) -> None:
    """Without ``--debug``: no log lines of other libraries on stderr. onnxscript's constant folder warns
    on every node it leaves unfolded; torch's exporter logs ERROR lines of its own when an export fails
    (the one-line error says it all)."""
    if debug:
        return
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    model = params.get("model") or (params.get("models") or [None])[0]
    if isinstance(model, str) and not model.endswith(".onnx") and os.path.exists(model):
        try:
            import torch  # noqa: F401 - the model needs it anyway; its logging is configured on import
        except ImportError:
            return  # loading says what is missing
        logging.getLogger("torch").setLevel(logging.CRITICAL)


def _bad_input_instead(error: BaseException):
    """The InputError that explains ``error`` (an export failure) by a wrong ``--input``, or None."""
    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    texts = tuple(params.get("inputs") or ())
    model = params.get("model") or (params.get("models") or [None])[0]
    if not texts or not isinstance(model, str) or model.endswith(".onnx"):
        return None
    from ..core.errors import InputError, UnsupportedError

    if isinstance(error, InputError) or not isinstance(error, (UnsupportedError, RuntimeError, TypeError, ValueError)):
        return None
    try:
        return input_mismatch(model, texts, bool(params.get("trust_pickle")))
    except Exception:  # noqa: BLE001 - the diagnosis must never hide the original error
        return None


@contextmanager
def errors(debug: bool, as_json: bool | None = None):
    """One line per error on stderr (JSON on stdout too with ``--json``), the exit codes of
    :mod:`normdeploy.core.errors`: a NormdeployError's own, :data:`EXIT_INTERNAL` for anything else."""
    as_json = _json_requested(as_json)
    ctx = click.get_current_context(silent=True)
    try:
        with _sigterm_raises():
            _quiet_logs(ctx.params if ctx is not None else {}, debug)
            yield
    except NormdeployError as e:
        if debug:
            raise
        e = _bad_input_instead(e) or e
        _fail(e.exit_code, type(e).__name__, e.message, e.hint, as_json)
    except KeyboardInterrupt:
        _fail(EXIT_INTERRUPTED, "Interrupted", "interrupted; nothing was written", "", as_json)
    except Terminated:
        _fail(EXIT_TERMINATED, "Terminated", "terminated (SIGTERM); nothing was written", "", as_json)
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, then the hint
        if debug:
            raise
        bad = _bad_input_instead(e)
        if bad is not None:
            _fail(bad.exit_code, type(bad).__name__, bad.message, bad.hint, as_json)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _fail(EXIT_INTERNAL, "InternalError", f"internal error ({type(e).__name__}: {msg})",
              "rerun with --debug and report it", as_json)


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

#: click >= 8.2 raises this (a UsageError whose message is the help) for a bare group: shown as it is
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineUsageError(click.UsageError):
    """A command-line usage error as one line (``error: ...; run '... --help'``), JSON on stdout with ``--json``."""

    def __init__(self, error: click.UsageError, as_json: bool):
        super().__init__(error.format_message(), error.ctx)
        self.as_json = as_json

    def show(self, file=None) -> None:
        ctx = self.ctx
        path = " ".join(["normdeploy"] + ctx.command_path.split()[1:]) if ctx is not None else "normdeploy"
        hint = f"run '{path} --help' for the options"
        message = _one_line(self.format_message()).rstrip(".")
        click.echo(f"error: {message}; {hint}", err=True)
        if self.as_json:
            import json

            click.echo(json.dumps({"error": {"type": "UsageError", "message": message,
                                             "hint": hint, "exit_code": self.exit_code}}, indent=2))


class OneLineGroup(click.Group):
    """The ``normdeploy`` group: an unknown command or a bad group option is one line too."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except (OneLineUsageError, _NO_ARGS_IS_HELP):
            raise
        except click.UsageError as e:
            raise OneLineUsageError(e, "--json" in args) from None

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except (OneLineUsageError, _NO_ARGS_IS_HELP):
            raise
        except click.UsageError as e:
            raise OneLineUsageError(e, "--json" in args) from None


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options under the heading of their section, and whose
    usage errors (unknown option, bad value, missing argument) are one line, exit status 2."""

    def parse_args(self, ctx, args):
        as_json = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except (OneLineUsageError, _NO_ARGS_IS_HELP):
            raise
        except click.UsageError as e:
            raise OneLineUsageError(e, as_json) from None

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
