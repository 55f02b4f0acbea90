"""The API key from a Prefect Secret block, for runs on workers and schedules.

A deployed or scheduled run has no shell to export OPENAI_API_KEY in, so the key can live in a
Prefect Secret block (encrypted at rest by the server) and the run names the block: `[api]
key_secret = "openai-key"` in the config, `--key-secret` on the command line, or
`key_secret=` in Python. Only the block's name travels as a setting; the key is loaded in the
process that sends the requests, kept in memory, and never logged or passed as a parameter.
"""

from __future__ import annotations

from typing import Any

from imagebatch.tasks.errors import ConfigError


async def load_secret_key(block_name: str) -> str:
    """The key stored in the Secret block `block_name`; a clear error when it cannot be read."""
    from prefect.blocks.system import Secret

    try:
        block = await Secret.aload(block_name)
    except ValueError as exc:
        raise ConfigError(
            f"Prefect Secret block {block_name!r} not found on this Prefect server "
            f"(create it with Secret(value=...).save({block_name!r}) or in the UI): {exc}"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"cannot read Prefect Secret block {block_name!r}: {type(exc).__name__}"
        ) from None
    value: Any = block.get()  # type: ignore[attr-defined]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"Prefect Secret block {block_name!r} does not hold a text key")
    return value.strip()
