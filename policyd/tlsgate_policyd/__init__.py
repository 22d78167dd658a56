"""tlsgate-policyd: the Postfix SMTP access policy daemon that enforces TLS connectors."""
