"""The LoRA converters by ``--implementation`` name, and the choice among them."""

from __future__ import annotations

import logging

from ktflow.convert_lora.converters.base import LoraConverter
from ktflow.convert_lora.converters.builtin import BuiltinConverter
from ktflow.convert_lora.converters.kt_kernel import KtKernelConverter
from ktflow.convert_lora.plan import AdapterPlan
from ktflow.errors import KtflowInputError

log = logging.getLogger(__name__)

# In ``auto``'s order of preference: upstream's converter where it applies and loads, else ktflow's.
CONVERTERS: dict[str, type[LoraConverter]] = {
    KtKernelConverter.name: KtKernelConverter,
    BuiltinConverter.name: BuiltinConverter,
}
AUTO = "auto"
IMPLEMENTATIONS = (AUTO, *CONVERTERS)


def choose_converter(implementation: str, plan: AdapterPlan) -> LoraConverter:
    """The named converter (its refusal is the error), or for ``auto`` the first that takes the plan."""
    if implementation != AUTO:
        if implementation not in CONVERTERS:
            raise KtflowInputError(None, "--implementation", f"{implementation!r} not in {IMPLEMENTATIONS}")
        converter = CONVERTERS[implementation]()
        converter.check(plan)
        try:
            converter.load()
        except ImportError as error:
            raise KtflowInputError(
                None, "--implementation", f"{converter.name}'s converter: {error}"
            ) from None
        return converter
    for candidate in CONVERTERS.values():
        converter = candidate()
        try:
            converter.check(plan)
        except KtflowInputError:
            continue
        try:
            converter.load()
        except ImportError as error:
            log.info("%s converter unavailable (%s); trying the next", converter.name, error)
            continue
        return converter
    raise KtflowInputError(
        plan.adapter_dir, None, f"no converter of {', '.join(CONVERTERS)} takes this adapter"
    )
