"""Load tests with headless WebRTC peers: ``whipcast loadtest`` (see README.md)."""
