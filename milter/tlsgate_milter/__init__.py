"""tlsgate-milter: the pymilter milter that enforces TLS connectors."""
