"""The training core (one loop on accelerate) and the stage objectives that plug into it."""
