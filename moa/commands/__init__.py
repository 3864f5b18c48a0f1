"""Sub-commands of the ``moa`` CLI, one module per concern.

Each module defines ``register(subparsers) -> None``, which adds its parsers and sets
``func`` (a function ``(argparse.Namespace) -> int``) as the default of each. Add a new
module to :data:`COMMAND_MODULES` to expose it.
"""

COMMAND_MODULES: tuple[str, ...] = (
    "moa.commands.core",
    "moa.commands.hub",
    "moa.commands.registry",
    "moa.commands.merge",
    "moa.commands.train",
    "moa.commands.eval",
    "moa.commands.generate",
    "moa.commands.serve",
)
