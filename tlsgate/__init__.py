"""tlsgate: Exchange Online-style TLS connectors for Postfix.

The core shared by every front-end: connector rules (``schema``, ``store``), the immutable
rule ``snapshot``, the decision ``engine`` and the administrator's ``cli``.
"""

__version__ = "0.1.0"
