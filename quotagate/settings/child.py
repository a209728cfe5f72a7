"""Parse one environments file in a child process (``python -m quotagate.settings.child
FILE``, its bytes on stdin: the very bytes the parent read and split into blocks), for
``load.EnvSources``: a big file's parse peaks at several times the size of what
it yields (10^5 environments: ~630 MB for a 55 MB config), and the memory a process frees is
not given back to the system, so a gateway that parsed it itself would keep that RSS for
good; its CPU would also compete with the event loop for the interpreter lock. The child
writes to stdout one msgpack ``load.ChildReply``: the file's issues, or its environments in
chunks of ``CHUNK`` (each a msgpack map, decoded one at a time by the parent) and their
digest."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from quotagate.settings.load import ChildReply, ConfigIssue, environments_digest, read_yaml
from quotagate.settings.schema import EnvironmentsFile

#: Environments per chunk of the reply.
CHUNK = 1000


def main(argv: list[str]) -> int:
    (name,) = argv
    envs, issues = read_yaml(Path(name), EnvironmentsFile, sys.stdin.buffer.read())
    chunks: list[bytes] = []
    digest = b""
    if envs is not None and not issues:
        items = list(envs.environments.items())
        try:
            chunks = [msgspec.msgpack.encode(dict(items[i:i + CHUNK]))
                      for i in range(0, len(items), CHUNK)]
            digest = environments_digest(envs.environments)
        except (UnicodeEncodeError, msgspec.EncodeError) as exc:
            chunks, issues = [], [ConfigIssue(name, "$", f"invalid text: {exc}")]
    reply = ChildReply([(i.file, i.path, i.reason) for i in issues], chunks, digest)
    sys.stdout.buffer.write(msgspec.msgpack.encode(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
