"""Coverage-guided fuzzing of the three protocol front-ends with atheris (libFuzzer).

Run as a script: ``python tests/reliability/atheris_harness.py -runs=N``. One input drives the
policy protocol reader and request mapping, the socketmap netstring decoder and request parser,
and the milter's header-From and macro translations; any exception other than the documented
framing errors, or a buffer above its limit, ends the run with a crash report and a non-zero
exit status. test_reliability_atheris.py runs it when atheris is installed.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tlsgate_milter import translate
    from tlsgate_policyd.protocol import Limits, ProtocolError, RequestReader, facts_from_request

    from tlsgate import socketmap

LIMITS = Limits(max_line=512, max_attributes=32, max_request=4096)


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    chunk = provider.ConsumeIntInRange(1, 64)
    payload = provider.ConsumeBytes(provider.remaining_bytes())
    reader = RequestReader(LIMITS)
    try:
        for start in range(0, len(payload), chunk):
            for attrs in reader.feed(payload[start:start + chunk]):
                facts_from_request(attrs)
            if len(reader._buffer) > LIMITS.max_line + 1:
                raise AssertionError("policy reader buffer above max_line")
    except ProtocolError:
        pass
    decoder = socketmap.NetstringDecoder()
    try:
        for start in range(0, len(payload), chunk):
            for item in decoder.feed(payload[start:start + chunk]):
                try:
                    socketmap.parse_request(item)
                except socketmap.BadRequest:
                    pass
    except socketmap.NetstringError:
        pass
    text = payload.decode("utf-8", "replace")
    translate.header_from_authors(text.split("\n")[: translate.MAX_FROM_FIELDS])
    macros = dict(zip(translate.TLS_MACROS, text.split("\x00"), strict=False))
    translate.tls_from_macros(macros.get)
    line = translate.reply_text(text, "4.7.0 fallback")
    if "\n" in line or "\r" in line:
        raise AssertionError("reply text with a line break")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
