"""One entry module per ``ktflow <command>``: ``ktflow.steps.<command, - as _>``.

Each holds ``configure(parser)`` and ``main(args)`` and calls into the package that does the
work; the rule that runs the command has the same name (workflow/rules/<step>.smk).
"""


def step_module(command: str) -> str:
    """``convert-lora`` -> ``ktflow.steps.convert_lora``."""
    return f"{__name__}.{command.replace('-', '_')}"
