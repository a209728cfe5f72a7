"""limiter/calls.py on its own: the function library while the store takes it, the scripts
where it is refused, code the store lost sent again — against a real Valkey."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import redis.asyncio as aredis

from quotagate.common.clock import script_arg
from quotagate.limiter import keys
from quotagate.limiter.scripts import DECIDE, LIBRARY_NAME
from tests.helpers import at, env, write_config
from tests.parts import build, command_calls

NOON = "2026-11-26T12:00:00"


def decide_args(clock, cost: int = 1) -> list[str | int]:
    return [script_arg(clock.script_time()), "function", cost, "enforce", 100, "", "i", 15_000,
            ""]


async def test_code_the_store_lost_is_sent_again(tmp_path: Path, valkey_url: str):
    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), clock)
    client = aredis.Redis.from_url(valkey_url)
    try:
        first = await parts.calls.run(DECIDE, "shop", keys.decision_keys("shop"),
                                      decide_args(clock))
        assert first[0] == 0 and parts.calls.script_reloads == 0
        await client.execute_command("FUNCTION", "FLUSH")
        await client.execute_command("SCRIPT", "FLUSH")
        again = await parts.calls.run(DECIDE, "shop", keys.decision_keys("shop"),
                                      decide_args(clock))
        assert again[0] == 0 and again[6] == first[6] - 1  # decided, and counted: one less left
        assert parts.calls.script_reloads == 1 and parts.calls.functions
        for _ in range(50):  # the library is loaded again behind the call
            if await client.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the function library was not loaded again")
    finally:
        await client.aclose()
        await parts.close()


async def test_a_store_that_refuses_functions_gets_scripts(tmp_path: Path, valkey_url: str):
    """A user whose ACL denies FUNCTION and FCALL: calls become EVALSHA, decisions still made."""
    client = aredis.Redis.from_url(valkey_url)
    user, password = f"nofn{uuid.uuid4().hex[:6]}", "pw"
    await client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*",
                                 "+@all", "-function", "-fcall", "-fcall_ro")
    url = valkey_url.replace("redis://", f"redis://{user}:{password}@")
    clock = at(NOON)
    parts = await build(url, write_config(tmp_path, {"shop": env()}), clock)
    try:
        await parts.calls.load_scripts()
        assert not parts.calls.functions
        assert await parts.calls.scripts_loaded()
        await client.config_resetstat()
        reply = await parts.calls.run(DECIDE, "shop", keys.decision_keys("shop"),
                                      decide_args(clock))
        assert reply[0] == 0
        assert await command_calls(client, "evalsha") == 1
        assert await command_calls(client, "fcall") == 0
    finally:
        await parts.close()
        await client.execute_command("ACL", "DELUSER", user)
        await client.aclose()
