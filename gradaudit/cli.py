"""The ``gradaudit`` command line: ``check``, ``compare``, ``rules``, ``explain``.

Exit codes: 0 no finding at or above ``--fail-on`` (default ``error``); 1 findings;
2 usage, configuration or load error; 3 internal error; 4 incomplete audit (the
prediction could not put statistics on every parameterized layer, or the loss reaches
no parameter; ``--exit-zero`` does not mask it). Machine output (json, sarif,
github, html) goes to stdout or ``-o FILE``; human output goes to stderr then.

torch, rich and the API are imported inside the commands, so ``gradaudit --help`` is
instant.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import click

from gradaudit import __version__
from gradaudit.errors import ConfigError, GradauditError
from gradaudit.report import FORMATS

#: Exit status of an unexpected exception (a bug in gradaudit, not bad input).
INTERNAL_ERROR = 3


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)


#: click >= 8.2 raises this for a bare ``gradaudit``; it carries the help text.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """A group whose usage errors are one line on stderr (exit 2), like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        debug = "--debug" in (sys.argv[1:] if args is None else list(args))
        try:
            rv = super().main(args, prog_name or "gradaudit", complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except _NO_ARGS_IS_HELP as exc:
            click.echo(exc.format_message())
            code = 0
        except click.UsageError as exc:
            _error(exc.format_message())
            code = 2
        except click.Abort:
            click.echo("aborted", err=True)
            code = 130
        except click.ClickException as exc:
            _error(exc.format_message())
            code = exc.exit_code
        except GradauditError as exc:
            if debug:
                raise
            _error(str(exc))
            code = exc.exit_code
        except BrokenPipeError:
            code = 1
        except Exception as exc:
            if debug:
                raise
            _internal(exc)
            code = INTERNAL_ERROR
        if standalone_mode:
            sys.exit(code)
        return code


def _internal(exc: BaseException) -> None:
    click.echo(
        f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]} (run with --debug for the traceback)",
        err=True,
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradaudit")
def main() -> None:
    """Predict vanishing and exploding gradients in a PyTorch model before training it.

    \b
      gradaudit check examples/deep_sigmoid.py
      gradaudit check models/net.py:build_model --input-shape 2,3,224,224
      gradaudit rules
      gradaudit explain GA101
    """


class _Shape(click.ParamType):
    name = "SHAPE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from gradaudit.loading import parse_shape

        try:
            return parse_shape(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


class _Range(click.ParamType):
    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from gradaudit.loading import parse_range

        try:
            return parse_range(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


class _MeanStd(click.ParamType):
    name = "MEAN,STD"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            mean, std = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected MEAN,STD (two numbers), got {value!r}", param, ctx)
        if not std >= 0:
            self.fail(f"the standard deviation must be >= 0, got {std:g}", param, ctx)
        return mean, std


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from gradaudit.frontends.onnx_load import parse_size

        try:
            return parse_size(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def _codes(values: tuple[str, ...]) -> list[str] | None:
    out = [c.strip() for v in values for c in v.split(",") if c.strip()]
    return out or None


@main.command()
@click.argument("targets", nargs=-1, metavar="[TARGET]...")
@click.option("--input-shape", "input_shapes", multiple=True, type=_Shape(),
              help="Shape of one model input, e.g. 2,3,224,224, or of a keyword input, e.g. input_ids=2,16 "
                   "(repeat for several inputs).")
@click.option("--input-dtype", "input_dtype", multiple=True,
              help="dtype of the inputs, e.g. int64 for token ids (default float32), or of one keyword input, "
                   "e.g. attention_mask=int64 (repeatable).")
@click.option("--input-range", type=_Range(), help="Value range LO,HI of the inputs, e.g. 0,30522 for token ids.")
@click.option("--input-stats", "input_moments", multiple=True, type=_MeanStd(),
              help="Mean and std of one floating input, e.g. 0,0 for zeros (repeat per input, in order; "
                   "default: the example inputs' own statistics).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE instead of stdout.")
@click.option("--select", multiple=True, help="Only these rule codes or prefixes (comma list, repeatable).")
@click.option("--ignore", multiple=True, help="Skip these rule codes or prefixes (comma list, repeatable).")
@click.option("--fail-on", type=click.Choice(("error", "warning", "info")), default=None,
              help="Lowest severity that makes the exit status 1 (default error).")
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are findings.")
@click.option("--skip-missing", is_flag=True, help="Skip .py targets that define no model (for pre-commit).")
@click.option("-q", "--quiet", is_flag=True, help="No human summary on stderr with machine formats.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file (default: [tool.gradaudit] of the nearest pyproject.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--probe", is_flag=True, help="Also run a short real forward/backward and show measured statistics.")
@click.option("--draws", type=click.IntRange(min=1), default=None, help="Probe draws of the inputs [default: 2].")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False),
              help="Probe on this batch (.pt read with weights_only=True, or .safetensors); "
                   "{'inputs': x, 'target': y} feeds the model file's loss_fn.")
@click.option("--dtype", type=click.Choice(("fp32", "bf16", "fp16")), default=None, help="Probe dtype.")
@click.option("--device", type=click.Choice(("cpu", "cuda", "auto")), default=None, help="Probe device.")
@click.option("--gradcheck", is_flag=True, help="Numerically check custom autograd backward code.")
@click.option("--gradcheck-module", "gradcheck_modules", multiple=True, metavar="NAME",
              help="Module to gradcheck (repeatable).")
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False),
              help="Fail only on findings not recorded in this baseline file.")
@click.option("--update-baseline", is_flag=True, help="Record today's findings in the --baseline file.")
@click.option("--max-model-size", type=_Size(), default=None,
              help="Largest ONNX model to load: file, external data and folded constants [default: 4GiB].")
def check(targets, input_shapes, input_dtype, input_range, input_moments, fmt, output, select, ignore, fail_on,
          exit_zero, skip_missing, quiet, config_path, debug, probe, draws, inputs_path, dtype, device, gradcheck,
          gradcheck_modules, baseline_path, update_baseline, max_model_size):
    """Audit TARGETs for vanishing / exploding gradients at initialisation.

    \b
    A TARGET is path/to/file.py[:attr], package.module:attr or model.onnx.
    Without targets, the `targets` of [tool.gradaudit] in pyproject.toml.

    Loading a target RUNS the Python file (as pytest does): only audit code you trust.

    \b
    Exit status: 0 no finding at or above --fail-on, 1 findings,
    2 usage / config / load error, 3 internal error,
    4 incomplete audit (statistics missing on a layer; never masked).
    """
    from gradaudit.config import load_config

    config = load_config(config_path)
    fail_on = fail_on or config.fail_on or "error"
    select_codes = _codes(select) or config.select
    ignore_codes = _codes(ignore) or config.ignore
    from gradaudit.options import AuditOptions

    options = AuditOptions(
        probe=probe, draws=draws or 2, inputs_path=inputs_path, dtype=dtype or "fp32", device=device or "cpu",
        gradcheck=gradcheck, gradcheck_modules=tuple(gradcheck_modules),
        per_module_ignores=dict(config.per_module_ignores or {}),
    )
    input_dtype = ",".join(input_dtype) or None
    jobs = _jobs(targets, config, input_shapes, input_dtype, input_range)
    if skip_missing and targets and config.targets:
        jobs = _configured_only(jobs, config, input_shapes, input_dtype, input_range)
    renderer = None if fmt == "text" else _renderer(fmt)
    _check_output(output)
    _check_codes(config, select, ignore)
    settings = _settings(config)

    human = _human_console(fmt, output, quiet)
    reports = []
    from gradaudit.progress import progress

    errors: list[str] = []
    with progress(len(jobs), "auditing") if len(jobs) > 1 else contextlib.nullcontext(None) as step:
        for spec, shapes, in_dtype, in_range in jobs:
            if step is not None:
                step(0, spec)
            report = None
            if not (skip_missing and _no_torch(spec)):
                try:
                    report = _audit_one(spec, shapes, in_dtype, in_range, select_codes, ignore_codes, settings, options,
                                        dict(enumerate(input_moments)), max_model_size)
                except GradauditError as exc:
                    from gradaudit.loading import NoModelFound

                    if debug:
                        raise
                    if not (skip_missing and isinstance(exc, NoModelFound)):
                        errors.append(str(exc) if str(exc).startswith(spec.split(":")[0]) else f"{spec}: {exc}")
            if report is not None:
                reports.append(report)
            if step is not None:
                step()
    # reports are printed once the progress bar (a live display on stderr) is gone
    for message in errors:
        _error(message)
    if baseline_path or update_baseline:
        _apply_baseline(reports, baseline_path, update_baseline, quiet or errors)
    failed = bool(errors)
    for report in reports:
        if human is not None:
            from gradaudit.report.text import print_report

            print_report(report, human, layers=fmt == "text", title=len(jobs) > 1)
            if fmt == "text" and len(jobs) > 1:
                human.print()
    if failed:
        return 2
    if renderer is not None or output:
        if renderer is None:
            from gradaudit.report import text as renderer  # text to a file: no colour
        text = _render(renderer, reports, fmt)
        _write(text, output)
    from gradaudit.report.model import INCOMPLETE_EXIT

    if exit_zero:  # findings are masked, an incomplete audit never is: it is no all-clear
        return INCOMPLETE_EXIT if any(r.verdict == "incomplete" for r in reports) else 0
    codes = [r.exit_code(fail_on) for r in reports]
    return max(codes, default=0)


def _jobs(targets, config, input_shapes, input_dtype, input_range):
    """(spec, shapes, dtype, range) per target: CLI flags, else the config entry's."""
    jobs = []
    if targets:
        for spec in targets:
            entry = config.target_for(spec)
            if input_shapes or entry is None:
                jobs.append((spec, list(input_shapes) or None, input_dtype, input_range))
            else:
                jobs.append((spec, entry.input_shapes, input_dtype or entry.input_dtype, input_range or entry.input_range))
        return jobs
    if not config.targets:
        where = f" in {os.path.relpath(config.path)}" if config.path else " (no [tool.gradaudit] in pyproject.toml)"
        raise click.UsageError(f"no TARGET given and no targets configured{where}; try: gradaudit check model.py")
    for entry in config.targets:
        shapes = list(input_shapes) or entry.input_shapes
        jobs.append((entry.path, shapes, input_dtype or entry.input_dtype, input_range or entry.input_range))
    return jobs


def _configured_only(jobs, config, input_shapes, input_dtype, input_range):
    """With --skip-missing (pre-commit passes changed files) and configured ``targets``:
    only files named by a target count, audited as that target says (attribute, inputs)."""
    from gradaudit.config import _normalise_spec

    out = []
    for spec, shapes, in_dtype, in_range in jobs:
        want = _normalise_spec(spec.split(".py:")[0] + ".py" if ".py:" in spec else spec)
        for entry in config.targets:
            path = entry.path.split(".py:")[0] + ".py" if ".py:" in entry.path else entry.path
            if _normalise_spec(path) == want:
                out.append((entry.path, list(input_shapes) or entry.input_shapes, input_dtype or entry.input_dtype,
                            input_range or entry.input_range))
    return out


def _renderer(fmt: str):
    from gradaudit.report import get_renderer

    return get_renderer(fmt)


def _check_codes(config, select, ignore) -> None:
    """Reject unknown rule codes up front; name the config file for configured ones."""
    from gradaudit.rules.base import resolve_codes

    for flag, values in (("--select", _codes(select)), ("--ignore", _codes(ignore))):
        if values:
            try:
                resolve_codes(values)
            except ValueError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    where = os.path.relpath(config.path) if config.path else ""
    for key, values in (("select", config.select), ("ignore", config.ignore),
                        *((f'per-module-ignores."{g}"', c) for g, c in config.per_module_ignores.items())):
        if values:
            try:
                resolve_codes(values)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from None


def _settings(config):
    from dataclasses import fields

    from gradaudit.api import Settings
    from gradaudit.config import known_thresholds

    names = {f.name for f in fields(Settings)} - {"extra"}
    values = dict(config.settings)
    extra = {}
    known = None
    for k, v in config.thresholds.items():
        if k in names:
            values[k] = type(getattr(Settings(), k))(v)
            continue
        known = known if known is not None else known_thresholds()
        if k not in known:
            where = os.path.relpath(config.path) if config.path else "config"
            choices = ", ".join(sorted(n.replace("_", "-") for n in known | names))
            raise ConfigError(f"{where}: unknown threshold '{k.replace('_', '-')}' in thresholds; known: {choices}")
        extra[k] = v
    return Settings(**values, extra=extra)


def _audit_one(spec, shapes, dtype, value_range, select, ignore, settings, options, moments=None, max_model_size=None):
    from gradaudit.api import run
    from gradaudit.errors import CaptureError
    from gradaudit.loading import load_target

    loaded = load_target(spec, input_shapes=shapes, input_dtype=dtype, input_range=value_range,
                         max_model_size=max_model_size)
    options, inputs, input_source = _file_loss(options, loaded)
    try:
        return run(
            loaded.model,
            inputs,
            options,
            target=spec,
            input_source=input_source,
            select=select,
            ignore=ignore,
            input_stats={**loaded.input_stats, **(moments or {})} or None,
            settings=settings,
        )
    except CaptureError as exc:
        if loaded.input_source.startswith("inferred") and getattr(exc, "inputs_suspect", False):
            raise CaptureError(f"{exc} (inputs were {loaded.input_source}; pass --input-shape)") from exc
        raise


def _file_loss(options, loaded):
    """``(options, inputs, input_source)`` for one target: with ``--probe``, the model
    file's ``loss_fn(output, batch)`` and ``example_batch`` are the probe's real loss (an
    ``--inputs`` file replaces ``example_batch``); inferred inputs give way to the batch's."""
    import dataclasses

    if not options.probe or (loaded.loss_fn is None and loaded.batch is None):
        return options, loaded.inputs, loaded.input_source
    path = loaded.target.split(".py:")[0] + ".py" if ".py:" in loaded.target else loaded.target
    if loaded.loss_fn is None:
        raise ConfigError(f"{path}: example_batch is the batch of loss_fn(output, batch); define loss_fn too")
    if not callable(loaded.loss_fn):
        raise ConfigError(f"{path}: loss_fn must be a function loss_fn(output, batch) (got {type(loaded.loss_fn).__name__})")
    batch = None if options.inputs_path else loaded.batch
    options = dataclasses.replace(options, loss_fn=loaded.loss_fn, batch=batch)
    if batch is not None and loaded.input_source.startswith("inferred"):
        return options, None, f"example_batch in {path}"
    return options, loaded.inputs, loaded.input_source


def _apply_baseline(reports, path, update, quiet) -> None:
    """``--baseline`` / ``--update-baseline``: record the findings, then leave in each
    report only those the baseline does not hold (the others become suppressed)."""
    from gradaudit import baseline

    if not path:
        raise click.UsageError("--update-baseline needs --baseline FILE")
    targets = baseline.update(path, reports) if update else baseline.load(path)
    known = fixed = 0
    for report in reports:
        k, g = baseline.apply(report, targets, path)
        known, fixed = known + k, fixed + g
    if quiet:
        return
    if update:
        click.echo(f"baseline: recorded {known} finding(s) of {len(reports)} target(s) in {path}", err=True)
    elif fixed:
        click.echo(f"baseline: {fixed} finding(s) recorded in {path} are gone (--update-baseline drops them)", err=True)


def _no_torch(spec: str) -> bool:
    """A .py file that never mentions torch cannot define a model: skip it without running it."""
    path = spec.split(".py:")[0] + ".py" if ".py:" in spec else spec
    if not path.endswith(".py") or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "torch" not in fh.read()
    except OSError:
        return False


def _human_console(fmt: str, output: str | None, quiet: bool):
    """Where the human-readable report goes: stdout for text, stderr beside machine output."""
    from gradaudit.report.text import make_console

    if fmt == "text":
        return None if output else make_console(sys.stdout)
    return None if quiet else make_console(sys.stderr)


def _render(renderer, reports: list, fmt: str) -> str:
    if len(reports) == 1:
        return renderer.render(reports[0])
    many = getattr(renderer, "render_many", None)
    if many is None:
        raise ConfigError(f"--format {fmt} takes one target at a time")
    return many(reports)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_output(output: str | None) -> None:
    """Refuse an ``-o`` destination that cannot be written before the audit runs."""
    if output is None or output == "-" or (os.path.exists(output) and not os.path.isfile(output)):
        return  # stdout; /dev/null, a pipe: written directly
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ConfigError(f"-o {output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"-o {output}: the folder {folder} is not writable")


def _write(text: str, output: str | None) -> None:
    """stdout, or ``output`` written atomically (temp file + rename; devices written directly)."""
    if text and not text.endswith("\n"):
        text += "\n"
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if os.path.exists(output) and not os.path.isfile(output):
        with open(output, "w", encoding="utf-8") as fh:  # /dev/null, a pipe: no rename
            fh.write(text)
        return
    _check_output(output)  # again: the folder may have gone while the audit ran
    fd, tmp = tempfile.mkstemp(prefix=".gradaudit-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(output)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; a report is not
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@main.command("compare")
@click.argument("base", metavar="BASE")
@click.argument("new", metavar="NEW")
@click.option("--format", "fmt", type=click.Choice(("text", "json", "markdown")), default="text", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the comparison to FILE instead of stdout.")
@click.option("--fail-on", type=click.Choice(("error", "warning", "info")), default=None,
              help="Exit 1 when NEW has a finding at or above this severity that BASE has not (default error).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file (default: [tool.gradaudit] of the nearest pyproject.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def compare_cmd(base, new, fmt, output, fail_on, config_path, debug):
    """Compare two audits: BASE and NEW are JSON reports (--format json) or targets.

    \b
    Findings added and gone (matched by rule and module, not by line), the predicted
    gradient per layer, the verdict. Exit status 1 when NEW is worse at --fail-on (a new
    or more severe finding, or an audit that no longer covers every layer).

    \b
      gradaudit compare base.json new.json --format markdown
      gradaudit compare examples/relu_xavier_30.py examples/relu_he_30.py
    """
    from gradaudit.compare import compare
    from gradaudit.config import load_config
    from gradaudit.report.comparison import render

    config = load_config(config_path)
    fail_on = fail_on or config.fail_on or "error"
    result = compare(_compare_side(base, config), _compare_side(new, config), base, new)
    _write(render(result, fmt), output)
    return 1 if result.worse(fail_on) else 0


def _compare_side(arg: str, config) -> dict:
    """One side of ``compare``: a JSON report file, or a target audited statically."""
    if arg.lower().endswith(".json"):
        from gradaudit.compare import load_report

        return load_report(arg)
    from gradaudit.options import AuditOptions

    _check_codes(config, (), ())
    report = _audit_one(arg, None, None, None, config.select, config.ignore, _settings(config),
                        AuditOptions(per_module_ignores=dict(config.per_module_ignores or {})))
    return report.to_json()


@main.command("rules")
@click.option("--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True)
@click.option("--markdown", "markdown_dir", type=click.Path(file_okay=False), default=None,
              help="Write the catalog as Markdown pages (one per rule + README.md) into DIR.")
def rules_cmd(fmt, markdown_dir):
    """List the rule catalog: code, name, category, default severity, summary."""
    from gradaudit.rules.base import all_rules

    if markdown_dir is not None:
        from gradaudit.catalog import write_rules

        written = write_rules(markdown_dir)
        click.echo(f"wrote {len(written)} pages to {markdown_dir}", err=True)
        return 0

    rows = [
        {"code": code, "name": cls.name, "category": cls.category, "severity": cls.default_severity,
         "stage": cls.stage, "summary": cls.summary()}
        for code, cls in all_rules().items()
    ]
    if fmt == "json":
        import json

        click.echo(json.dumps(rows, indent=2))
        return 0
    import shutil

    keys = ("code", "name", "category", "severity")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 10_000
    for r in [dict(zip(keys + ("summary",), keys + ("summary",)))] + rows:
        line = "  ".join(r[k].ljust(widths[k]) for k in keys) + "  " + r["summary"]
        click.echo(line if len(line) <= width else line[: width - 3] + "...")
    return 0


@main.command()
@click.argument("code")
def explain(code):
    """Print the documentation of one rule, e.g. gradaudit explain GA101."""
    from gradaudit.rules.base import all_rules

    rules = all_rules()
    cls = rules.get(code.strip().upper())
    if cls is None:
        raise ConfigError(f"unknown rule code {code!r} (see 'gradaudit rules')")
    head = f"{cls.code} {cls.name} ({cls.category}, default severity {cls.default_severity})"
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        from rich.markdown import Markdown

        from gradaudit.report.text import make_console

        console = make_console(sys.stdout)
        console.print(f"[bold]{head}[/]")
        console.print(Markdown(cls.doc()))
    else:
        click.echo(head)
        click.echo()
        click.echo(cls.doc())
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
