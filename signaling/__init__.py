"""HTTP control plane: WHIP/WHEP resources, auth, pages, and the node's lifecycle."""
