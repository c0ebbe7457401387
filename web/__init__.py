"""Browser pages and the WHIP/WHEP client module, shipped as package data."""
