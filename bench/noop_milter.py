"""A no-op pymilter milter: the baseline for tlsgate-milter through Postfix.

It registers the same callbacks a judging milter needs (connect, HELO, MAIL, RCPT, headers,
end of message), answers CONTINUE to each and adds one header at end of message, as
tlsgate-milter adds its trace header; so the difference measured is tlsgate's own work.
Run as ``python -m bench.noop_milter unix:PATH``; it serves until SIGTERM.
"""

from __future__ import annotations

import sys

import Milter


class NoopMilter(Milter.Base):  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE

    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, recipient: str, *params: str) -> int:
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE

    def eoh(self) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        self.addheader("X-Noop", "pass")
        return Milter.ACCEPT


def main() -> None:
    Milter.factory = NoopMilter
    Milter.set_flags(Milter.ADDHDRS)
    print("noop milter ready", flush=True)
    Milter.runmilter("noop", sys.argv[1], 60)


if __name__ == "__main__":
    main()
