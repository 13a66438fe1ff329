"""The `openkd` command: a thin Typer app. Each stage resolves its config, then calls `run(cfg)`.

Heavy libraries (torch, vLLM, TRL) are imported inside the stages, so `openkd --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
import yaml

from openkd import __version__
from openkd.config import StageConfig, resolve
from openkd.decontaminate.config import DecontaminateConfig
from openkd.errors import TRACEBACK_ENV, OpenkdError, Preempted, show_tracebacks
from openkd.eval.config import EvalConfig
from openkd.export.config import ExportConfig
from openkd.flags import config_command
from openkd.generate.config import GenerateConfig
from openkd.plan.command import app as plan_app
from openkd.train.config import TrainConfig

app = typer.Typer(
    name="openkd",
    help="Hard-label distillation of LLMs: `generate` teacher answers, then `train` a student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _stage(cls: type[StageConfig], runner: str):
    """A command that resolves `cls` from --config and flags, then calls `module:function`."""

    def run(config_file: Path | None, dry_run: bool, overrides: dict[str, Any]) -> None:
        cfg = resolve(cls, config_file, overrides)
        if dry_run:
            sys.stdout.write(yaml.safe_dump({cls.section: cfg.to_yaml_dict()}, sort_keys=False))
            return
        module, function = runner.split(":")
        getattr(importlib.import_module(module), function)(cfg)

    return config_command(cls, run)


app.command("generate", help=GenerateConfig.__doc__)(
    _stage(GenerateConfig, "openkd.generate.run:run")
)
app.command("train", help=TrainConfig.__doc__)(_stage(TrainConfig, "openkd.train.run:run"))
app.command("eval", help=EvalConfig.__doc__)(_stage(EvalConfig, "openkd.eval.run:run"))
app.command("decontaminate", help=DecontaminateConfig.__doc__)(
    _stage(DecontaminateConfig, "openkd.decontaminate.run:run")
)
app.command("export", help=ExportConfig.__doc__)(_stage(ExportConfig, "openkd.export.run:run"))
app.add_typer(plan_app, name="plan")


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML with generate:, train: and eval: sections (see configs/recipes/)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate and wire all sections, print them as YAML, and exit."
    ),
) -> None:
    """Run generate, train and eval from one recipe; rerun it to continue after a crash."""
    from openkd.pipeline import run_recipe as run_pipeline

    run_pipeline(recipe, dry_run=dry_run)


@app.command("merge")
def merge(
    shards: list[Path] = typer.Argument(..., help="Shard JSONL files written with --shard i/n."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged JSONL file to write."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier openkd output at --output."
    ),
    allow_incomplete: bool = typer.Option(
        False,
        "--allow-incomplete",
        help="Merge even if shards are missing or unfinished; the output is marked incomplete.",
    ),
) -> None:
    """Join `generate --shard i/n` outputs into one dataset, checking ids are unique and every
    shard is there and finished."""
    from openkd.generate.merge import merge_shards

    merge_shards(shards, output, overwrite=overwrite, allow_incomplete=allow_incomplete)


@app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="Directory to write the tiny model to."),
    hidden_size: int = typer.Option(128, help="Hidden size (hidden/heads must be 32, 64, ...)."),
    layers: int = typer.Option(2, help="Transformer layers."),
    heads: int | None = typer.Option(
        None, help="Attention heads (default: hidden size / 32, a head size vLLM CPU supports)."
    ),
    kv_heads: int | None = typer.Option(None, help="Key/value heads (default: heads / 2)."),
    intermediate_size: int | None = typer.Option(
        None, help="MLP width (default: 2 x hidden size)."
    ),
    seed: int = typer.Option(0, help="Seed for tokenizer corpus and weights."),
    weights_seed: int | None = typer.Option(
        None,
        help="Seed for the weights alone (default: --seed): another initialisation with the "
        "same tokenizer, e.g. a student for a tiny teacher's soft labels.",
    ),
    init_std: float = typer.Option(
        0.02,
        help="Std of the random weights; 0.3 makes greedy answers end at EOS after widely "
        "varying lengths, like a real teacher's (for scheduling tests and benchmarks).",
    ),
    prompts: Path | None = typer.Option(
        None, help="Also write toy-task prompts (a `prompt` column) to this JSONL file."
    ),
    num_prompts: int = typer.Option(4000, help="How many distinct prompts --prompts gets."),
    task: str = typer.Option("reverse", help="Toy task of --prompts: reverse (words) or sum."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace a tiny model make-tiny wrote in DIR (and its --prompts); never a "
        "directory it did not write.",
    ),
) -> None:
    """Build a tiny random Llama + BPE tokenizer offline, to try openkd without downloads."""
    from openkd.tiny import command

    options = command.TinyOptions(
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        seed=seed,
        weights_seed=weights_seed,
        init_std=init_std,
        num_prompts=num_prompts,
        task=task,
    )
    typer.echo(str(command.make_tiny(out_dir, options, prompts=prompts, overwrite=overwrite)))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"openkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        help=f"Show the traceback behind a one-line error (same as {TRACEBACK_ENV}=1).",
    ),
) -> None:
    """Distillation of LLMs: `generate` teacher answers (and log-probabilities), then `train` a
    student on them."""
    if debug:
        os.environ[TRACEBACK_ENV] = "1"  # child processes (accelerate, servers) inherit it


INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C or SIGTERM


def _click_exceptions() -> Any:
    """The exception classes of the click that typer runs on (recent typers vendor their own)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def main() -> None:
    """Console entry point: one-line errors and a non-zero exit instead of tracebacks."""
    from openkd import console

    click = _click_exceptions()
    try:
        code = app(standalone_mode=False, prog_name="openkd")
    except click.NoArgsIsHelpError as err:  # `openkd` alone: the help text
        err.show()
        sys.exit(err.exit_code)
    except click.UsageError as err:  # an unknown flag, a bad value or choice: one line too
        command = err.ctx.command_path if err.ctx else "openkd"
        console.error(f"{err.format_message()} (see `{command} --help`)")
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort as err:  # end of input at a prompt
        if show_tracebacks():
            traceback.print_exception(err)
        console.error("aborted")
        sys.exit(1)
    except Preempted as err:  # a clean stop with a checkpoint (rank 0 says so): not an error
        from openkd.train.launch import LAUNCHED_ENV

        if LAUNCHED_ENV in os.environ:
            # A worker of `openkd train`'s own launch: the parent reads the run record and says
            # it. Exit 0: accelerate's launcher reports any other status as a failure, with a
            # traceback, and stops the other ranks.
            sys.exit(0)
        console.info(str(err))
        sys.exit(err.exit_code)
    except OpenkdError as err:
        if show_tracebacks():
            traceback.print_exception(err)
        from openkd.pipeline import in_recipe_terms  # a stage of `openkd run`: its keys

        console.error(in_recipe_terms(str(err)))
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        if show_tracebacks():
            traceback.print_exception(err)
        console.error("interrupted; rerun the same command to resume where it stopped")
        sys.exit(INTERRUPTED)
    if code == INTERRUPTED:  # typer turns Ctrl-C (and openkd's SIGTERM) into Exit(130)
        console.error("interrupted; rerun the same command to resume where it stopped")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
