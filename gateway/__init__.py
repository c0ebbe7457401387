"""Media plane: WHIP ingest, Kafka frame bus, WHEP egress."""
